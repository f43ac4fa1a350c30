"""`SentinelAttentionBackend`: the platform's attention kernel, plus a masked path for closing spans.

Every request's chunk is either
- *plain* (no span is compacted in it): the cache already holds exactly what its tokens may see,
  and its tokens land on consecutive slots after it, so the wrapped kernel (CPU_ATTN) runs
  unchanged, with physical sequence lengths and slots;
- *compacting*: a `<CR>` is in the chunk. Its tokens before the first `<CR>` see the whole cache as
  it stands and the chunk causally: they are written right after p(c) (the step's allocation holds
  those slots, `KVLayout.step_len`) and go through the kernel with the plain chunks. Only then are
  the compaction's slots written. The rows from the first `<CR>` on (a `<CR>` sees its `<CL>` as a
  constant key and value the model runner supplies; tokens after a `<CR>` no longer see its span)
  are *masked*: attended once, by torch's fused CPU attention kernel on padded groups, in two
  parts merged by the log-sum-exp it returns:
  - the *stable* prefix (the sink, the compacted `<CR>`s and gaps: `ChunkPlan.stable_len`), seen
    whole by every real token and by no sentinel: read straight from the paged cache in tiles of
    whole blocks, no mask;
  - the *volatile* tail (the raw region, at most L + W slots, which this step's `<CR>`s and
    moves overwrite, so it is read before the step writes) and the chunk itself: the chunk is cut
    after each `<CR>`, each piece gathers only the keys it may see, and pieces are attended in
    padded groups with the sentinel mask.
  In a decode step only the `<CR>` is masked (`closing_decodes`: its span, itself, its `<CL>`).
  With a recent window (W > 0) the raw tokens cached after a compacted span are moved left into
  the slots it gave up, from the same pre-write read (layout.py).

Stable prefixes of similar size are attended together, and so are pieces of similar size (a decode
step in which every request closes a span is one padded call per layer for all their `<CR>`s).

Peak extra memory of a step's masked work is bounded by the chunk, not by the prompt: the
visibility of a band of rows at a time, at most `SCORE_BUDGET` attention scores per masked group,
the volatile tails (L + W slots per masked request), and one stable-prefix tile of keys and values
(`KV_TILE_BUDGET` elements each, at least one block).

The wrapped kernel's in-block KV layout is its own business (CPU_ATTN stores keys transposed, and
differently per ISA), so `PagedKVReader` learns it once by writing a known pattern through the
kernel's own cache writer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, CPUAttentionMetadataBuilder)

from ..masks import CR, REAL
from .kv_cache_manager import SentinelAttentionSpec
from .layout import cdiv
from .plan import NEVER


class SentinelAttentionBackend(CPUAttentionBackend):
    # Our forward writes the KV itself: after attention for chunks that close a span.
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the registry member `--attention-backend sentinel` maps to

    @staticmethod
    def get_impl_cls() -> type["SentinelAttentionImpl"]:
        return SentinelAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SentinelAttentionMetadataBuilder"]:
        return SentinelAttentionMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        return SentinelAttentionSpec(**{name: getattr(spec, name) for name in spec.__dataclass_fields__})


# Masked work is attended in padded groups, one SDPA call per group: a group grows while its padded
# cost stays within this factor of the work it holds, so that similar segments share a call but a
# long one is never padded up to.
PADDING_ALLOWANCE = 1.5


# Attention scores (query x key x head) one group of masked blocks may hold: its mask is materialised.
SCORE_BUDGET = 1 << 22
# Key elements (slot x KV head x dim, the values as many) one stable-prefix tile may hold. Those folds
# need no mask and the fused kernel keeps no more than a tile of its own scores per thread, so what
# a tile costs in memory is its copy of the keys and values (8 MiB each in bf16). Sized by scores
# instead, a 4,096-token chunk read 5 blocks per tile and merged its whole accumulator after each.
KV_TILE_BUDGET = 1 << 22

# What the masked folds compute in: "model" (the served dtype; the log-sum-exp and the merge stay
# fp32) or "float32". In a bf16 model bf16 folds are 1.3-3.7x faster on the fold shapes, and the
# engine's teacher-forced error against the fp32 oracle stays at stock bf16's own (docs/results.md,
# "bf16 folds"); an fp32 model folds in fp32 either way.
FOLD_DTYPE = "model"


def group_by_size(sizes: list[tuple[int, int]], max_padded: int | None = None) -> list[list[int]]:
    """Indices of (queries, keys) work items, grouped so that padding wastes little and no group's
    padded size exceeds `max_padded` (a single item larger than that is a group of its own)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    groups, current, work, k_max = [], [], 0, 0
    for i in order:
        q, k = sizes[i]
        padded = (len(current) + 1) * q * max(k, k_max)
        if current and (padded > PADDING_ALLOWANCE * (work + q * k)
                        or (max_padded is not None and padded > max_padded)):
            groups.append(current)
            current, work, k_max = [], 0, 0
        current.append(i)
        work += q * k
        k_max = max(k_max, k)
    return groups + [current] if current else groups


# Real rows of a compacting chunk are attended in blocks of this many consecutive rows, each block
# against the keys any of its rows sees. Those keys are the chunk's `<CR>`s and other keys every
# later row sees (a staircase: the work the mask asks for), and a band of raw span tokens at most
# BLOCK_ROWS + L + W long, of which each row sees its own span's (and the window's). On the realistic
# shape's prefill (16 x 1,536 tokens, bf16) 32 rows beat 16 and 64 (docs/results.md, stop 31).
BLOCK_ROWS = 32
FOREVER = 1 << 62  # where a `<CR>`'s rows end: every later real row sees it


@dataclass
class ChunkFolds:
    """The masked rows of one compacting chunk, as the folds that attend them (`chunk_folds`)."""

    rows: np.ndarray      # [B, R] masked row of each block's real rows; -1: padding
    keys: np.ndarray      # [B, K] key-bank rows of each block's keys; -1: padding
    visible: np.ndarray   # [B, R, K] bool
    sizes: np.ndarray     # [B] keys per block (the rest of K is padding)
    cr_rows: np.ndarray   # [C] masked row of each <CR>
    cr_keys: np.ndarray   # [C, L + 2] its span's L tokens, itself and its <CL>: all visible


def chunk_folds(chunk, first_row: int, volatile_offset: int, fresh_offset: int, start: int,
                cl_offset: int, block_rows: int = BLOCK_ROWS) -> ChunkFolds:
    """The masked rows of a chunk (from its first `<CR>` on; the kernel attends the tokens before
    it) without a mask evaluated per pair. The chunk's keys are its volatile tail (cached slots
    after the stable prefix, which is attended apart) and its tokens. By the semantics a real row
    sees a real key from the key itself until that key's span closes (its `<CR>` in this chunk),
    and a `<CR>` from the `<CR>` on: every key is seen by an interval of rows. So
    - keys no `<CR>` of this chunk closes are seen by every later real row: for a block of rows,
      a prefix of them (in key order);
    - the tokens of spans closing in this chunk have intervals ordered like the keys: for a block,
      a contiguous run of them;
    - a `<CR>` sees its span's L tokens, itself and its `<CL>` (`cl_offset` and on, one per `<CR>`
      in order), all of them: no mask.

    `first_row`: the chunk's first masked row among the step's masked rows; `volatile_offset`,
    `fresh_offset + start`: where the key bank holds its volatile tail and its first token."""
    stable = chunk.stable_len
    kinds, _, close = chunk.key_table(stable)
    cached = chunk.cached_len - stable
    skip = chunk.kernel_len
    is_real = kinds == REAL
    ends = np.where(is_real, close, FOREVER)  # the first row (key index) that no longer sees each key
    closing = np.flatnonzero(is_real & (close < NEVER))
    always = np.flatnonzero(ends >= NEVER)  # <CR>s, and real keys not closed in this chunk

    rows = cached + np.flatnonzero(kinds[cached + skip:] == REAL) + skip
    num_blocks = cdiv(rows.size, block_rows)
    blocked = np.full(num_blocks * block_rows, -1, dtype=np.int64)
    blocked[: rows.size] = rows
    blocked = blocked.reshape(num_blocks, block_rows)
    first, last = blocked[:, 0], rows[np.minimum(np.arange(1, num_blocks + 1) * block_rows, rows.size) - 1]
    num_always = np.searchsorted(always, last, side="right")
    band_from = np.searchsorted(ends[closing], first, side="right")
    band_to = np.maximum(np.searchsorted(closing, last, side="right"), band_from)
    sizes = num_always + band_to - band_from
    # A block's keys: the first `num_always` of `always`, then closing[band_from:band_to]; -1 pads.
    width = int(sizes.max(initial=0))
    column = np.broadcast_to(np.arange(width), (num_blocks, width))
    from_always = column < num_always[:, None]
    in_band = ~from_always & (column < sizes[:, None])
    keys = np.full(column.shape, -1, dtype=np.int64)
    keys[from_always] = always[column[from_always]]
    keys[in_band] = closing[(band_from[:, None] + column - num_always[:, None])[in_band]]
    key_end = np.where(keys >= 0, ends[keys.clip(min=0)], 0)
    visible = (keys[:, None, :] >= 0) & (keys[:, None, :] <= blocked[:, :, None]) \
        & (blocked[:, :, None] < key_end[:, None, :]) & (blocked[:, :, None] >= 0)

    def bank(key):
        return np.where(key < cached, volatile_offset + key, fresh_offset + start + key - cached)

    crs = np.flatnonzero(kinds[cached:] == CR)
    span = chunk.layout.span
    if closing.size != crs.size * span:
        raise AssertionError("the tokens of the spans a chunk compacts are not L per <CR>")
    cr_keys = np.concatenate([bank(closing).reshape(crs.size, span), bank(cached + crs)[:, None],
                              cl_offset + np.arange(crs.size)[:, None]], axis=1)
    masked_row = first_row - skip - cached
    return ChunkFolds(np.where(blocked >= 0, blocked + masked_row, -1), np.where(keys >= 0, bank(keys), -1),
                      visible, sizes, crs + first_row - skip, cr_keys)


def pad_blocks(folds: list[ChunkFolds], spare: int, max_padded: int, device) -> list["MaskedGroup"]:
    """The real-row blocks of a step's compacting chunks, in padded groups of similar key counts."""
    sizes = np.concatenate([f.sizes for f in folds])
    width = int(sizes.max())
    rows = np.concatenate([f.rows for f in folds])
    keys = np.concatenate([np.pad(f.keys, ((0, 0), (0, width - f.keys.shape[1])), constant_values=-1) for f in folds])
    visible = np.concatenate([np.pad(f.visible, ((0, 0), (0, 0), (0, width - f.keys.shape[1]))) for f in folds])
    padding = rows < 0
    rows = np.where(padding, spare, rows)
    visible[:, :, 0] |= padding  # padding rows attend somewhere (their output is dropped), so no NaN
    groups = []
    for group in group_by_size([(rows.shape[1], int(size)) for size in sizes], max_padded=max_padded):
        group = np.asarray(group)
        k = int(sizes[group].max())
        groups.append(MaskedGroup(torch.from_numpy(rows[group]).to(device),
                                  torch.from_numpy(keys[group, :k].clip(min=0)).to(device),
                                  FoldMask(torch.from_numpy(visible[group, :, :k]).to(device))))
    return groups


def closing_decodes(span: np.ndarray, window: np.ndarray, stable: np.ndarray, cached: np.ndarray,
                    first_row: np.ndarray, volatile_offset: np.ndarray, fresh_offset: int, start: np.ndarray,
                    cl_offset: np.ndarray) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray, np.ndarray]:
    """One-token chunks [t, <CR>] that compact a span (most steps that compact: decode), for all
    such requests of a step at once and without planning them: what `plan_chunk`, `chunk_folds` and
    `KVLayout.moves` give each (tested). t is attended by the kernel; the `<CR>` sees its span,
    itself and its `<CL>`, all of them, so no mask. The span lies raw at the volatile tail's front
    (from `stable`, `KVLayout.final_len`): all L tokens cached if W > 0; with W = 0 t is its last
    token, the L - 1 before it cached. The raw tokens cached after the span move left by the
    L - 1 slots it gives back.

    Per request (arrays): its span L, window W, stable and cached lengths, masked row, volatile
    tail's first key-bank row, first batch row and its `<CR>`'s `<CL>` key. Returns the `<CR>`s as
    (rows [n], keys [n, L + 2]) per distinct L, and the moves as (request index, from, to) slots."""
    in_cache = np.where(window > 0, span, span - 1)
    pieces = []
    for length in np.unique(span).tolist():
        which = np.flatnonzero(span == length)
        column = np.arange(length)
        keys = np.empty((which.size, length + 2), dtype=np.int64)
        keys[:, :length] = np.where(column < in_cache[which, None], volatile_offset[which, None] + column,
                                    fresh_offset + start[which, None])
        keys[:, length] = fresh_offset + start[which] + 1
        keys[:, length + 1] = cl_offset[which]
        pieces.append((first_row[which], keys))
    num_moved = np.where(window > 0, np.maximum(cached - stable - span, 0), 0)
    moved = concat_ranges(stable + span, num_moved)
    owner = np.repeat(np.arange(span.size), num_moved)
    return pieces, owner, moved, moved - (span[owner] - 1)


class FoldMask:
    """Which keys each row of a fold sees ([G, Q, K] bool, or [G, 1, K]: the same for every row),
    with the two forms a fold needs, made on first use: a step's groups are folded by every layer,
    and rebuilding the kernel's additive mask per layer cost more than the kernel on small models."""

    def __init__(self, visible: torch.Tensor):
        self.visible = visible
        self._additive: dict = {}
        self._blind = None
        self._all_seen = None

    def all_seen(self) -> bool:
        """Every row sees every key (a compacting decode step's `<CR>`s): the kernel needs no mask."""
        if self._all_seen is None:
            self._all_seen = bool(self.visible.all())
        return self._all_seen

    def additive(self, dtype, per_kv: int) -> torch.Tensor:
        """The kernel's mask, [G, 1, Q x per_kv, K]: 0 where seen, -inf where hidden (a KV head's
        query heads are extra rows of it)."""
        key = (dtype, per_kv)
        if key not in self._additive:
            mask = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device).masked_fill_(
                ~self.visible, float("-inf"))
            self._additive[key] = (mask if self.visible.shape[1] == 1 else mask.repeat_interleave(per_kv, dim=1)).unsqueeze(1)
        return self._additive[key]

    def blind(self) -> torch.Tensor:
        """[G, Q] rows that see no key (the kernel reports them as if they saw some)."""
        if self._blind is None:
            self._blind = ~self.visible.any(-1)
        return self._blind


@dataclass
class MaskedGroup:
    """Blocks of masked rows attended together in one padded call."""

    query_rows: torch.Tensor  # [G, Q] masked rows; padding: the spare row (the step's masked row count)
    keys: torch.Tensor        # [G, K] indices into the key bank (padding: 0, never visible)
    mask: FoldMask | None     # [G, Q, K]; None: every row sees every key


def unmasked_groups(pieces: list[tuple[np.ndarray, np.ndarray]], max_padded: int, device) -> list[MaskedGroup]:
    """Single-row pieces that see all their keys (`<CR>`s: `closing_decodes`, `chunk_folds`), as
    groups of at most `max_padded` scores, one width of key rows each: no padding, no mask."""
    widths: dict[int, list] = {}
    for rows, keys in pieces:
        if rows.size:
            widths.setdefault(keys.shape[1], []).append((rows, keys))
    groups = []
    for width, parts in widths.items():
        rows, keys = np.concatenate([r for r, _ in parts]), np.concatenate([k for _, k in parts])
        per_group = max(1, max_padded // width)
        for first in range(0, rows.size, per_group):
            part = slice(first, first + per_group)
            groups.append(MaskedGroup(torch.from_numpy(rows[part, None]).to(device),
                                      torch.from_numpy(keys[part]).to(device), None))
    return groups


def cache_slots(table: torch.Tensor, row, slots, block_size: int) -> torch.Tensor:
    """Cache slots (block id x block size + offset) of physical slots, by block table row (one
    request's, or one per slot)."""
    return table[row, slots // block_size] * block_size + slots % block_size


def concat_ranges(first: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[first[i], first[i] + lengths[i]) for every i, concatenated: per-request ranges of a step
    without a Python loop over its requests."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if ends.size else 0, dtype=np.int64) + np.repeat(first - (ends - lengths), lengths)


def token_rows(query_start: np.ndarray, requests, lengths: np.ndarray | None = None) -> torch.Tensor:
    """Batch rows of the given requests' tokens (the first `lengths[r]` of each, if given), in order."""
    requests = np.asarray(requests, dtype=np.int64)
    counts = (query_start[1:] - query_start[:-1]) if lengths is None else lengths
    return torch.from_numpy(concat_ranges(query_start[requests], counts[requests]))


@dataclass
class StablePrefixGroup:
    """Masked requests whose stable prefixes are attended together: each request's real tokens
    against its own prefix, padded to the group's longest (keys past a prefix's length are hidden)."""

    rows: torch.Tensor     # [G, Q] masked rows of each request's real tokens; padding: the spare row
    blocks: torch.Tensor   # [G, B] physical blocks holding each prefix's slots (padding: the first block)
    lengths: torch.Tensor  # [G] stable prefix length per request


def pad_stable_group(prefixes: list[tuple[torch.Tensor, torch.Tensor, int]], spare: int, device) -> StablePrefixGroup:
    """(rows, blocks, length) per request, as one padded group."""
    q_max = max(rows.numel() for rows, _, _ in prefixes)
    b_max = max(blocks.numel() for _, blocks, _ in prefixes)
    rows = torch.full((len(prefixes), q_max), spare, dtype=torch.long)
    blocks = torch.empty((len(prefixes), b_max), dtype=torch.long)
    for i, (own_rows, own_blocks, _) in enumerate(prefixes):
        rows[i, :own_rows.numel()] = own_rows
        blocks[i] = own_blocks[0]
        blocks[i, :own_blocks.numel()] = own_blocks
    lengths = torch.tensor([length for _, _, length in prefixes], dtype=torch.long)
    return StablePrefixGroup(rows.to(device), blocks.to(device), lengths.to(device))


@dataclass
class SentinelAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor            # [N] cache slot of every token after the step, -1 where nothing is stored
    kernel_slots: torch.Tensor | None     # [N] where the kernel's tokens are written before it runs (None: slot_mapping)
    kernel: CPUAttentionMetadata          # the wrapped kernel's metadata for the tokens it attends
    kernel_rows: torch.Tensor | None      # [P] their batch rows when masked rows share the step, else None (all)
    masked_rows: torch.Tensor             # [M] batch rows from the first <CR> on of chunks that compact a span
    final_rows: torch.Tensor              # [F] all batch rows of those chunks: written after the kernel
    volatile_slots: "BlockSlots | torch.Tensor"  # [C] cache slots of their volatile tails: the key bank's front
    stable: list[StablePrefixGroup]       # masked requests with a stable prefix, in padded groups
    masked: list[MaskedGroup]             # pieces of the masked chunks, against the volatile tails and chunk
    move_rows: torch.Tensor               # [V] key-bank rows of cached tokens a compaction shifts left (window > 0)
    move_slots: torch.Tensor              # [V] the cache slots they move to
    cl_keys: dict | None = None           # layer name -> [C] <CL> keys of this step's <CR>s, rotated
    cl_values: dict | None = None


class SentinelStepState:
    """The worker's current step plan, shared by its model runner (writer) and builders (readers)."""

    def __init__(self) -> None:
        self.plan = None
        self.cl_keys: dict[str, torch.Tensor] = {}    # layer name -> [C, kv_heads, head_size], per <CR> in batch order
        self.cl_values: dict[str, torch.Tensor] = {}


class SentinelAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    step: SentinelStepState | None = None  # set by the model runner when it creates the builders

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        plan = self.step.plan if self.step is not None else None
        masked_requests = plan.masked_rows if plan is not None else []
        if not masked_requests:  # dummy runs, and every step in which no span is compacted
            nothing = cm.slot_mapping[:0]
            return SentinelAttentionMetadata(cm.num_actual_tokens, cm.slot_mapping, None,
                                             super().build(common_prefix_len, cm, fast_build), None,
                                             nothing, nothing, nothing, [], [], nothing, nothing)
        assert cm.num_reqs == len(plan.layouts), "the step plan and the batch disagree"
        device = cm.block_table_tensor.device
        starts = plan.query_start
        table = cm.block_table_tensor.long().cpu()
        bs = self.block_size

        # The kernel takes every request's tokens before its first <CR> (a plain chunk whole). Those
        # of a compacting chunk are written after p(c) first, where the uncompacted cache continues
        # (the step allocated those slots: KVLayout.step_len); the compaction's writes follow.
        kernel_rows = token_rows(starts, range(len(plan.layouts)), plan.kernel_len)
        masked = np.asarray(masked_requests, dtype=np.int64)
        first_masked = starts[masked] + plan.kernel_len[masked]
        masked_rows = torch.from_numpy(concat_ranges(first_masked, starts[masked + 1] - first_masked))
        final_rows = token_rows(starts, masked_requests)
        kernel_slots = cm.slot_mapping.clone()
        kernel_slots[final_rows.to(kernel_slots.device)] = -1
        pre_lens = plan.kernel_len[masked]
        pre = cache_slots(table, torch.from_numpy(np.repeat(masked, pre_lens)),
                          torch.from_numpy(concat_ranges(plan.cached_len[masked], pre_lens)), bs)
        kernel_slots[torch.from_numpy(concat_ranges(starts[masked], pre_lens)).to(kernel_slots.device)] = pre.to(
            kernel_slots.device)
        kernel = super().build(common_prefix_len, self._kernel_view(cm, plan.kernel_len, kernel_rows), fast_build)

        stable_lens = np.array([plan.layouts[row].final_len(int(plan.computed[row])) for row in masked_requests],
                               dtype=np.int64)
        tail_lens = plan.cached_len[masked] - stable_lens
        num_volatile = int(tail_lens.sum())
        offsets = np.cumsum(tail_lens) - tail_lens  # each volatile tail's first row in the key bank
        masked_lens = starts[masked + 1] - first_masked
        first_rows = np.cumsum(masked_lens) - masked_lens  # each request's first masked row
        cl_first = np.cumsum(plan.num_closings) - plan.num_closings  # each request's first <CR> in batch order
        cl_offsets = num_volatile + cm.num_actual_tokens + cl_first[masked]

        # One-token chunks need no plan (`closing_decodes`, all at once); longer ones get theirs.
        one = np.flatnonzero(plan.num_real[masked] == 1)
        decoding = masked[one]
        decode_pieces, owner, move_from, move_to = closing_decodes(
            np.array([plan.layouts[row].span for row in decoding], dtype=np.int64),
            np.array([plan.layouts[row].window for row in decoding], dtype=np.int64), stable_lens[one],
            plan.cached_len[decoding], first_rows[one], offsets[one], num_volatile, starts[decoding], cl_offsets[one])
        move_rows = [offsets[one][owner] + move_from - stable_lens[one][owner]]
        move_requests, move_to_slots = [decoding[owner]], [move_to]
        stable, blocks = [], []
        for i in np.flatnonzero(plan.num_real[masked] > 1).tolist():
            row, stable_len, first_row = int(masked[i]), int(stable_lens[i]), int(first_rows[i])
            chunk = plan.chunk(row)
            folds = chunk_folds(chunk, first_row, int(offsets[i]), num_volatile, int(starts[row]), int(cl_offsets[i]))
            if stable_len and folds.rows.size:
                real = folds.rows[folds.rows >= 0]  # real tokens after the first <CR>
                stable.append((torch.from_numpy(real), table[row, :cdiv(stable_len, bs)], stable_len))
            if folds.sizes.size:
                blocks.append(folds)
            decode_pieces.append((folds.cr_rows, folds.cr_keys))
            if chunk.move_from.size:
                move_rows.append(int(offsets[i]) + chunk.move_from - stable_len)
                move_requests.append(np.full(chunk.move_to.size, row, dtype=np.int64))
                move_to_slots.append(chunk.move_to)
        volatile_slots = cache_slots(table, torch.from_numpy(np.repeat(masked, tail_lens)),
                                     torch.from_numpy(concat_ranges(stable_lens, tail_lens)), bs)
        move_rows = torch.from_numpy(np.concatenate(move_rows))
        move_slots = cache_slots(table, torch.from_numpy(np.concatenate(move_requests)),
                                 torch.from_numpy(np.concatenate(move_to_slots)), bs)
        spare = masked_rows.numel()  # the accumulators' extra row, where padding rows land
        budget = SCORE_BUDGET // self.num_heads
        stable_groups = group_by_size([(rows.numel(), length) for rows, _, length in stable], max_padded=budget)
        return SentinelAttentionMetadata(cm.num_actual_tokens, cm.slot_mapping, kernel_slots, kernel,
                                         kernel_rows.to(device), masked_rows.to(device), final_rows.to(device),
                                         BlockSlots(volatile_slots.to(device), bs),
                                         [pad_stable_group([stable[i] for i in group], spare, device)
                                          for group in stable_groups],
                                         (pad_blocks(blocks, spare, budget, device) if blocks else [])
                                         + unmasked_groups(decode_pieces, budget, device),
                                         move_rows.to(device), move_slots.to(device),
                                         self.step.cl_keys, self.step.cl_values)

    @staticmethod
    def _kernel_view(cm, kernel_len: np.ndarray, rows: torch.Tensor):
        """`cm` for the kernel's tokens only (`kernel_len` of each request), renumbered from 0; the
        model runner set each request's sequence length to its cache and those tokens."""
        query_lens = torch.from_numpy(kernel_len).to(cm.query_start_loc_cpu.dtype)
        query_start = torch.zeros(len(kernel_len) + 1, dtype=cm.query_start_loc_cpu.dtype)
        torch.cumsum(query_lens, 0, out=query_start[1:])
        return replace(cm, num_actual_tokens=rows.numel(), max_query_len=int(query_lens.max()),
                       query_start_loc=query_start.to(cm.query_start_loc.device), query_start_loc_cpu=query_start,
                       slot_mapping=cm.slot_mapping[rows.to(cm.slot_mapping.device)])


class BlockSlots:
    """Cache slots as (block, offset in block), split once: every layer of a step reads the same
    slots, so the split is the builder's, not each layer's."""

    def __init__(self, slots: torch.Tensor, block_size: int):
        self.slots, self.block_size = slots, block_size
        self.blocks, self.offsets = slots // block_size, slots % block_size


class PagedKVReader:
    """Reads the keys and values of given slots out of a paged KV cache, whatever its in-block layout.

    The layout is learned once by writing a known pattern through the kernel's own cache writer
    into a one-block scratch cache: each written element's (slot offset, head, dim) is recovered
    from small integers (exact in every float dtype), digit by digit.

    Kernels tile their blocks (AMX packs pairs of dims and tiles of 16 slots), but each tiling is
    a mixed-radix split of the slot, head and dim axes with a stride per digit, so the cache *is*
    a strided view in (block, slot, head, dim) coordinates (`StridedBlockLayout`): reads index
    that view by block and slot, copying only the slots asked for, with no index as large as the
    data. A layout that is no such split is read through the learned element index instead.
    """

    def __init__(self, write, block_shape: tuple[int, ...], dtype: torch.dtype, block_size: int,
                 num_kv_heads: int, head_size: int):
        self.block_size = block_size
        self.k_index = self._probe(write, block_shape, dtype, block_size, num_kv_heads, head_size, keys=True)
        self.v_index = self._probe(write, block_shape, dtype, block_size, num_kv_heads, head_size, keys=False)
        self.k_layout = StridedBlockLayout.of(self.k_index)
        self.v_layout = StridedBlockLayout.of(self.v_index)

    @staticmethod
    def _probe(write, block_shape, dtype, block_size, num_kv_heads, head_size, keys: bool) -> torch.Tensor:
        grid = torch.stack(torch.meshgrid(torch.arange(block_size), torch.arange(num_kv_heads),
                                          torch.arange(head_size), indexing="ij"))  # [3, bs, H, D]
        slots = torch.arange(block_size, dtype=torch.long)
        coordinates = []
        for coordinate in grid:
            digits = []
            for power in (1, 128, 128 * 128):
                scratch = torch.zeros((1, *block_shape), dtype=dtype)
                pattern = ((coordinate // power) % 128 + 1).to(dtype)
                zeros = torch.zeros_like(pattern)
                write(pattern if keys else zeros, zeros if keys else pattern, scratch, slots)
                digits.append(scratch.reshape(-1).to(torch.long) - 1)
            coordinates.append(digits[0] + 128 * digits[1] + 128 * 128 * digits[2])
        written = (torch.stack([c >= 0 for c in coordinates]).all(0)).nonzero().squeeze(1)
        offset, head, dim = (c[written] for c in coordinates)
        index = torch.full((block_size, num_kv_heads, head_size), -1, dtype=torch.long)
        index[offset, head, dim] = written
        if written.numel() != index.numel() or bool((index < 0).any()):
            raise RuntimeError("could not learn the attention kernel's KV cache layout: the pattern written "
                               "through its cache writer does not map one-to-one onto a block")
        return index

    def read(self, kv_cache: torch.Tensor, slots: torch.Tensor | BlockSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `slots` as `[n, num_kv_heads, head_size]` each."""
        if not isinstance(slots, BlockSlots) or slots.block_size != self.block_size:
            slots = BlockSlots(getattr(slots, "slots", slots), self.block_size)
        if self.k_layout is not None and self.v_layout is not None:
            return (self.k_layout.read_slots(kv_cache, slots.blocks, slots.offsets),
                    self.v_layout.read_slots(kv_cache, slots.blocks, slots.offsets))
        flat = kv_cache.view(kv_cache.shape[0], -1)
        keys = flat[slots.blocks[:, None, None], self.k_index.to(slots.blocks.device)[slots.offsets]]
        values = flat[slots.blocks[:, None, None], self.v_index.to(slots.blocks.device)[slots.offsets]]
        return keys, values

    def read_blocks(self, kv_cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of whole blocks, slot by slot, as `[len(blocks) * block_size, num_kv_heads, head_size]` each."""
        if self.k_layout is not None and self.v_layout is not None:
            return self.k_layout.read_blocks(kv_cache, blocks), self.v_layout.read_blocks(kv_cache, blocks)
        flat = kv_cache.view(kv_cache.shape[0], -1)[blocks]
        heads, dims = self.k_index.shape[1:]
        keys = flat[:, self.k_index.to(blocks.device).view(-1)].view(-1, heads, dims)
        values = flat[:, self.v_index.to(blocks.device).view(-1)].view(-1, heads, dims)
        return keys, values


def radix_digits(offsets: torch.Tensor) -> list[tuple[int, int]] | None:
    """`offsets[i]` (relative to `offsets[0]`) as a sum of per-digit strides of i in a mixed radix:
    [(size, stride), ...], innermost digit first; None if the axis is no such split."""
    n, digits, unit = offsets.numel(), [], 1
    relative = (offsets - offsets[0]).tolist()
    while unit < n:
        stride, size = relative[unit], 2
        while unit * size < n and relative[unit * size] == size * stride:
            size += 1
        if n % (unit * size):
            return None
        digits.append((size, stride))
        unit *= size
    return digits


@dataclass
class StridedBlockLayout:
    """Where element (slot, head, dim) of a block lies, as strides of mixed-radix digits of each axis."""

    base: int                          # offset of element (0, 0, 0) in a block
    axes: list[list[tuple[int, int]]]  # per axis (slot, head, dim): [(size, stride)], innermost digit first
    shape: tuple[int, int, int]        # (block_size, heads, head_size)

    @classmethod
    def of(cls, index: torch.Tensor) -> "StridedBlockLayout | None":
        axes = [radix_digits(index[:, 0, 0]), radix_digits(index[0, :, 0]), radix_digits(index[0, 0, :])]
        if any(axis is None or any(stride <= 0 for _, stride in axis) for axis in axes):
            return None
        layout = cls(int(index[0, 0, 0]), axes, tuple(index.shape))
        return layout if torch.equal(layout.element_index(), index) else None

    def _digits(self) -> list[tuple[int, int]]:
        """(size, stride) of every digit in logical order: slot, head, dim, each outermost first."""
        return [digit for axis in self.axes for digit in reversed(axis)]

    def element_index(self) -> torch.Tensor:
        """`[slots, heads, dims]` element offsets this layout describes (checked against the probe)."""
        digits = self._digits()
        scratch = torch.arange(self.base + sum((size - 1) * stride for size, stride in digits) + 1)
        return scratch.as_strided([size for size, _ in digits], [stride for _, stride in digits],
                                  self.base).reshape(self.shape)

    def view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The whole cache as `[num_blocks, *slot digits, *head digits, *dim digits]` (each axis
        outermost digit first; `[num_blocks, block_size, heads, head_size]` when no axis is tiled),
        without a copy: the digits' strides in memory order, permuted into logical order."""
        flat = kv_cache.view(kv_cache.shape[0], -1)
        digits = self._digits()
        in_memory = sorted(range(len(digits)), key=lambda i: -digits[i][1])
        packed = flat.as_strided([flat.shape[0], *(digits[i][0] for i in in_memory)],
                                 [flat.stride(0), *(digits[i][1] for i in in_memory)], flat.storage_offset() + self.base)
        return packed.permute(0, *(1 + in_memory.index(i) for i in range(len(digits))))

    def read_slots(self, kv_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """`[n, heads, head_size]`: slot `offsets[i]` of block `blocks[i]`, only those elements copied
        (on the CPU kernel's layout 2-4x faster than copying the blocks whole and picking slots)."""
        slot_digits = []
        for size, _ in self.axes[0]:  # innermost first
            slot_digits.append(offsets % size)
            offsets = offsets // size
        picked = self.view(kv_cache)[(blocks, *reversed(slot_digits))]
        return _standard(picked.reshape(-1, *self.shape[1:]))

    def read_blocks(self, kv_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """`[len(blocks) * block_size, heads, head_size]`: whole blocks, slot by slot."""
        return _standard(self.view(kv_cache)[blocks].reshape(-1, *self.shape[1:]))


def _standard(t: torch.Tensor) -> torch.Tensor:
    """`t` with row-major strides, copied only if it has others: torch's fused CPU attention
    misreads odd strides, even on size-1 dims (a single head), where `contiguous()` sees none."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    return t if list(t.stride()) == expected[::-1] else torch.empty(t.shape, dtype=t.dtype).copy_(t)


_readers: dict[tuple, PagedKVReader] = {}


class SentinelAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None, "a sliding window": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap), "attention sinks": sinks is not None,
            f"{attn_type} attention": attn_type != AttentionType.DECODER,
            "KV cache sharing between layers": kv_sharing_target_layer_name is not None,
            f"a {kv_cache_dtype} KV cache": kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"),
        }
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise NotImplementedError(
                f"--attention-backend sentinel does not support {', '.join(refused)}: sentinel models are "
                "decoder-only full-attention models (Llama family); serve this model with the default backend")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)

    def _reader(self, layer, kv_cache: torch.Tensor) -> PagedKVReader:
        block_shape = tuple(kv_cache.shape[1:])
        key = (block_shape, kv_cache.dtype, getattr(layer, "isa", None))
        if key not in _readers:
            def write(k, v, cache, slots):
                self.do_kv_cache_update(layer, k, v, cache, slots)
            _readers[key] = PagedKVReader(write, block_shape, kv_cache.dtype, block_shape[1],
                                          self.num_kv_heads, self.head_size)
        return _readers[key]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with the sentinel backend")
        if attn_metadata is None:  # profiling and warm-up runs
            return output
        meta: SentinelAttentionMetadata = attn_metadata
        n = meta.num_actual_tokens

        if meta.kernel_rows is None:  # no span is compacted this step: the kernel's step, as stock runs it
            self.do_kv_cache_update(layer, key[:n], value[:n], kv_cache, meta.slot_mapping[:n])
            return super().forward(layer, query, key, value, kv_cache, meta.kernel, output)
        # Read the volatile tails before this step's writes reach any of their slots; then the
        # kernel's tokens go in (those of compacting chunks after p(c), on the uncompacted cache)
        # and the kernel runs; then the compactions write their final slots and moves.
        volatile_k, volatile_v = self._reader(layer, kv_cache).read(kv_cache, meta.volatile_slots)
        self.do_kv_cache_update(layer, key[:n], value[:n], kv_cache, meta.kernel_slots[:n])
        rows = meta.kernel_rows
        kernel_output = output.new_empty((rows.numel(), *output.shape[1:]))
        super().forward(layer, query[rows], key, value, kv_cache, meta.kernel, kernel_output)
        output[rows] = kernel_output
        final = meta.final_rows
        self.do_kv_cache_update(layer, key.index_select(0, final), value.index_select(0, final), kv_cache,
                                meta.slot_mapping.index_select(0, final))
        if meta.move_rows.numel():  # window > 0: the raw tokens after a compacted span close the gap it left
            self.do_kv_cache_update(layer, volatile_k[meta.move_rows].to(key.dtype),
                                    volatile_v[meta.move_rows].to(value.dtype), kv_cache, meta.move_slots)
        if meta.masked_rows.numel():
            bank_k = torch.cat([volatile_k.to(key.dtype), key[:n], meta.cl_keys[layer.layer_name].to(key.dtype)])
            bank_v = torch.cat([volatile_v.to(value.dtype), value[:n], meta.cl_values[layer.layer_name].to(value.dtype)])
            attended = self._masked_attention(layer, query, kv_cache, meta, bank_k, bank_v)
            output.index_copy_(0, meta.masked_rows, attended.to(output.dtype).view(-1, *output.shape[1:]))
        return output

    def _masked_attention(self, layer, query, kv_cache, meta: SentinelAttentionMetadata, bank_k, bank_v):
        """Attention of the masked rows, `[M, heads, head_size]` in fp32: one online softmax per row
        over its stable prefix (tiles of whole blocks) and its block of keys (volatile tail and chunk)."""
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_size
        per_kv = heads // kv_heads
        rows = meta.masked_rows.numel()
        # One spare row takes the padding rows of every group.
        dtype = query.dtype if FOLD_DTYPE == "model" else torch.float32
        queries = query.index_select(0, meta.masked_rows).view(rows, kv_heads, per_kv, dim)
        state = OnlineSoftmax(torch.cat([queries, queries[:1]]).to(dtype), self.scale)
        reader = self._reader(layer, kv_cache) if meta.stable else None
        block_size = reader.block_size if reader else 0
        for group in meta.stable:
            per_tile = max(1, KV_TILE_BUDGET // (group.blocks.shape[0] * block_size * kv_heads * dim))
            for first in range(0, group.blocks.shape[1], per_tile):
                tile = group.blocks[:, first: first + per_tile]
                k, v = reader.read_blocks(kv_cache, tile.reshape(-1))
                k, v = k.view(tile.shape[0], -1, kv_heads, dim), v.view(tile.shape[0], -1, kv_heads, dim)
                # Every request's first tile holds at least one of its keys, so no row is left with
                # nothing to attend to; a later tile past a short prefix folds in nothing.
                seen = first * block_size + torch.arange(k.shape[1], device=k.device) < group.lengths[:, None]
                state.fold(group.rows, k.to(dtype), v.to(dtype), None if bool(seen.all()) else FoldMask(seen[:, None, :]))
        bank_k, bank_v = bank_k.to(dtype), bank_v.to(dtype)
        for group in meta.masked:
            keys = group.keys.reshape(-1)
            state.fold(group.query_rows, bank_k.index_select(0, keys).view(*group.keys.shape, kv_heads, dim),
                       bank_v.index_select(0, keys).view(*group.keys.shape, kv_heads, dim), group.mask)
        return state.result()[:rows].view(rows, heads, dim)


class OnlineSoftmax:
    """Softmax attention accumulated over key blocks, per row and head: each fold is one call of
    torch's fused CPU attention kernel, which also returns the log-sum-exp, and folds are merged
    by it (the normalised output and its log-sum-exp are the running state)."""

    def __init__(self, queries: torch.Tensor, scale: float):
        """queries [rows, Hkv, g, D]: every row a fold may ask for (the spare padding row too)."""
        rows, kv_heads, per_kv, dim = queries.shape
        self.queries, self.scale = queries, scale
        self.lse = torch.full((rows, kv_heads, per_kv), float("-inf"), device=queries.device)
        self.out = torch.zeros((rows, kv_heads, per_kv, dim), device=queries.device)

    def fold(self, index, k, v, mask: FoldMask | None) -> None:
        """index [G, Q] rows (distinct, but for the spare padding row); k, v [G, K, Hkv, D], in the
        queries' dtype; mask None: all visible."""
        if mask is not None and mask.all_seen():
            mask = None
        groups, queries = index.shape
        _, kv_heads, per_kv, dim = self.queries.shape
        flat = index.reshape(-1)
        # Grouped-query attention as plain attention: a KV head's query heads become extra rows.
        rows = self.queries.index_select(0, flat).view(groups, queries, kv_heads, per_kv, dim).transpose(1, 2)
        rows = rows.reshape(groups, kv_heads, queries * per_kv, dim)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            rows, k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
            attn_mask=None if mask is None else mask.additive(rows.dtype, per_kv), scale=self.scale)
        out = out.view(groups, kv_heads, queries, per_kv, dim).transpose(1, 2).reshape(-1, kv_heads, per_kv, dim)
        lse = lse.view(groups, kv_heads, queries, per_kv).transpose(1, 2).reshape(-1, kv_heads, per_kv)
        if mask is not None:  # the kernel reports 0 for a row that sees nothing; it weighs nothing
            lse = lse.masked_fill(mask.blind().expand(groups, queries).reshape(-1)[:, None, None], float("-inf"))
        old = self.lse.index_select(0, flat)
        if bool(torch.isneginf(old).all()):  # the rows' first fold (a fresh prefill's only one)
            self.out.index_copy_(0, flat, out.float())
            self.lse.index_copy_(0, flat, lse)
            return
        merged = torch.logaddexp(old, lse)
        accumulated = self.out.index_select(0, flat).mul_(torch.exp(old - merged).unsqueeze(-1))
        self.out.index_copy_(0, flat, accumulated.add_(out.float() * torch.exp(lse - merged).unsqueeze(-1)))
        self.lse.index_copy_(0, flat, merged)

    def result(self) -> torch.Tensor:
        return self.out

"""`SentinelAttentionBackend`: the platform's attention kernel, plus a masked path for closing spans.

Every request's chunk is either
- *plain* (no span closes in it): the cache already holds exactly what its tokens may see, and its
  tokens land on consecutive slots after it, so the wrapped kernel (CPU_ATTN) runs unchanged,
  with physical sequence lengths and slots;
- *masked* (a span is compacted): `<CL>`/`<CR>` are in the chunk and tokens after a `<CR>` must
  no longer see its span. With a recent window (W > 0) the raw tokens cached after the span are
  moved left into the slots it gave up, from the same pre-step read (layout.py). Its cached prefix is read out of the paged cache *before* this step writes
  anything (a `<CR>` goes into the slot its span began in, which the `<CR>` itself and the tokens
  before it still read). The chunk is cut after each `<CR>`; each piece gathers only the keys it
  may see (the compacted prefix and its own span), and pieces are attended in padded groups with
  the sentinel mask in torch (SDPA). The kernel still runs over these rows, cheaply (their
  sequence length covers their own chunk only), and its output there is overwritten.

The wrapped kernel's in-block KV layout is its own business (CPU_ATTN stores keys transposed, and
differently per ISA), so `PagedKVReader` learns it once by writing a known pattern through the
kernel's own cache writer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, CPUAttentionMetadataBuilder)

from ..masks import CR
from .kv_cache_manager import SentinelAttentionSpec

logger = init_logger("vllm.sentinel")


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


def group_by_size(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of (queries, keys) work items, grouped so that padding wastes little."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    groups, current, work, k_max = [], [], 0, 0
    for i in order:
        q, k = sizes[i]
        if current and (len(current) + 1) * q * max(k, k_max) > PADDING_ALLOWANCE * (work + q * k):
            groups.append(current)
            current, work, k_max = [], 0, 0
        current.append(i)
        work += q * k
        k_max = max(k_max, k)
    return groups + [current] if current else groups


@dataclass
class Segment:
    """Consecutive queries of a masked chunk and the keys any of them may see (a few, compacted)."""

    query_rows: torch.Tensor  # [q] token rows in the batch
    keys: torch.Tensor        # [k] indices into the step's key bank: cached prefixes, then this step's tokens
    visible: torch.Tensor     # [q, k] bool


def segments(chunk, start: int, cached_offset: int, fresh_offset: int) -> list[Segment]:
    """A masked chunk cut after each `<CR>`. Every token of a piece sees the compacted prefix and its
    own piece only, so gathering each piece's visible keys keeps the work near the true visible
    set, instead of the chunk's full square."""
    seen = chunk.visibility()
    p = chunk.cached_len
    ends = (torch.from_numpy(chunk.kinds) == CR).nonzero().squeeze(1) + 1
    bounds = [0, *ends.tolist()] + ([chunk.num_tokens] if not ends.numel() or ends[-1] < chunk.num_tokens else [])
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        columns = seen[a:b].any(0).nonzero().squeeze(1)
        keys = torch.where(columns < p, cached_offset + columns, fresh_offset + start + columns - p)
        pieces.append(Segment(torch.arange(start + a, start + b), keys, seen[a:b][:, columns]))
    return pieces


@dataclass
class MaskedGroup:
    """Segments attended together in one padded SDPA call."""

    query_rows: torch.Tensor  # [G, Q] token rows in the batch, -1 for padding
    keys: torch.Tensor        # [G, K] indices into the key bank (padding: 0, never visible)
    visible: torch.Tensor     # [G, Q, K] bool


def pad_group(pieces: list[Segment], device) -> MaskedGroup:
    q_max = max(piece.query_rows.numel() for piece in pieces)
    k_max = max(piece.keys.numel() for piece in pieces)
    query_rows = torch.full((len(pieces), q_max), -1, dtype=torch.long)
    keys = torch.zeros((len(pieces), k_max), dtype=torch.long)
    visible = torch.zeros((len(pieces), q_max, k_max), dtype=torch.bool)
    visible[:, :, 0] = True  # padding rows attend somewhere (their output is dropped), so no NaN
    for i, piece in enumerate(pieces):
        q, k = piece.query_rows.numel(), piece.keys.numel()
        query_rows[i, :q], keys[i, :k] = piece.query_rows, piece.keys
        visible[i, :q] = False
        visible[i, :q, :k] = piece.visible
    return MaskedGroup(query_rows.to(device), keys.to(device), visible.to(device))


@dataclass
class SentinelAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor       # [N] cache slot of every token, -1 where nothing is stored
    kernel: CPUAttentionMetadata     # the wrapped kernel's metadata for the whole batch
    cached_slots: torch.Tensor       # [C] cache slots of the masked requests' prefixes: the key bank's front
    masked: list[MaskedGroup]        # requests whose chunk closes a span; their kernel rows are overwritten
    move_rows: torch.Tensor          # [V] key-bank rows of cached tokens a compaction shifts left (window > 0)
    move_slots: torch.Tensor         # [V] the cache slots they move to


class SentinelStepState:
    """The worker's current step plan, shared by its model runner (writer) and builders (readers)."""

    def __init__(self) -> None:
        self.plan = None


class SentinelAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    step: SentinelStepState | None = None  # set by the model runner when it creates the builders

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        kernel = super().build(common_prefix_len, cm, fast_build)
        plan = self.step.plan if self.step is not None else None
        masked_rows = plan.masked_rows if plan is not None else []
        if not masked_rows:  # dummy runs, and every step in which no span closes
            nothing = cm.slot_mapping[:0]
            return SentinelAttentionMetadata(cm.num_actual_tokens, cm.slot_mapping, kernel, nothing, [],
                                             nothing, nothing)
        assert cm.num_reqs == len(plan.layouts), "the step plan and the batch disagree"
        table = cm.block_table_tensor.long().cpu()
        cached_slots, pieces, move_rows, move_slots = [], [], [], []
        num_cached = sum(int(plan.cached_len[row]) for row in masked_rows)
        offset = 0
        for row in masked_rows:
            chunk = plan.chunk(row)
            physical = torch.arange(chunk.cached_len)
            cached_slots.append(table[row, physical // self.block_size] * self.block_size + physical % self.block_size)
            pieces += segments(chunk, int(plan.query_start[row]), offset, num_cached)
            if chunk.move_from.size:
                move_rows.append(offset + torch.from_numpy(chunk.move_from))
                target = torch.from_numpy(chunk.move_to)
                move_slots.append(table[row, target // self.block_size] * self.block_size + target % self.block_size)
            offset += chunk.cached_len
        groups = group_by_size([(piece.query_rows.numel(), piece.keys.numel()) for piece in pieces])
        device = cm.block_table_tensor.device
        masked = [pad_group([pieces[i] for i in group], device) for group in groups]
        none = torch.zeros(0, dtype=torch.long)
        return SentinelAttentionMetadata(cm.num_actual_tokens, cm.slot_mapping, kernel,
                                         torch.cat(cached_slots).to(device), masked,
                                         torch.cat(move_rows or [none]).to(device),
                                         torch.cat(move_slots or [none]).to(device))


class PagedKVReader:
    """Reads the keys and values of given slots out of a paged KV cache, whatever its in-block layout.

    The layout is learned once by writing a known pattern through the kernel's own cache writer
    into a one-block scratch cache: each written element's (slot offset, head, dim) is recovered
    from small integers (exact in every float dtype), digit by digit.
    """

    def __init__(self, write, block_shape: tuple[int, ...], dtype: torch.dtype, block_size: int,
                 num_kv_heads: int, head_size: int):
        self.block_size = block_size
        self.k_index = self._probe(write, block_shape, dtype, block_size, num_kv_heads, head_size, keys=True)
        self.v_index = self._probe(write, block_shape, dtype, block_size, num_kv_heads, head_size, keys=False)

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

    def read(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `slots` as `[n, num_kv_heads, head_size]` each."""
        flat = kv_cache.view(kv_cache.shape[0], -1)
        blocks = (slots // self.block_size).unsqueeze(1).unsqueeze(2)
        offsets = slots % self.block_size
        keys = flat[blocks, self.k_index.to(slots.device)[offsets]]
        values = flat[blocks, self.v_index.to(slots.device)[offsets]]
        return keys, values


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

        # Read masked requests' prefixes before this step's writes reach any of their slots.
        if meta.masked:
            cached_k, cached_v = self._reader(layer, kv_cache).read(kv_cache, meta.cached_slots)
        self.do_kv_cache_update(layer, key[:n], value[:n], kv_cache, meta.slot_mapping[:n])
        if meta.move_rows.numel():  # window > 0: the raw tokens after a compacted span close the gap it left
            self.do_kv_cache_update(layer, cached_k[meta.move_rows].to(key.dtype),
                                    cached_v[meta.move_rows].to(value.dtype), kv_cache, meta.move_slots)
        # The kernel takes the whole batch; the rows of masked requests (given sequence lengths
        # that only cover their own chunk) are recomputed below.
        super().forward(layer, query, key, value, kv_cache, meta.kernel, output)
        if not meta.masked:
            return output

        bank_k = torch.cat([cached_k.to(key.dtype), key[:n]])
        bank_v = torch.cat([cached_v.to(value.dtype), value[:n]])
        for group in meta.masked:
            q = query[group.query_rows.clamp(min=0)].transpose(1, 2)
            k = bank_k[group.keys].transpose(1, 2)
            v = bank_v[group.keys].transpose(1, 2)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=group.visible.unsqueeze(1), scale=self.scale,
                                                      enable_gqa=True).transpose(1, 2)
            real = group.query_rows >= 0
            output[group.query_rows[real]] = attended[real].to(output.dtype)
        return output

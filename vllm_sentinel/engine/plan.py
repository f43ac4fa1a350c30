"""One engine step in the worker: each request's scheduled real tokens, expanded into the stream.

vLLM's scheduler schedules real tokens only (so max_tokens, usage and stop checks never see a
sentinel). For a request's chunk of real tokens [c, c + k), `plan_chunk` inserts a `<CR>`
after every token after which a span is compacted and says, for every token of the expanded chunk, its
logical position, its physical KV slot (-1: never stored) and what `masks.attention_mask` needs
to decide visibility against the cached prefix and the rest of the chunk.

`<CL>` is not among them: it attends to itself alone, so its value and pre-RoPE key are constants
of the model (semantics page), computed once by the model runner and rotated to the `<CL>`'s
position (`cl_positions`) for the `<CR>` that attends to it. A compaction costs one extra query.

A chunk with no closing is *plain*: its tokens land on consecutive slots right after the cached
prefix, so ordinary causal paged attention over [0, p(c) + k) is exact. Only chunks with a
closing need the masked path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..masks import CR, REAL, attention_mask
from .layout import KVLayout

NEVER = np.iinfo(np.int64).max // 4  # "no <CR> in this chunk closes the token's span"


@dataclass
class ChunkPlan:
    layout: KVLayout
    computed: int            # c: real tokens already in the cache
    num_real: int            # k: real tokens scheduled this step
    cached_len: int          # p(c): physical slots of the cache before this chunk
    kinds: np.ndarray        # [q] REAL / CR
    positions: np.ndarray    # [q] logical (RoPE) positions
    real_index: np.ndarray   # [q] real token index, -1 for sentinels
    span_index: np.ndarray   # [q] span of the token (its <CR> too), -1 outside spans
    close_at: np.ndarray     # [q] chunk index of the <CR> closing the token's span, NEVER if none
    slots: np.ndarray        # [q] physical slot the token's KV is written to, -1 if never stored
    cl_positions: np.ndarray # [closings] logical position of each compacted span's `<CL>`, in `<CR>` order
    move_from: np.ndarray    # [v] cached slots whose tokens this chunk's compactions shift left (W > 0)
    move_to: np.ndarray      # [v] their slots after the chunk
    # first cached slot -> `key_table`, made once per chunk
    _made_keys: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.kinds.shape[0]

    @property
    def num_closings(self) -> int:
        return self.num_tokens - self.num_real

    @property
    def is_plain(self) -> bool:
        return self.num_tokens == self.num_real

    @property
    def kernel_len(self) -> int:
        """Tokens before the chunk's first `<CR>` (all of them if it has none): real tokens that see
        the whole cache as it stands and the chunk causally, which the wrapped kernel attends."""
        crs = np.flatnonzero(self.kinds == CR)
        return int(crs[0]) if crs.size else self.num_tokens

    @property
    def last_real(self) -> int:
        """Chunk index of the last real token: the row whose logits sample the next token."""
        return int(np.flatnonzero(self.kinds == REAL)[-1])

    @property
    def stable_len(self) -> int:
        """Cached slots this chunk neither rewrites nor hides: the sink, the compacted `<CR>`s and their
        gaps, up to where the raw region begins (span k(c)'s first slot). Every real token of the
        chunk sees all of them and no sentinel sees any; what follows them (at most L + W slots) is
        the *volatile* tail, which this step's `<CR>`s and moves overwrite."""
        if self.is_plain:
            return self.cached_len
        return self.layout.final_len(self.computed)

    def visibility(self, first_cached: int = 0, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """`[b - a, p(c) - first_cached + b]` bool: which cached slots (from `first_cached` on) and
        chunk tokens the chunk's tokens a..b-1 (default: all) attend to.

        The cached prefix is the physical cache in slot order. Everything in it is visible to
        real tokens except the open span's tokens once that span's `<CR>` has gone by in this
        chunk; a `<CR>` sees its own span's cached tokens and nothing else of the cache.
        """
        kinds, spans, close = (torch.from_numpy(column) for column in self.key_table(first_cached))
        cached = self.cached_len - first_cached
        a, b = rows if rows is not None else (0, self.num_tokens)
        end = cached + b  # keys after the last row are never visible to it
        return attention_mask(kinds[:end], spans[:end], close[:end], first_query=cached + a)

    def key_table(self, first_cached: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kind, span and closing key index of the cached slots from `first_cached` on and of the
        chunk's tokens, in that order (the chunk's keys: cached slots, then its tokens). A real key
        is seen by the real tokens from itself up to its span's `<CR>` in this chunk (`NEVER`: no
        `<CR>` of this chunk closes it); a `<CR>` by every real token after it."""
        made = self._made_keys
        if first_cached not in made:
            cached = self.cached_len - first_cached
            kinds = np.concatenate([np.full(cached, REAL), self.kinds])
            spans = np.concatenate([self.layout.cached_spans(self.computed)[first_cached:], self.span_index])
            close = np.concatenate([np.full(cached, NEVER), np.where(self.close_at < NEVER, self.close_at + cached, NEVER)])
            # Cached raw tokens of a span compacted in this chunk stop being visible after its <CR>.
            crs = np.flatnonzero(self.kinds == CR)  # in span order
            if crs.size and cached:
                which = np.searchsorted(self.span_index[crs], spans[:cached]).clip(max=crs.size - 1)
                closes = (spans[:cached] >= 0) & (self.span_index[crs][which] == spans[:cached])
                close[:cached] = np.where(closes, cached + crs[which], NEVER)
            made[first_cached] = (kinds, spans, close)
        return made[first_cached]


def plan_chunk(layout: KVLayout, computed: int, num_real: int) -> ChunkPlan:
    c, k = computed, num_real
    t = np.arange(c, c + k, dtype=np.int64)
    span = layout.span_of(t)
    in_span = span >= 0
    compacted = layout.num_closed(c + k)
    closes_here = in_span & (span < compacted)        # compacted by the end of the chunk: never stored
    closing = np.zeros(k, dtype=bool)                 # tokens right after which a span is compacted
    closed_spans = np.arange(layout.num_closed(c), compacted, dtype=np.int64)
    closing[layout.close_token(closed_spans) - c] = True
    num_closings = closed_spans.size

    # Each real token moves right by one (a <CR>) for every compaction earlier in the chunk.
    real_at = (t - c) + (np.cumsum(closing) - closing)
    q = k + num_closings
    kinds = np.full(q, REAL, dtype=np.int64)
    positions = np.empty(q, dtype=np.int64)
    real_index = np.full(q, -1, dtype=np.int64)
    span_index = np.full(q, -1, dtype=np.int64)
    close_at = np.full(q, NEVER, dtype=np.int64)
    slots = np.full(q, -1, dtype=np.int64)

    positions[real_at] = t
    real_index[real_at] = t
    span_index[real_at] = span
    slots[real_at] = np.where(closes_here, -1, layout.slot_of(t, c + k))

    cr_at = real_at[closing] + 1
    kinds[cr_at] = CR
    positions[cr_at] = layout.span_last(closed_spans)
    span_index[cr_at] = closed_spans
    close_at[cr_at] = cr_at
    slots[cr_at] = layout.base(closed_spans)
    if num_closings:
        which = np.searchsorted(closed_spans, span[closes_here])
        close_at[real_at[closes_here]] = cr_at[which]

    move_from, move_to = layout.moves(c, k)
    return ChunkPlan(layout, c, k, layout.physical_len(c), kinds, positions, real_index, span_index,
                     close_at, slots, np.maximum(layout.span_start(closed_spans) - 1, 0), move_from, move_to)


@dataclass
class StepPlan:
    """The whole batch of one step, requests in the worker's batch order.

    Planned in one vectorised pass over every scheduled token (a decode step of 64 requests must
    not cost 64 Python-level plans); it equals concatenating `plan_chunk` over the requests, which
    the tests check. Requests whose chunk closes a span get their `ChunkPlan` on demand (`chunk`),
    for the masked attention path.
    """

    layouts: list[KVLayout]
    computed: np.ndarray        # [R] c: real tokens already cached
    num_real: np.ndarray        # [R] k: real tokens scheduled
    num_closings: np.ndarray    # [R] spans closing in the chunk
    cached_len: np.ndarray      # [R] p(c)
    query_start: np.ndarray     # [R + 1] expanded offsets (query_start_loc)
    positions: np.ndarray       # [N] logical positions
    physical_slots: np.ndarray  # [N] physical slot per token (-1: not stored)
    kinds: np.ndarray           # [N] REAL / CR
    cl_positions: np.ndarray    # [C] logical position of the `<CL>` of each `<CR>`, in batch order
    logits_rows: np.ndarray     # [R] expanded index of each request's last real token
    real_rows: np.ndarray       # [sum k] expanded indices of all real tokens, in order
    kernel_len: np.ndarray      # [R] tokens before each request's first `<CR>` (`ChunkPlan.kernel_len`)

    @classmethod
    def build(cls, layouts: list[KVLayout], computed, num_real) -> "StepPlan":
        if any(layout.marked for layout in layouts):
            return cls.from_chunks(layouts, computed, num_real)
        c = np.asarray(computed, dtype=np.int64)
        k = np.asarray(num_real, dtype=np.int64)
        if (k < 1).any():
            raise ValueError("every planned request needs at least one scheduled token")
        on = np.array([layout.compresses for layout in layouts], dtype=bool)
        sink, span, gap, window = (np.array([getattr(layout, name) for layout in layouts], dtype=np.int64)
                                   for name in ("sink", "span", "gap", "window"))
        period = np.where(on, span + gap, 1)

        # One entry per scheduled real token, with its request's schedule alongside.
        num_total = int(k.sum())
        req = np.repeat(np.arange(len(layouts)), k)
        first = np.cumsum(k) - k
        t = np.arange(num_total) - first[req] + c[req]
        S, L, G, P, W = sink[req], span[req], gap[req], period[req], window[req]
        end = (c + k)[req]

        def compacted(n):  # KVLayout.num_closed, vectorised over requests
            done = n - S - L - W
            return np.where(on[req] & (done >= 0), done // P + 1, 0)

        def ended(x):  # KVLayout.num_ended
            done = x - S - L
            return np.where(on[req] & (done >= 0), done // P + 1, 0)

        offset = t - S
        m = offset // P
        in_span = on[req] & (offset >= 0) & (offset % P < L)
        closes_here = in_span & (m < compacted(end))
        # Token t is some span's close token c_m = S + m*P + L - 1 + W.
        since_first = t - S - L + 1 - W
        closing = on[req] & (since_first >= 0) & (since_first % P == 0)
        closing_span = since_first // P

        real_at = np.arange(num_total) + (np.cumsum(closing) - closing)
        n = num_total + int(closing.sum())
        kinds = np.full(n, REAL, dtype=np.int64)
        positions = np.empty(n, dtype=np.int64)
        slots = np.full(n, -1, dtype=np.int64)
        live_slot = t - (L - 1) * np.minimum(compacted(end), ended(t))
        positions[real_at] = t
        slots[real_at] = np.where(closes_here, -1, live_slot)
        cr_at = real_at[closing] + 1
        mc = closing_span[closing]
        kinds[cr_at] = CR
        positions[cr_at] = S[closing] + mc * P[closing] + L[closing] - 1
        slots[cr_at] = S[closing] + mc * (G[closing] + 1)

        query_start = np.append(real_at[first], n)
        num_closings = np.bincount(req[closing], minlength=len(layouts))
        # A request's first <CR> follows its first closing token: real tokens before it and that one.
        first_closing = np.full(len(layouts), num_total)
        np.minimum.at(first_closing, req[closing], np.flatnonzero(closing))
        kernel_len = np.where(num_closings > 0, first_closing - first + 1, k)
        return cls(layouts, c, k, num_closings,
                   np.array([layout.physical_len(int(x)) for layout, x in zip(layouts, c)], dtype=np.int64),
                   query_start, positions, slots, kinds, np.maximum(S[closing] + mc * P[closing] - 1, 0),
                   real_at[first + k - 1], real_at, kernel_len)

    @classmethod
    def from_chunks(cls, layouts: list[KVLayout], computed, num_real) -> "StepPlan":
        """The same plan from one `plan_chunk` per request: for steps with marked regions, whose
        spans are a list per request rather than a rule the vectorised pass can evaluate."""
        chunks = [plan_chunk(layout, int(c), int(k)) for layout, c, k in zip(layouts, computed, num_real)]
        if any(ch.num_real < 1 for ch in chunks):
            raise ValueError("every planned request needs at least one scheduled token")
        query_start = np.concatenate([[0], np.cumsum([ch.num_tokens for ch in chunks])]).astype(np.int64)
        join = lambda arrays: np.concatenate(arrays).astype(np.int64)  # noqa: E731
        return cls(layouts, np.asarray(computed, dtype=np.int64), np.asarray(num_real, dtype=np.int64),
                   np.array([ch.num_closings for ch in chunks], dtype=np.int64),
                   np.array([ch.cached_len for ch in chunks], dtype=np.int64), query_start,
                   join([ch.positions for ch in chunks]), join([ch.slots for ch in chunks]),
                   join([ch.kinds for ch in chunks]), join([ch.cl_positions for ch in chunks]),
                   query_start[:-1] + np.array([ch.last_real for ch in chunks], dtype=np.int64),
                   join([start + np.flatnonzero(ch.kinds == REAL) for start, ch in zip(query_start, chunks)]),
                   np.array([ch.kernel_len for ch in chunks], dtype=np.int64))

    def chunk(self, row: int) -> ChunkPlan:
        return plan_chunk(self.layouts[row], int(self.computed[row]), int(self.num_real[row]))

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])

    @property
    def masked_rows(self) -> list[int]:
        return np.flatnonzero(self.num_closings).tolist()

    @property
    def num_sentinel_tokens(self) -> int:
        return int((self.kinds != REAL).sum())

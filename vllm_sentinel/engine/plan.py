"""One engine step in the worker: each request's scheduled real tokens, expanded into the stream.

vLLM's scheduler schedules real tokens only (so max_tokens, usage and stop checks never see a
sentinel). For a request's chunk of real tokens [c, c + k), `plan_chunk` inserts `<CL>`, `<CR>`
after every token that closes a span and says, for every token of the expanded chunk, its
logical position, its physical KV slot (-1: never stored) and what `masks.attention_mask` needs
to decide visibility against the cached prefix and the rest of the chunk.

A chunk with no closing is *plain*: its tokens land on consecutive slots right after the cached
prefix, so ordinary causal paged attention over [0, p(c) + k) is exact. Only chunks with a
closing need the masked path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..masks import CL, CR, REAL, attention_mask
from .layout import KVLayout

NEVER = np.iinfo(np.int64).max // 4  # "no <CR> in this chunk closes the token's span"


@dataclass
class ChunkPlan:
    layout: KVLayout
    computed: int            # c: real tokens already in the cache
    num_real: int            # k: real tokens scheduled this step
    cached_len: int          # p(c): physical slots of the cache before this chunk
    kinds: np.ndarray        # [q] REAL / CL / CR
    positions: np.ndarray    # [q] logical (RoPE) positions
    real_index: np.ndarray   # [q] real token index, -1 for sentinels
    span_index: np.ndarray   # [q] span of the token (its <CL>/<CR> too), -1 outside spans
    close_at: np.ndarray     # [q] chunk index of the <CR> closing the token's span, NEVER if none
    slots: np.ndarray        # [q] physical slot the token's KV is written to, -1 if never stored

    @property
    def num_tokens(self) -> int:
        return self.kinds.shape[0]

    @property
    def num_closings(self) -> int:
        return (self.num_tokens - self.num_real) // 2

    @property
    def is_plain(self) -> bool:
        return self.num_tokens == self.num_real

    @property
    def last_real(self) -> int:
        """Chunk index of the last real token: the row whose logits sample the next token."""
        return int(np.flatnonzero(self.kinds == REAL)[-1])

    def visibility(self) -> torch.Tensor:
        """`[q, p(c) + q]` bool: which cached slots and chunk tokens each chunk token attends to.

        The cached prefix is the physical cache in slot order. Everything in it is visible to
        real tokens except the open span's tokens once that span's `<CR>` has gone by in this
        chunk; a `<CR>` sees its own span's cached tokens and nothing else of the cache.
        """
        cached = self.cached_len
        kinds = np.concatenate([np.full(cached, REAL), self.kinds])
        spans = np.concatenate([np.full(cached, -1), self.span_index])
        close = np.concatenate([np.full(cached, NEVER), np.where(self.close_at < NEVER, self.close_at + cached, NEVER)])
        open_span = self.layout.open_span(self.computed)
        if open_span is not None:
            m, num_cached = open_span
            spans[cached - num_cached: cached] = m
            crs = np.flatnonzero((self.kinds == CR) & (self.span_index == m))
            if crs.size:
                close[cached - num_cached: cached] = cached + crs[0]
        return attention_mask(torch.from_numpy(kinds), torch.from_numpy(spans), torch.from_numpy(close),
                              first_query=cached)


def plan_chunk(layout: KVLayout, computed: int, num_real: int) -> ChunkPlan:
    c, k = computed, num_real
    t = np.arange(c, c + k, dtype=np.int64)
    span = layout.span_of(t)
    in_span = span >= 0
    last = np.where(in_span, layout.span_last(np.maximum(span, 0)), -1)
    closes_here = in_span & (last <= c + k - 1)
    closing = in_span & (t == last)
    num_closings = int(closing.sum())

    # Each real token moves right by two (<CL>, <CR>) for every span closed earlier in the chunk.
    real_at = (t - c) + 2 * (np.cumsum(closing) - closing)
    q = k + 2 * num_closings
    kinds = np.full(q, REAL, dtype=np.int64)
    positions = np.empty(q, dtype=np.int64)
    real_index = np.full(q, -1, dtype=np.int64)
    span_index = np.full(q, -1, dtype=np.int64)
    close_at = np.full(q, NEVER, dtype=np.int64)
    slots = np.full(q, -1, dtype=np.int64)

    positions[real_at] = t
    real_index[real_at] = t
    span_index[real_at] = span
    slots[real_at] = np.where(closes_here, -1, layout.slot_of(t))

    closed_spans = span[closing]
    cl_at, cr_at = real_at[closing] + 1, real_at[closing] + 2
    kinds[cl_at], kinds[cr_at] = CL, CR
    positions[cl_at] = np.maximum(layout.span_start(closed_spans) - 1, 0)
    positions[cr_at] = t[closing]
    span_index[cl_at] = span_index[cr_at] = closed_spans
    close_at[cl_at] = close_at[cr_at] = cr_at
    slots[cr_at] = layout.base(closed_spans)
    if num_closings:
        which = np.searchsorted(closed_spans, span[closes_here])
        close_at[real_at[closes_here]] = cr_at[which]

    return ChunkPlan(layout, c, k, layout.physical_len(c), kinds, positions, real_index, span_index,
                     close_at, slots)


@dataclass
class StepPlan:
    """The whole batch of one step, requests in the worker's batch order."""

    chunks: list[ChunkPlan]
    query_start: np.ndarray     # [R + 1] expanded offsets (query_start_loc)
    positions: np.ndarray       # [N]
    physical_slots: np.ndarray  # [N] physical slot per token (-1: not stored)
    kinds: np.ndarray           # [N]
    logits_rows: np.ndarray     # [R] expanded index of each request's last real token
    real_rows: np.ndarray       # [sum k] expanded indices of all real tokens, in order

    @classmethod
    def build(cls, chunks: list[ChunkPlan]) -> "StepPlan":
        sizes = np.array([ch.num_tokens for ch in chunks], dtype=np.int64)
        query_start = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(sizes, out=query_start[1:])
        kinds = np.concatenate([ch.kinds for ch in chunks])
        return cls(
            chunks=chunks,
            query_start=query_start,
            positions=np.concatenate([ch.positions for ch in chunks]),
            physical_slots=np.concatenate([ch.slots for ch in chunks]),
            kinds=kinds,
            logits_rows=np.array([start + ch.last_real for start, ch in zip(query_start, chunks)], dtype=np.int64),
            real_rows=np.flatnonzero(kinds == REAL),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])

    @property
    def masked_rows(self) -> list[int]:
        return [i for i, ch in enumerate(self.chunks) if not ch.is_plain]

    @property
    def num_sentinel_tokens(self) -> int:
        return int((self.kinds != REAL).sum())

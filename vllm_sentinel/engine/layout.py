"""Where each token's KV lives once closed spans are compacted: a pure function of the token count.

For schedule (sink S, span L, gap G, window W), period P = L + G, span m covers real tokens
[S + m*P, S + m*P + L); its last token is j_m = S + m*P + L - 1. The span is seen raw while the
query is at most W tokens past j_m, so the engine *compacts* it (computes its `<CL>`, `<CR>` and
drops its raw KV) right after real token c_m = j_m + W, before the first token that must see the
`<CR>` instead. That is exact because `<CR>` depends only on its `<CL>` and its span (semantics
page, "Recent window"); W = 0 is the paper's rule, compacted as the span closes.

After n real tokens, k(n) = #{m : c_m < n} spans are compacted and the physical cache of a
request holds, in order and without holes:

    sink tokens | <CR>_0, gap_0 | ... | <CR>_{k-1}, gap_{k-1} | raw tokens from span k on

`<CR>_m` takes the slot where span m began, base(m) = S + m*(G + 1); `<CL>` is never stored.
Each compaction removes L - 1 slots, so p(n) = n - (L - 1) * k(n), and a live token t sits at
t - (L - 1) * min(k(n), spans that end at or before t). With W > 0 a compaction moves the raw
tokens after the span (at most W + L of them) left by L - 1 slots; with W = 0 nothing ever moves.
Everything depends on n and the schedule alone: that is what lets the scheduler (which frees
blocks) and the worker (which writes and moves slots) agree without exchanging a message, and
what makes a recomputed request (preemption) land in exactly the same layout.

`KVLayout(None)` is the identity layout of a request with compression off.
"""
from __future__ import annotations

import numpy as np

from ..config import Regions, ScheduleConfig


NO_SPAN = 1 << 60  # "span m does not exist": its start (and so its close token) lies past any request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVLayout:
    """Spans are all L tokens long; where they start is the schedule's rule (sink, then every L + G:
    `tail_from` = S, no explicit starts) or a request's marked regions (explicit `starts`, and with
    `output="schedule"` a periodic tail from the prompt's end). Everything below needs only the count
    of span starts below a position (`starts_below`) and span m's start."""

    def __init__(self, schedule: ScheduleConfig | None, regions: Regions | None = None):
        self.schedule, self.regions = schedule, regions
        if schedule is None:
            self.sink, self.span, self.gap, self.window = 0, 0, 0, 0
        else:
            self.sink, self.span, self.gap = (0 if regions else schedule.sink), schedule.span, schedule.gap
            self.window = getattr(schedule, "window", 0)
        self.period = self.span + self.gap
        if regions is None:
            self.starts, self.tail_from = np.zeros(0, dtype=np.int64), self.sink
        else:
            self.starts = np.asarray(regions.span_starts(schedule), dtype=np.int64)
            self.tail_from = regions.prompt_len if regions.output == "schedule" else None
        self.marked = regions is not None
        self.compresses = schedule is not None
        # Plain attributes, checked first: the scheduler's KV manager asks k(n) of every request
        # several times a step, where a property call per check cost more than stock's allocation.
        self._periodic = self.compresses and not self.marked
        self._close_lag = self.span - 1 + self.window

    @property
    def key(self) -> tuple:
        """What the physical content of a request's blocks depends on besides its tokens (prefix caching)."""
        if not self.compresses:
            return ("sentinel", "off")
        base = ("sentinel", self.sink, self.span, self.gap, self.window)
        return base if not self.marked else (*base, "regions", tuple(self.starts.tolist()), self.tail_from)

    def __repr__(self) -> str:
        return f"KVLayout({self.schedule}{', ' + str(self.regions) if self.marked else ''})"

    # -- spans --------------------------------------------------------------------------------
    def starts_below(self, x):
        """Spans that start before real token x (scalar or array)."""
        if self._periodic:  # the hot path: plain integer arithmetic
            if isinstance(x, np.ndarray):
                return np.where(x > self.tail_from, (x - self.tail_from + self.period - 1) // self.period, 0)
            return (x - self.tail_from + self.period - 1) // self.period if x > self.tail_from else 0
        if not self.compresses:
            return np.zeros_like(x) if isinstance(x, np.ndarray) else 0
        count = np.searchsorted(self.starts, x, side="left")
        if self.tail_from is not None:
            count = count + np.where(np.asarray(x) > self.tail_from,
                                     (np.asarray(x) - self.tail_from + self.period - 1) // self.period, 0)
        return count if isinstance(x, np.ndarray) else int(count)

    def num_closed(self, n):
        """k(n): spans compacted once `n` real tokens are computed (scalar or array): those with
        start + L - 1 + W < n."""
        return self.starts_below(n - self._close_lag)

    def num_ended(self, t):
        """Spans whose last token lies before real token t (scalar or array)."""
        return self.starts_below(t - self.span + 1)

    def num_tokens_with_sentinels(self, computed: int, num_real: int) -> int:
        """Tokens a chunk of `num_real` real tokens after `computed` becomes: one `<CR>` per compaction."""
        return num_real + self.num_closed(computed + num_real) - self.num_closed(computed)

    def span_start(self, m):
        """Where span m starts; `NO_SPAN` past the last span of marked regions without output spans."""
        if not self.marked:
            return self.tail_from + m * self.period
        m = np.asarray(m)
        explicit = len(self.starts)
        later = NO_SPAN if self.tail_from is None else self.tail_from + (m - explicit) * self.period
        start = np.where(m < explicit, self.starts[np.clip(m, 0, explicit - 1)] if explicit else 0, later)
        return start if start.ndim else int(start)

    def span_last(self, m):
        """j_m: the last real token of span m."""
        return self.span_start(m) + self.span - 1

    def close_token(self, m):
        """c_m = j_m + W: the real token right after which span m is compacted."""
        return self.span_last(m) + self.window

    def base(self, m):
        """The physical slot of span m's `<CR>` (where the span began, less the L - 1 slots each of
        the m spans before it gave back)."""
        return self.span_start(m) - (self.span - 1) * m

    def span_of(self, t: np.ndarray) -> np.ndarray:
        """Span index of each real token, -1 for tokens outside every span."""
        t = np.asarray(t)
        if not self.compresses:
            return np.full(t.shape, -1, dtype=np.int64)
        m = self.starts_below(t + 1) - 1  # the last span starting at or before t
        m = np.asarray(m)
        inside = (m >= 0) & (t < self.span_start(np.maximum(m, 0)) + self.span)
        return np.where(inside, m, -1)

    # -- physical positions -------------------------------------------------------------------
    def slot_of(self, t: np.ndarray, n: int) -> np.ndarray:
        """Physical slot of real token t after `n` tokens, while it is live (not in a compacted span)."""
        t = np.asarray(t, dtype=np.int64)
        if not self.compresses:
            return t
        return t - (self.span - 1) * np.minimum(self.num_closed(n), self.num_ended(t))

    def physical_len(self, n: int) -> int:
        """p(n): KV slots a request holds after `n` real tokens (= the next token's visible set)."""
        if not self.compresses:
            return n
        return n - (self.span - 1) * self.num_closed(n)

    def peak_physical_len(self, n: int) -> int:
        """max p(n') over n' <= n: the most slots the request ever held on the way to n.

        p grows by one per token and drops by L - 1 at each compaction; its peaks, reached right
        before each compaction, grow with m, so the last one is the largest."""
        closed = self.num_closed(n)
        before_last = self.close_token(closed - 1) - (self.span - 1) * (closed - 1) if closed else 0
        return max(self.physical_len(n), before_last)

    def step_len(self, computed: int, n: int) -> int:
        """Slots a step from `computed` to `n` real tokens writes below. p(n), and if the step
        compacts, also p(c) plus its real tokens up to the first closing: those tokens see the
        uncompacted cache and themselves, so the kernel attends them there, stored after p(c)
        for the step (backend.py), before the compaction rewrites the tail."""
        if not self.compresses:
            return n
        # k(n) and k(c) once each: the scheduler's KV manager asks this of every request every step.
        closed, closed_before = self.num_closed(n), self.num_closed(computed)
        physical = n - (self.span - 1) * closed  # p(n)
        if closed == closed_before:
            return physical
        first_close = self.close_token(closed_before)
        return max(physical, computed - (self.span - 1) * closed_before + first_close - computed + 1)

    def peak_step_len(self, n: int) -> int:
        """max `step_len` over the steps of any chunking on the way to n real tokens: the peak
        p(c_m) + 1 of the last compaction (its close token stored uncompacted), or p(n)."""
        closed = self.num_closed(n)
        return max(self.peak_physical_len(n), self.peak_physical_len(self.close_token(closed - 1)) + 1 if closed else 0)

    def raw_start(self, n: int) -> int:
        """First real token of the raw (not yet compacted) region after n tokens."""
        if not self.compresses:
            return 0
        closed = self.num_closed(n)
        return self.span_start(closed) if closed else 0

    def cached_spans(self, n: int) -> np.ndarray:
        """`[p(n)]` span index of the token in each cached slot (-1: sink, gap or `<CR>`)."""
        slots = np.arange(self.physical_len(n))
        if not self.compresses:
            return np.full(slots.shape, -1, dtype=np.int64)
        first_raw = self.slot_of(self.raw_start(n), n) if self.num_closed(n) else 0
        tokens = slots + (self.span - 1) * self.num_closed(n)
        spans = self.span_of(tokens)
        return np.where(slots >= first_raw, spans, -1)

    def moves(self, computed: int, num_real: int) -> tuple[np.ndarray, np.ndarray]:
        """(from, to) slots of cached tokens that a chunk's compactions shift left (empty when W = 0)."""
        end = computed + num_real
        empty = np.zeros(0, dtype=np.int64)
        if not self.compresses or self.window == 0 or self.num_closed(end) == self.num_closed(computed):
            return empty, empty
        t = np.arange(self.raw_start(computed), computed, dtype=np.int64)
        span = self.span_of(t)
        live = (span < 0) | (span >= self.num_closed(end))
        t = t[live]
        old, new = self.slot_of(t, computed), self.slot_of(t, end)
        moved = old != new
        return old[moved], new[moved]

    # -- what prefix caching may share (engine/prefix_cache.py) ----------------------------------
    def final_len(self, n: int) -> int:
        """Slots of the state after `n` tokens that no later step rewrites: the sink, the compacted
        `<CR>`s and gaps. From `base(k(n))` on, the next compaction writes a `<CR>` or moves tokens."""
        if not self.compresses:
            return n
        return min(self.physical_len(n), self.base(self.num_closed(n)))

    def final_tokens(self, slots: int) -> int:
        """Real tokens that the first `slots` final slots stand for (each `<CR>` for its whole span)."""
        if not self.compresses or slots <= self.sink:
            return slots
        if not self.marked:
            m, r = divmod(slots - self.sink, self.gap + 1)
            return self.span_start(m) + (self.span + r - 1 if r else 0)
        # m = the number of <CR>s among the first `slots` slots: bases grow by at least one per span
        # (starts are at least L apart), so there are fewer than `slots` of them.
        low, high = 0, slots
        while low < high:
            mid = (low + high) // 2
            if self.base(mid) < slots:
                low = mid + 1
            else:
                high = mid
        m = low
        if m == 0:
            return slots
        return self.span_start(m - 1) + self.span + (slots - self.base(m - 1) - 1)

    def tokens_in_slots(self, slots: int, version: int) -> int:
        """Real tokens that the first `slots` slots stand for in a state with `version` compactions:
        final slots below `base(version)`, one raw token per slot from there."""
        if not self.compresses:
            return slots
        first_raw = self.base(version)
        if slots > first_raw:
            return self.span_start(version) + slots - first_raw
        return self.final_tokens(slots)

    def max_blocks(self, n: int, block_size: int) -> int:
        """The per-request block bound promised to users, for n real tokens."""
        if not self.compresses:
            return cdiv(n, block_size)
        if self.marked:
            return cdiv(self.peak_step_len(n) + 2, block_size) + 1
        s, w = self.schedule, self.window
        steady = s.sink + cdiv(max(n - s.sink - w, 0), s.span + s.gap) * (s.gap + 1) + w + s.span + 2
        return cdiv(steady, block_size) + 1

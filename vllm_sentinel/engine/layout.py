"""Where each token's KV lives once closed spans are compacted: a pure function of the token index.

For schedule (sink S, span L, gap G), period P = L + G, span m covers real tokens
[S + m*P, S + m*P + L) and closes when its last token t_m = S + m*P + L - 1 is computed.
The physical cache of a request keeps, in stream order and without holes:

    sink tokens | <CR>_0, gap_0 | <CR>_1, gap_1 | ... | tokens of the open span

`<CR>_m` takes the slot where span m began, base(m) = S + m*(G + 1); `<CL>` is never stored.
So the physical length after n real tokens, p(n), and the slot of every live token depend on
n and the schedule alone. That is what lets the scheduler (which frees blocks) and the worker
(which writes slots) agree without exchanging a message, and what makes a recomputed request
(preemption) land in exactly the same layout.

`KVLayout(None)` is the identity layout of a request with compression off.
"""
from __future__ import annotations

import numpy as np

from ..config import ScheduleConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVLayout:
    def __init__(self, schedule: ScheduleConfig | None):
        self.schedule = schedule
        if schedule is None:
            self.sink, self.span, self.gap = 0, 0, 0
        else:
            self.sink, self.span, self.gap = schedule.sink, schedule.span, schedule.gap
        self.period = self.span + self.gap

    @property
    def compresses(self) -> bool:
        return self.schedule is not None

    def __repr__(self) -> str:
        return f"KVLayout({self.schedule})"

    # -- spans --------------------------------------------------------------------------------
    def num_closed(self, n):
        """Spans closed once `n` real tokens are computed (scalar or array)."""
        if isinstance(n, np.ndarray):
            if not self.compresses:
                return np.zeros_like(n)
            done = n - self.sink - self.span
            return np.where(done >= 0, done // self.period + 1, 0)
        if not self.compresses or n < self.sink + self.span:
            return 0
        return (n - self.sink - self.span) // self.period + 1

    def num_tokens_with_sentinels(self, computed: int, num_real: int) -> int:
        """Tokens a chunk of `num_real` real tokens after `computed` becomes: two per closing span."""
        return num_real + 2 * (self.num_closed(computed + num_real) - self.num_closed(computed))

    def span_start(self, m):
        return self.sink + m * self.period

    def span_last(self, m):
        """The real token whose computation closes span m."""
        return self.sink + m * self.period + self.span - 1

    def base(self, m):
        """The physical slot of span m's `<CR>` (where the span began)."""
        return self.sink + m * (self.gap + 1)

    def span_of(self, t: np.ndarray) -> np.ndarray:
        """Span index of each real token, -1 for sink and gap tokens."""
        t = np.asarray(t)
        if not self.compresses:
            return np.full(t.shape, -1, dtype=np.int64)
        offset = t - self.sink
        inside = (offset >= 0) & (offset % self.period < self.span)
        return np.where(inside, offset // self.period, -1)

    # -- physical positions -------------------------------------------------------------------
    def slot_of(self, t: np.ndarray) -> np.ndarray:
        """Physical slot of real token t while it is live (before its span closes, if in one)."""
        t = np.asarray(t, dtype=np.int64)
        if not self.compresses:
            return t
        offset = t - self.sink
        m, r = offset // self.period, offset % self.period
        in_span_or_gap = np.where(r < self.span, self.base(m) + r, self.base(m) + 1 + (r - self.span))
        return np.where(offset < 0, t, in_span_or_gap)

    def physical_len(self, n: int) -> int:
        """p(n): KV slots a request holds after `n` real tokens (= the next token's visible set)."""
        if not self.compresses or n <= self.sink:
            return n
        m, r = divmod(n - self.sink, self.period)
        if r < self.span:
            return self.base(m) + r
        return self.base(m) + 1 + (r - self.span)

    def peak_physical_len(self, n: int) -> int:
        """max p(n') over n' <= n: the most slots the request ever held on the way to n."""
        closed = self.num_closed(n)
        before_last_close = self.base(closed - 1) + self.span - 1 if closed else 0
        return max(self.physical_len(n), before_last_close)

    def open_span(self, n: int) -> tuple[int, int] | None:
        """(span index, tokens of it already computed) of the span open after n tokens, if any."""
        if not self.compresses or n <= self.sink:
            return None
        m, r = divmod(n - self.sink, self.period)
        return (m, r) if 0 < r < self.span else None

    def max_blocks(self, n: int, block_size: int) -> int:
        """The per-request block bound promised to users (issue: engine), for n real tokens."""
        if not self.compresses:
            return cdiv(n, block_size)
        s = self.schedule
        steady = s.sink + cdiv(max(n - s.sink, 0), s.span + s.gap) * (s.gap + 1) + s.span + 2
        return cdiv(steady, block_size) + 1

"""Which spans of a token stream get compressed.

A span source answers one question: for a sequence of `num_tokens` real tokens, which complete
spans `[start, end)` (real-token indices, half-open) are compressed? Only spans whose last token
exists are returned: a span closes when its last token has been computed, and an unfinished span
is simply part of the visible context.

- `ScheduledSpans`: the deterministic sink/span/gap rule the engine serves with.
- `MarkedSpans`: a request's marked regions, spans of the schedule's length inside them only.
- `JitteredSpans`: the same rule with random jitter, for training a model robust around it.
- `RandomRegions`: random marked regions and a raw tail, for training a model to read marked prompts.
- `RandomSpans`: the paper's training spans (2..25 tokens) at a target net compression ratio.
"""
from __future__ import annotations

import hashlib
from typing import Protocol

import torch

from .config import Regions, ScheduleConfig


def as_spans(pairs: list[tuple[int, int]] | torch.Tensor) -> torch.Tensor:
    """A `[K, 2]` int64 tensor of (start, end) pairs, validated as sorted and non-overlapping."""
    spans = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    if spans.numel():
        starts, ends = spans[:, 0], spans[:, 1]
        if bool((starts < 0).any()) or bool((ends <= starts).any()):
            raise ValueError(f"spans must satisfy 0 <= start < end, got {spans.tolist()}")
        if bool((starts[1:] < ends[:-1]).any()):
            raise ValueError(f"spans must be sorted and must not overlap, got {spans.tolist()}")
    return spans


class SpanSource(Protocol):
    def spans(self, num_tokens: int) -> torch.Tensor:
        """`[K, 2]` (start, end) of every complete span among `num_tokens` real tokens."""


class ScheduledSpans:
    """Sink S tokens, then spans of L tokens separated by G: a rule of the prefix alone."""

    def __init__(self, schedule: ScheduleConfig):
        self.schedule = schedule

    def num_closed(self, num_tokens: int) -> int:
        s = self.schedule
        if num_tokens < s.sink + s.span:
            return 0
        return (num_tokens - s.sink - s.span) // (s.span + s.gap) + 1

    def closing_span_start(self, index: int) -> int | None:
        """Start of the span whose last token is real token `index`, else None."""
        s = self.schedule
        offset = index + 1 - s.sink - s.span
        if offset < 0 or offset % (s.span + s.gap):
            return None
        return index + 1 - s.span

    def spans(self, num_tokens: int) -> torch.Tensor:
        s = self.schedule
        starts = s.sink + torch.arange(self.num_closed(num_tokens)) * (s.span + s.gap)
        return torch.stack([starts, starts + s.span], dim=1)


class MarkedSpans:
    """A request's marked regions: spans inside them only (and, with `output="schedule"`, after the
    prompt), each of the schedule's L tokens (semantics page, "Marked regions")."""

    def __init__(self, schedule: ScheduleConfig, regions: Regions):
        self.schedule, self.regions = schedule, regions
        self._prompt_starts = regions.span_starts(schedule)

    def _starts(self, num_tokens: int) -> list[int]:
        """Starts of the spans wholly inside the first `num_tokens` tokens."""
        s = self.schedule
        starts = [a for a in self._prompt_starts if a + s.span <= num_tokens]
        if self.regions.output == "schedule":
            starts += range(self.regions.prompt_len, num_tokens - s.span + 1, s.span + s.gap)
        return starts

    def num_closed(self, num_tokens: int) -> int:
        return len(self._starts(num_tokens))

    def closing_span_start(self, index: int) -> int | None:
        """Start of the span whose last token is real token `index`, else None."""
        start = index + 1 - self.schedule.span
        return start if start in self._starts(index + 1)[-1:] else None

    def spans(self, num_tokens: int) -> torch.Tensor:
        starts = torch.tensor(self._starts(num_tokens), dtype=torch.long)
        return torch.stack([starts, starts + self.schedule.span], dim=1)


def _seeded(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _spans_from_lengths(num_tokens: int, sink: int, draw_span, draw_gap) -> torch.Tensor:
    pairs, start = [], sink
    while True:
        end = start + draw_span()
        if end > num_tokens:
            break
        pairs.append((start, end))
        start = end + draw_gap()
    return as_spans(pairs)


class JitteredSpans:
    """The schedule's spans with each sink, span and gap length drawn within +-`jitter` of it.

    Training on exact schedule boundaries only would teach the model one alignment; serving always
    uses the exact rule, which lies inside the jittered family. `draw` also jitters the recent
    window W the same way (at least 0), once per call: one training sample has one window.
    """

    def __init__(self, schedule: ScheduleConfig, jitter: float = 0.25, seed: int = 0):
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.schedule, self.jitter, self.seed = schedule, jitter, seed
        self._calls = 0

    def _around(self, value: int, minimum: int, generator: torch.Generator) -> int:
        spread = round(value * self.jitter)
        return _randint(max(minimum, value - spread), max(minimum, value + spread), generator)

    def draw(self, num_tokens: int) -> tuple[torch.Tensor, int]:
        """The spans among `num_tokens` real tokens and the recent window, for one sample."""
        self._calls += 1
        g = _seeded(self.seed, f"jitter:{self._calls}")
        s = self.schedule
        spans = _spans_from_lengths(num_tokens, self._around(s.sink, 0, g),
                                    lambda: self._around(s.span, 2, g),
                                    lambda: self._around(s.gap, 0, g))
        # Drawn after the spans (and only for W > 0), so W = 0 draws exactly the spans it always did.
        window = self._around(s.window, 0, g) if s.window else 0
        return spans, window

    def spans(self, num_tokens: int) -> torch.Tensor:
        return self.draw(num_tokens)[0]


class RandomRegions:
    """Random marked regions for training: one to three "documents" over a sample, then a raw tail
    (the question) of at least an eighth of it, spans of the schedule's L and G inside the regions
    only (`MarkedSpans`), so a model learns to read a prompt that is partly compressed."""

    def __init__(self, schedule: ScheduleConfig, seed: int = 0):
        self.schedule, self.seed = schedule, seed
        self._calls = 0

    def regions(self, num_tokens: int) -> Regions:
        self._calls += 1
        g = _seeded(self.seed, f"regions:{self._calls}")
        covered = num_tokens - max(1, num_tokens // 8)
        count = _randint(1, 3, g)
        cuts = sorted(torch.randperm(covered + 1, generator=g)[: 2 * count].tolist())
        ranges = tuple((a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b)
        return Regions(ranges, num_tokens)

    def draw(self, num_tokens: int) -> tuple[torch.Tensor, int]:
        """The spans among `num_tokens` real tokens and the recent window, for one sample."""
        return MarkedSpans(self.schedule, self.regions(num_tokens)).spans(num_tokens), self.schedule.window


class RandomSpans:
    """The paper's spans: lengths uniform in [min_len, max_len], gaps set for net ratio `ratio`."""

    def __init__(self, ratio: float, min_len: int = 2, max_len: int = 25, sink: int = 0, seed: int = 0):
        if not 2 <= min_len <= max_len:
            raise ValueError(f"need 2 <= min_len <= max_len, got {min_len}, {max_len}")
        mean_len = (min_len + max_len) / 2
        best = (mean_len - 1) / mean_len
        if not 0.0 < ratio <= best:
            raise ValueError(
                f"ratio {ratio} is out of reach for spans of {min_len}..{max_len} tokens "
                f"(the most back-to-back spans give is {best:.3f}); lower it or raise max_len")
        self.ratio, self.min_len, self.max_len, self.sink, self.seed = ratio, min_len, max_len, sink, seed
        # net ratio = (E[L] - 1) / (E[L] + E[G])  =>  E[G] = (E[L] - 1) / ratio - E[L]
        self.mean_gap = max(0.0, (mean_len - 1) / ratio - mean_len)
        self._calls = 0

    def spans(self, num_tokens: int) -> torch.Tensor:
        self._calls += 1
        g = _seeded(self.seed, f"random:{self._calls}")
        return _spans_from_lengths(num_tokens, self.sink,
                                   lambda: _randint(self.min_len, self.max_len, g),
                                   lambda: _randint(0, round(2 * self.mean_gap), g))

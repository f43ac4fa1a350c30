"""The six methods and, per compression ratio, the schedules that give them the same resident KV.

For a ratio r and a window of n real tokens the budget is B = round((1 - r) * n) keys for the last
query of the window. Every sentinel schedule has the sink S (4) and back-to-back spans (gap 0):
- `sentinel` (the paper, W = 0): the span length L whose last-query key count is nearest B;
- `sentinel_window`: a recent window of W = floor(B * window_fraction) raw tokens (the stated rule:
  half the budget), then the L whose last-query key count is nearest B;
- `local`, `sink` (StreamingLLM: S sinks + the most recent), `scattered`: the plain token sequence,
  each query keeping exactly as many keys as it would under `sentinel_window` (the per-query count
  of `masks.sentinel_kv_budget` with that schedule's spans and W);
- `full`: every key (one model for all ratios).
The actual per-query key counts of every method are measured from its mask and reported.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from ..config import ScheduleConfig
from ..masks import build_stream
from ..schedule import ScheduledSpans

METHODS = ("full", "local", "sink", "scattered", "sentinel", "sentinel_window")
LABELS = {"full": "full attention", "local": "local", "sink": "sink+window", "scattered": "scattered",
          "sentinel": "sentinel W=0", "sentinel_window": "sentinel+W"}
REGIME = {"full": "full", "local": "local", "sink": "sink", "scattered": "scattered", "sentinel": "sentinel",
          "sentinel_window": "sentinel"}
SINK = 4


def last_query_keys(schedule: ScheduleConfig, num_tokens: int) -> int:
    """Keys the last of `num_tokens` real tokens attends to under sentinel compression (itself included)."""
    spans = ScheduledSpans(schedule).spans(num_tokens)
    t = num_tokens - 1
    closed = spans[spans[:, 1] <= t]  # a span whose last token is x_t is still open for x_t
    raw = num_tokens - int((closed[:, 1] - closed[:, 0]).sum())
    seen_raw = closed[(t - (closed[:, 1] - 1)) <= schedule.window] if schedule.window else closed[:0]
    return raw + int((seen_raw[:, 1] - seen_raw[:, 0]).sum()) + (len(closed) - len(seen_raw))


def _nearest_span(target: int, num_tokens: int, sink: int, window: int) -> ScheduleConfig:
    """Back-to-back spans of the length whose last-query key count is nearest `target` (ties: shorter)."""
    best_miss, best = None, None
    for span in range(2, max(3, num_tokens - sink - window + 1)):
        schedule = ScheduleConfig(sink=sink, span=span, gap=0, window=window)
        keys = last_query_keys(schedule, num_tokens)
        if best_miss is not None and keys < target - best_miss:
            break  # longer spans only keep fewer keys
        if best_miss is None or abs(keys - target) < best_miss:
            best_miss, best = abs(keys - target), schedule
    return best


def plan(ratio: float, num_tokens: int, window_fraction: float = 0.5, sink: int = SINK) -> dict:
    """Target budget and each method's schedule (the baselines' spans/W fix their per-query budget)."""
    if not 0 < ratio < 1:
        raise ValueError(f"compression ratio must be in (0, 1), got {ratio}")
    target = round((1 - ratio) * num_tokens)
    if target <= sink + 2:
        raise ValueError(f"ratio {ratio} leaves {target} keys of {num_tokens}: too few for a sink of {sink}; "
                         "use a longer window or a smaller ratio")
    windowed = _nearest_span(target, num_tokens, sink, int(target * window_fraction))
    paper = _nearest_span(target, num_tokens, sink, 0)
    schedules = {"full": None, "local": windowed, "sink": windowed, "scattered": windowed,
                 "sentinel": paper, "sentinel_window": windowed}
    return {"ratio": ratio, "target_keys": target, "schedules": schedules}


def spans_of(schedule: ScheduleConfig | None, num_tokens: int) -> torch.Tensor:
    if schedule is None:
        return torch.zeros(0, 2, dtype=torch.long)
    return ScheduledSpans(schedule).spans(num_tokens)


def keys_per_query(example_mask: torch.Tensor, real_positions: torch.Tensor) -> torch.Tensor:
    """`[n]` keys each real token attends to, read off a (stream) mask."""
    return example_mask[real_positions].sum(dim=1)


def stream_real_positions(input_ids: torch.Tensor, sentinel_ids: tuple[int, int]) -> torch.Tensor:
    return ((input_ids != sentinel_ids[0]) & (input_ids != sentinel_ids[1])).nonzero().squeeze(1)


def describe(schedule: ScheduleConfig | None) -> dict | None:
    return None if schedule is None else asdict(schedule)


def sentinel_keys(schedule: ScheduleConfig, num_tokens: int) -> torch.Tensor:
    """`[n]` per-query key count of a sentinel schedule (for checking `last_query_keys`)."""
    stream = build_stream(torch.zeros(num_tokens, dtype=torch.long), spans_of(schedule, num_tokens), 0, 0,
                          window=schedule.window)
    return stream.mask[stream.real_positions].sum(dim=1)

"""Held-out perplexity of a model under one attention regime, served-schedule exact.

Each window of real tokens is scored as if it were one request: spans follow the schedule from
the window's first token, just as the engine compresses a request from its first token.
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from .batching import batch_loss, build_example, collate
from ..config import ScheduleConfig, SentinelConfig
from ..masks import IGNORE_INDEX
from ..schedule import ScheduledSpans


def windows(token_stream: list[int] | torch.Tensor, window: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of `window` tokens from the front of the stream (deterministic)."""
    ids = torch.as_tensor(token_stream, dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = ids.numel() // window
    if count == 0:
        raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than one window of {window}")
    return list(ids[: count * window].view(count, window))


@torch.no_grad()
def perplexity(model, token_stream, regime: str, config: SentinelConfig, schedule: ScheduleConfig | None = None,
               window: int = 256, max_tokens: int | None = 32_768, batch_size: int = 8,
               seed: int = 0, progress: bool = False) -> float:
    schedule = schedule or config.schedule
    spans = ScheduledSpans(schedule).spans(window)
    generator = torch.Generator().manual_seed(seed)  # the scattered baseline's keep choice
    chunks = windows(token_stream, window, max_tokens)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(chunks), batch_size)
    for first in tqdm(starts, desc=f"perplexity[{regime}]", disable=not progress, leave=False):
        examples = [build_example(c, regime, spans, config.cl_token_id, config.cr_token_id, generator,
                                  window=schedule.window)
                    for c in chunks[first: first + batch_size]]
        batch = collate(examples, pad_id=0, dtype=model.dtype).to(model.device)
        total += float(batch_loss(model, batch, reduction="sum"))
        count += int((batch.labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return math.exp(total / count)

"""Windows of real tokens -> model-ready batches under one attention regime.

Training and evaluation share this, so the model is always scored exactly as it was taught:
- `sentinel`: `<CL>`/`<CR>` inserted around the spans, the sentinel mask (the method);
- `full`: plain causal attention (the uncompressed reference);
- `local` / `scattered`: the paper's baselines, no sentinels, each query keeping exactly the
  number of keys sentinel compression would keep with the same spans;
- `sink`: StreamingLLM's sink + sliding window at the same per-query budget (the sink is where
  the first span starts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import (IGNORE_INDEX, additive_mask, build_stream, local_attention_mask, scattered_attention_mask,
                    sink_window_attention_mask)

REGIMES = ("sentinel", "full", "local", "scattered", "sink")


@dataclass
class Example:
    input_ids: torch.Tensor     # [T]
    position_ids: torch.Tensor  # [T]
    labels: torch.Tensor        # [T] next real token, IGNORE_INDEX where nothing is predicted
    mask: torch.Tensor          # [T, T] bool


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T]
    position_ids: torch.Tensor    # [B, T]
    labels: torch.Tensor          # [B, T]
    attention_mask: torch.Tensor  # [B, 1, T, T] additive

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.labels, self.attention_mask)))


def build_example(real_ids: torch.Tensor, regime: str, spans: torch.Tensor, cl_id: int, cr_id: int,
                  generator: torch.Generator | None = None, window: int = 0) -> Example:
    """One window of real tokens under `regime`; `window` is the schedule's recent window W (the
    baselines keep the same per-query KV budget as sentinel compression with that W)."""
    if regime == "sentinel":
        s = build_stream(real_ids, spans, cl_id, cr_id, window=window)
        return Example(s.input_ids, s.position_ids, s.labels, s.mask)
    n = real_ids.numel()
    labels = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
    labels[:-1] = real_ids[1:]
    if regime == "full":
        mask = torch.ones(n, n, dtype=torch.bool).tril()
    elif regime == "local":
        mask = local_attention_mask(n, spans, window)
    elif regime == "scattered":
        mask = scattered_attention_mask(n, spans, generator, window)
    elif regime == "sink":
        mask = sink_window_attention_mask(n, spans, window)
    else:
        raise ValueError(f"unknown attention regime {regime!r}; choose one of {REGIMES}")
    return Example(real_ids, torch.arange(n), labels, mask)


def collate(examples: list[Example], pad_id: int, dtype: torch.dtype = torch.float32) -> Batch:
    """Right-pad to the longest stream (sentinel counts vary with span jitter)."""
    length = max(e.input_ids.numel() for e in examples)
    size = len(examples)
    input_ids = torch.full((size, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros(size, length, dtype=torch.long)
    labels = torch.full((size, length), IGNORE_INDEX, dtype=torch.long)
    # Padding sees only itself so no softmax row is empty (an all-masked row is NaN in SDPA).
    visible = torch.eye(length, dtype=torch.bool).repeat(size, 1, 1)
    for row, e in enumerate(examples):
        t = e.input_ids.numel()
        input_ids[row, :t], position_ids[row, :t], labels[row, :t] = e.input_ids, e.position_ids, e.labels
        visible[row, :t, :t] = e.mask
    return Batch(input_ids, position_ids, labels, additive_mask(visible, dtype).unsqueeze(1))


def batch_loss(model, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each real token's prediction of the next real token."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   attention_mask=batch.attention_mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction=reduction)

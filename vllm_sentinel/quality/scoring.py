"""Per-token scores under one attention regime, on dense masks in transformers.

- `token_nll`: `[windows, n - 1]` negative log-likelihood of every target x_{t+1} given what query
  x_t may attend to (the same examples training built: `batching.build_example`);
- `distant_targets`: targets that only a method keeping something of the far past can predict: the
  token occurred earlier in the same window (each window lies inside one document) but only before
  the keys that the local method's query sees;
- `span_offsets`: the query's offset inside its span under a schedule (-1 outside every span);
- `greedy_continue`: greedy decoding on a transformers KV cache in stream order with the regime's
  mask (sentinels inserted as spans close); equal to re-running the dense pass at every step;
- `rouge_n`, `rouge_l`: overlap of token ids with the true continuation.
"""
from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from ..training.batching import build_example, collate
from ..masks import IGNORE_INDEX, additive_mask


def examples_for(windows: list[torch.Tensor], regime: str, spans: torch.Tensor, sentinel_ids: tuple[int, int],
                 window: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)  # the scattered baseline's keep choice
    return [build_example(w, regime, spans, *sentinel_ids, generator=generator, window=window) for w in windows]


@torch.no_grad()
def masked_logits(model, examples, batch_size: int, banned_ids: tuple[int, ...] = (), progress=None):
    """Per batch of `examples`: (those examples, their collated batch, fp32 logits), `banned_ids`
    (the sentinels) at -inf, as the engine masks them: a sentinel is never a target nor sampled."""
    model.eval()
    for first in range(0, len(examples), batch_size):
        part = examples[first: first + batch_size]
        batch = collate(part, pad_id=0, dtype=model.dtype)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask, use_cache=False).logits.float()
        if banned_ids:
            logits[..., list(banned_ids)] = float("-inf")
        yield part, batch, logits
        if progress is not None:
            progress.update(len(part))


@torch.no_grad()
def token_nll(model, examples, batch_size: int = 4, progress=None, banned_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """`[len(examples), n - 1]` NLL of each real token's next real token, in real-token order, over
    real tokens only (`banned_ids`: the sentinels)."""
    rows = []
    for part, batch, logits in masked_logits(model, examples, batch_size, banned_ids, progress):
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                                                ignore_index=IGNORE_INDEX, reduction="none").view(batch.labels.shape)
        for row in range(len(part)):
            rows.append(nll[row][batch.labels[row] != IGNORE_INDEX])  # real order; the last real token has none
    return torch.stack(rows)


def perplexity_of(nll: torch.Tensor, where: torch.Tensor | None = None) -> tuple[float | None, int]:
    """(perplexity, tokens); perplexity None when no token is selected."""
    picked = nll if where is None else nll[where]
    count = picked.numel()
    return (math.exp(float(picked.double().mean())) if count else None), count


def distant_targets(windows: list[torch.Tensor], local_keys: torch.Tensor) -> torch.Tensor:
    """`[len(windows), n - 1]` bool: target x_{t+1} occurred before x_{t - keys[t] + 1} (outside what
    local attention's query x_t sees) and not inside it. `local_keys`: `[n]` keys per query."""
    out = []
    n = windows[0].numel()
    t = torch.arange(n - 1)
    first_seen = (t - local_keys[: n - 1] + 1).clamp(min=0)  # oldest key the query x_t sees
    for w in windows:
        target = w[1:]
        same = w.unsqueeze(0) == target.unsqueeze(1)          # [n-1 targets, n keys]
        key = torch.arange(n).unsqueeze(0)
        before = same & (key < first_seen.unsqueeze(1))
        inside = same & (key >= first_seen.unsqueeze(1)) & (key <= t.unsqueeze(1))
        out.append(before.any(dim=1) & ~inside.any(dim=1))
    return torch.stack(out)


def span_offsets(spans: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`[n]` offset of each real token inside its span (0 = first token), -1 outside every span."""
    offsets = torch.full((num_tokens,), -1, dtype=torch.long)
    for start, end in spans.tolist():
        offsets[start:end] = torch.arange(end - start)
    return offsets


@torch.no_grad()
def greedy_continue(model, examples, prefix_len: int, new_tokens: int, banned_ids: tuple[int, ...],
                    sentinel_ids: tuple[int, int]) -> list[list[int]]:
    """Greedy continuations of `prefix_len` real tokens by `new_tokens`, for examples built over
    `prefix_len + new_tokens` real tokens (their tail is a placeholder) with one layout.

    Feeds the stream in order on a KV cache: the prefix in one pass, then each generated token with
    the sentinels that stand before it, each query with its own row of the regime's mask."""
    model.eval()
    ids = torch.stack([e.input_ids for e in examples]).clone()
    positions = torch.stack([e.position_ids for e in examples])
    visible = torch.stack([e.mask for e in examples])
    real = ((ids[0] != sentinel_ids[0]) & (ids[0] != sentinel_ids[1])).nonzero().squeeze(1)
    if real.numel() != prefix_len + new_tokens:
        raise ValueError("examples must hold prefix_len + new_tokens real tokens")
    cache = DynamicCache()

    def step(begin: int, end: int) -> torch.Tensor:
        mask = additive_mask(visible[:, begin:end, :end], model.dtype).unsqueeze(1)
        logits = model(input_ids=ids[:, begin:end], position_ids=positions[:, begin:end], attention_mask=mask,
                       past_key_values=cache, use_cache=True).logits[:, -1].float()
        logits[:, list(banned_ids)] = float("-inf")
        return logits.argmax(dim=-1)

    done = int(real[prefix_len - 1]) + 1
    token = step(0, done)
    generated = [token]
    for i in range(prefix_len, prefix_len + new_tokens - 1):
        position = int(real[i])
        ids[:, position] = token
        token = step(done, position + 1)
        done = position + 1
        generated.append(token)
    return torch.stack(generated, dim=1).tolist()


def _grams(ids: list[int], n: int) -> dict:
    counts = {}
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i: i + n])
        counts[gram] = counts.get(gram, 0) + 1
    return counts


def _f1(overlap: float, candidate: int, reference: int) -> float:
    if not overlap:
        return 0.0
    precision, recall = overlap / candidate, overlap / reference
    return 2 * precision * recall / (precision + recall)


def rouge_n(candidate: list[int], reference: list[int], n: int) -> float:
    """F1 of n-gram counts (ROUGE-n on token ids)."""
    c, r = _grams(candidate, n), _grams(reference, n)
    overlap = sum(min(count, r.get(gram, 0)) for gram, count in c.items())
    return _f1(overlap, sum(c.values()), sum(r.values()))


def rouge_l(candidate: list[int], reference: list[int]) -> float:
    """F1 of the longest common subsequence (ROUGE-L on token ids)."""
    previous = [0] * (len(reference) + 1)
    for a in candidate:
        current = [0]
        for j, b in enumerate(reference):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    return _f1(previous[-1], len(candidate), len(reference))


@torch.no_grad()
def judge_perplexity(judge, prefixes: list[list[int]], continuations: list[list[int]],
                     banned_ids: tuple[int, ...] = ()) -> float:
    """Perplexity of the continuations given their prefixes under `judge` with full attention."""
    judge.eval()
    ids = torch.tensor([p + c for p, c in zip(prefixes, continuations)])
    logits = judge(input_ids=ids).logits[:, :-1].float()
    logits[..., list(banned_ids)] = float("-inf")
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)[:, len(prefixes[0]) - 1:]
    return math.exp(-float(picked.double().mean()))

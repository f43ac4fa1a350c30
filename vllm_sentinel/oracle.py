"""The reference every implementation is checked against, on transformers (CPU, any dtype).

- `dense_logits`: one forward over the full stream with the sentinel mask and logical positions.
- `IncrementalSentinelLM`: token-by-token decoding over a transformers KV cache that really drops
  a span's entries (and its `<CL>`) after `<CR>` is computed: what a serving engine must do.
  With a recent window W the span stays raw in the cache for the W real tokens after its end;
  `<CL>`/`<CR>` are computed (lazily, exact since `<CR>` sees only its `<CL>` and span) and the
  span dropped right after x_{j+W} is fed, before x_{j+W+1}.
Both return the logits of real tokens only; sentinels are never targets and never sampled.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .config import Regions, ScheduleConfig, SentinelConfig
from .families import refusal
from .masks import additive_mask, build_stream
from .schedule import MarkedSpans, ScheduledSpans

_mask_support_checked: set[tuple[str, str]] = set()


class UnsupportedModelError(ValueError):
    pass


def check_custom_mask_support(model) -> None:
    """Refuse models that would silently ignore the sentinel mask.

    A key blocked by the mask must have no effect: the last token's logits with only {first, last}
    visible must equal a two-token forward over exactly those tokens at the same positions.
    """
    model_type = model.config.model_type
    reason = refusal(model_type)
    if reason is not None:
        raise UnsupportedModelError(reason)
    key = (model_type, str(model.config._attn_implementation))
    if key in _mask_support_checked:
        return
    device, dtype = model.device, model.dtype
    ids = torch.arange(6, device=device).unsqueeze(0) % model.config.vocab_size
    visible = torch.zeros(6, 6, dtype=torch.bool, device=device)
    visible.diagonal().fill_(True)
    visible[5, 0] = True
    with torch.no_grad():
        masked = model(input_ids=ids, position_ids=torch.arange(6, device=device).unsqueeze(0),
                       attention_mask=additive_mask(visible, dtype)[None, None], use_cache=False).logits[0, 5]
        # An explicit mask here too: without one, transformers 5 reads the position jump 0 -> 5
        # as the start of a new packed sequence.
        both = torch.ones(2, 2, dtype=torch.bool, device=device).tril()
        pair = model(input_ids=ids[:, [0, 5]], position_ids=torch.tensor([[0, 5]], device=device),
                     attention_mask=additive_mask(both, dtype)[None, None], use_cache=False).logits[0, 1]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not torch.allclose(masked, pair, atol=tolerance, rtol=0):
        raise UnsupportedModelError(
            f"{type(model).__name__} (attn_implementation={key[1]!r}) does not honour a custom 4-D "
            "attention mask; load it with attn_implementation='eager' or 'sdpa'")
    _mask_support_checked.add(key)


@torch.no_grad()
def dense_logits(model, real_ids, spans, config: SentinelConfig, window: int | None = None) -> torch.Tensor:
    """`[n, vocab]` logits of every real token from one masked forward over the full stream.

    `window`: the recent window W of the mask (None: `config.schedule.window`)."""
    check_custom_mask_support(model)
    window = config.schedule.window if window is None else window
    stream = build_stream(real_ids, spans, config.cl_token_id, config.cr_token_id, window=window)
    device = model.device
    logits = model(input_ids=stream.input_ids.to(device)[None],
                   position_ids=stream.position_ids.to(device)[None],
                   attention_mask=additive_mask(stream.mask, model.dtype).to(device)[None, None],
                   use_cache=False).logits[0]
    return logits[stream.real_positions.to(device)]


def mask_sentinels(logits: torch.Tensor, config: SentinelConfig) -> torch.Tensor:
    """Sentinels are never targets, so they must never be sampled."""
    logits = logits.clone()
    logits[..., list(config.sentinel_ids)] = float("-inf")
    return logits


class IncrementalSentinelLM:
    """Decoding with a KV cache that holds exactly what the next real token may attend to.

    With the schedule's recent window W, a span whose last token is x_j stays raw in the cache
    until x_{j+W} has been fed; then its `<CL>` and `<CR>` are computed and the span and `<CL>`
    dropped, so x_{j+W+1} on sees it only through `<CR>` (W = 0: right after x_j, the paper's rule).
    """

    def __init__(self, model, config: SentinelConfig, schedule: ScheduleConfig | None = None,
                 regions: Regions | None = None):
        check_custom_mask_support(model)
        self.model, self.config = model, config
        self.schedule = schedule or config.schedule
        self.spans = ScheduledSpans(self.schedule) if regions is None else MarkedSpans(self.schedule, regions)
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.num_real = 0
        self.cache_len = 0
        self.sentinel_tokens = 0
        # What each cache entry holds: the real index t of x_t, or -1 for a <CR>.
        self.cache_real_index = torch.empty(0, dtype=torch.long)

    def _forward(self, ids: list[int], positions: list[int], visible: torch.Tensor) -> torch.Tensor:
        """Run `ids` over the cache; `visible` is `[len(ids), cache_len + len(ids)]` bool.

        The mask is always explicit: without one, transformers 5 infers packed sequences from the
        (deliberately non-contiguous) position ids.
        """
        device = self.model.device
        mask = additive_mask(visible, self.model.dtype).to(device)[None, None]
        out = self.model(input_ids=torch.tensor([ids], device=device),
                         position_ids=torch.tensor([positions], device=device),
                         attention_mask=mask, past_key_values=self.cache, use_cache=True)
        self.cache_len += len(ids)
        return out.logits[0]

    def _keep(self, index: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        self.cache_len = index.numel()

    def _close_span(self, start: int, end: int) -> None:
        """Compute <CL> and <CR> for span [start, end), then drop the span and <CL> from the cache.

        The span's tokens are wherever the cache holds them (the last `end - start` entries when
        W = 0; followed by up to W later real tokens otherwise); `<CR>` takes the slot of the
        span's first token, the other entries keep their order."""
        before = self.cache_len
        slots = ((self.cache_real_index >= start) & (self.cache_real_index < end)).nonzero().squeeze(1)
        first, last = int(slots[0]), int(slots[-1])
        assert slots.numel() == end - start == last - first + 1, "the span must sit whole and contiguous in the cache"
        visible = torch.zeros(2, before + 2, dtype=torch.bool)
        visible[0, before] = True                        # <CL>: itself only
        visible[1, slots] = True                         # <CR>: span, <CL>, itself
        visible[1, before:] = True
        self._forward([self.config.cl_token_id, self.config.cr_token_id],
                      [max(start - 1, 0), end - 1], visible)
        self.sentinel_tokens += 2
        index = torch.cat([torch.arange(first), torch.tensor([before + 1]), torch.arange(last + 1, before)])
        self._keep(index)
        self.cache_real_index = torch.cat([self.cache_real_index[:first], torch.tensor([-1]),
                                           self.cache_real_index[last + 1:]])

    @torch.no_grad()
    def feed(self, token_id: int) -> torch.Tensor:
        """Append one real token; returns its logits `[vocab]` (the next-token distribution)."""
        index = self.num_real
        # The cache holds exactly this token's visible set.
        everything = torch.ones(1, self.cache_len + 1, dtype=torch.bool)
        logits = self._forward([int(token_id)], [index], everything)[-1]
        self.cache_real_index = torch.cat([self.cache_real_index, torch.tensor([index])])
        self.num_real += 1
        # The span ending at x_{index - W} leaves the window now: x_{index + 1} sees it through <CR>.
        leaving = index - self.schedule.window
        start = self.spans.closing_span_start(leaving) if leaving >= 0 else None
        if start is not None:
            self._close_span(start, leaving + 1)
        return logits

    def prefill(self, real_ids) -> torch.Tensor:
        """`[n, vocab]` logits of each real token, fed one at a time."""
        return torch.stack([self.feed(int(t)) for t in real_ids])

    def generate(self, prompt_ids, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy continuation; returns the new ids and the logits of every real token fed."""
        if not len(prompt_ids):
            raise ValueError("prompt_ids is empty: give at least one token (for example BOS)")
        logits = [self.prefill(prompt_ids)]
        new_ids: list[int] = []
        last = logits[0][-1]
        for step in range(max_new_tokens):
            next_id = int(mask_sentinels(last, self.config).argmax())
            new_ids.append(next_id)
            if step + 1 < max_new_tokens:
                last = self.feed(next_id)
                logits.append(last[None])
        return new_ids, torch.cat(logits)

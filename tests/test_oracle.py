"""The two references agree: real eviction from a KV cache == one dense masked forward."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import SCHEDULES, sentinel_config, tiny_llama
from vllm_sentinel.config import ScheduleConfig
from vllm_sentinel.masks import sentinel_kv_budget
from vllm_sentinel.oracle import IncrementalSentinelLM, UnsupportedModelError, dense_logits
from vllm_sentinel.schedule import ScheduledSpans


def lengths_for(schedule):
    _, span, _ = schedule
    return sorted({1, span - 1, span, span + 1, 333})


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_incremental_eviction_equals_dense(random_llama, schedule):
    config = sentinel_config(schedule)
    g = torch.Generator().manual_seed(sum(schedule))
    for n in lengths_for(schedule):
        ids = torch.randint(0, 128, (n,), generator=g)
        spans = ScheduledSpans(config.schedule).spans(n)
        dense = dense_logits(random_llama, ids, spans, config)
        lm = IncrementalSentinelLM(random_llama, config)
        incremental = lm.prefill(ids)
        assert (dense - incremental).abs().max().item() <= 1e-4, (schedule, n)
        # The cache holds exactly what the next real token may attend to (minus itself).
        assert lm.cache_len == int(sentinel_kv_budget(n + 1, ScheduledSpans(config.schedule).spans(n + 1))[-1]) - 1
        assert lm.sentinel_tokens == 2 * len(spans)


def test_compression_changes_logits(random_llama):
    """Guards the oracle against a mask that silently does nothing."""
    config = sentinel_config((0, 4, 0))
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    compressed = dense_logits(random_llama, ids, ScheduledSpans(config.schedule).spans(40), config)
    full = dense_logits(random_llama, ids, torch.empty(0, 2, dtype=torch.long), config)
    assert torch.allclose(compressed[:4], full[:4], atol=1e-5)  # nothing closed before x_4
    assert (compressed[5:] - full[5:]).abs().max() > 1e-2


def test_generation_never_emits_sentinels():
    model = tiny_llama(seed=1)
    config = sentinel_config((2, 8, 3))
    with torch.no_grad():
        model.lm_head.weight[list(config.sentinel_ids)] *= 50  # make sentinels the model's favourites
    lm = IncrementalSentinelLM(model, config)
    prompt = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    new_ids, logits = lm.generate(prompt, 40)
    assert len(new_ids) == 40 and not set(new_ids) & set(config.sentinel_ids)
    # Generated continuation re-scored densely gives the same logits.
    stream = prompt + new_ids[:-1]
    dense = dense_logits(model, stream, ScheduledSpans(config.schedule).spans(len(stream)), config)
    assert (dense - logits).abs().max().item() <= 1e-4


def test_unsupported_model_types_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=130)).eval()
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        dense_logits(gpt2, [1, 2, 3], [], sentinel_config((0, 4, 0)))


# -- the recent window W ----------------------------------------------------------------------------

def sharp_llama(seed: int = 0, scale: float = 8.0):
    """tiny_llama with q/k projections scaled up (attention logits x scale^2): attention is peaked, so
    one wrong key in a cache (or a wrong mask entry) moves the logits visibly."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= scale
            layer.self_attn.k_proj.weight *= scale
    return model


@pytest.fixture(scope="module")
def sharp_model():
    return sharp_llama()


def windowed(schedule, window):
    config = sentinel_config(schedule)
    return config.with_schedule(ScheduleConfig(*schedule, window))


# (sink, span, gap, window, n): W in {0, 1, 7, 32, 100}; W < L, W = L - 1, W > L, W > L + G (several
# spans raw at once), W not a multiple of the period; n long enough that spans leave the window.
WINDOWED = [
    ((0, 4, 0), 1, 90), ((0, 4, 0), 7, 90), ((4, 16, 0), 7, 150), ((4, 16, 0), 32, 170),
    ((2, 8, 3), 1, 120), ((2, 8, 3), 7, 120), ((2, 8, 3), 32, 150), ((1, 25, 5), 7, 160),
    ((1, 25, 5), 100, 240), ((0, 4, 0), 100, 180), ((4, 16, 0), 0, 120), ((3, 5, 1), 13, 110),
]


@pytest.mark.parametrize("schedule, window, n", WINDOWED)
def test_incremental_eviction_equals_dense_with_a_window(sharp_model, schedule, window, n):
    config = windowed(schedule, window)
    ids = torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n + window))
    spans = ScheduledSpans(config.schedule).spans(n)
    dense = dense_logits(sharp_model, ids, spans, config)
    assert torch.equal(dense, dense_logits(sharp_model, ids, spans, sentinel_config(schedule), window=window))
    lm = IncrementalSentinelLM(sharp_model, config)
    # The cache holds exactly what the next real token may attend to (minus itself), at every step:
    # spans stay raw for W tokens after their end, then shrink to their <CR>.
    budget = sentinel_kv_budget(n + 1, ScheduledSpans(config.schedule).spans(n + 1), window)
    incremental = []
    for m, token in enumerate(ids.tolist(), start=1):
        incremental.append(lm.feed(token))
        assert lm.cache_len == int(budget[m]) - 1, (m, lm.cache_len, int(budget[m]))
    incremental = torch.stack(incremental)
    assert (dense - incremental).abs().max().item() <= 1e-4
    # <CL>/<CR> were computed only for the spans that have left the window (t - j > W for x_n).
    assert lm.sentinel_tokens == 2 * int((spans[:, 1] - 1 + window < n).sum())
    # The recent window really changed something (else this test would prove nothing about it).
    if window and int((spans[:, 1] - 1 + window < n).sum()) and len(spans):
        assert (dense - dense_logits(sharp_model, ids, spans, config, window=0)).abs().max() > 1e-2


@pytest.mark.parametrize("schedule, window", [((4, 16, 0), 7), ((2, 8, 3), 1), ((0, 4, 0), 32)])
def test_the_wrong_window_changes_the_logits_a_lot(sharp_model, schedule, window):
    """Negative control: the comparison above would catch a reference off by one in W."""
    config = windowed(schedule, window)
    n = 150
    ids = torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(7))
    spans = ScheduledSpans(config.schedule).spans(n)
    incremental = IncrementalSentinelLM(sharp_model, config).prefill(ids)
    for wrong in {0, window - 1, window + 1} - {window}:
        off = (incremental - dense_logits(sharp_model, ids, spans, config, window=wrong)).abs().max().item()
        assert off > 5e-2, (wrong, off)  # >= 500x the tolerance the equality test uses
    wrong_lm = IncrementalSentinelLM(sharp_model, config, ScheduleConfig(*schedule, window + 1))
    assert (wrong_lm.prefill(ids) - incremental).abs().max().item() > 5e-2


def test_generation_with_a_window_rescored_densely():
    model = sharp_llama(seed=1)
    config = windowed((2, 8, 3), 5)
    lm = IncrementalSentinelLM(model, config)
    prompt = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    new_ids, logits = lm.generate(prompt, 40)
    assert len(new_ids) == 40 and not set(new_ids) & set(config.sentinel_ids)
    stream = prompt + new_ids[:-1]
    dense = dense_logits(model, stream, ScheduledSpans(config.schedule).spans(len(stream)), config)
    assert (dense - logits).abs().max().item() <= 1e-4

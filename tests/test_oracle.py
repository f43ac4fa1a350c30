"""The two references agree: real eviction from a KV cache == one dense masked forward."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import SCHEDULES, sentinel_config, tiny_llama
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

"""The corpus split, the tokenizer, base pretraining, and make-tiny end to end on a small slice."""
import json
import random
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_sentinel.config import SentinelConfig
from vllm_sentinel.training.corpus import DEFAULT_CORPUS, load_documents, split_documents
from vllm_sentinel.training.pretrain import BASE_VOCAB, BaseModelConfig, heldout_perplexity, pretrain_base, train_tokenizer
from vllm_sentinel.training.tiny import REPORT_FILE, TinyConfig, make_tiny
from vllm_sentinel.training.recipe import TrainConfig


@pytest.fixture(scope="module")
def docs():
    return load_documents(DEFAULT_CORPUS)


def test_split_is_by_document_deterministic_and_order_free(docs):
    train, heldout = split_documents(docs)
    assert heldout and train and not {d.name for d in train} & {d.name for d in heldout}
    assert len(train) + len(heldout) == len(docs)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert {d.name for d in split_documents(shuffled)[1]} == {d.name for d in heldout}
    assert 0.02 < len(heldout) / len(docs) < 0.10


def test_documents_are_prose_without_directive_lines(docs):
    text = "\n".join(d.text for d in docs[:50])
    assert " the " in text and ".. index::" not in text


def test_missing_corpus_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
        load_documents(tmp_path / "nope")


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_tokenizer([d.text for d in docs[:60]])


def test_tokenizer_has_exactly_the_base_vocab_and_round_trips(tokenizer, tmp_path):
    assert len(tokenizer) == BASE_VOCAB
    sample = "Context compression: the <CR> token carries a span, naïvely 100%.\n  Indented."
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(sample, add_special_tokens=False)["input_ids"] == ids


def test_short_pretraining_learns_and_reloads(tokenizer, docs, tmp_path):
    ids = tokenizer("\n".join(d.text for d in docs[:60]), add_special_tokens=False)["input_ids"]
    train_ids, heldout_ids = ids[:-4000], ids[-4000:]
    cfg = BaseModelConfig(hidden_size=128, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=256,
                          seq_len=64, batch_size=8, steps=150)
    untrained = heldout_perplexity(AutoModelForCausalLM.from_config(cfg.llama_config()), heldout_ids, 64)
    model, stats = pretrain_base(cfg, train_ids, heldout_ids)
    assert stats["heldout_perplexity"] < 0.5 * untrained
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.tensor([heldout_ids[:32]])
    assert torch.allclose(model(x).logits, reloaded(x).logits, atol=1e-6)


def micro_tiny() -> TinyConfig:
    return TinyConfig(
        max_documents=80, eval_tokens=4096,
        base=BaseModelConfig(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256,
                             seq_len=128, batch_size=8, steps=80),
        recipe=TrainConfig(seq_len=128, batch_size=8, steps=60, lr=3e-3, eval_every=1000, checkpoint_every=1000))


def test_make_tiny_end_to_end_then_cached(tmp_path):
    report = make_tiny(tmp_path, micro_tiny())
    p = report["perplexity"]
    assert set(p) == {"base_full_attention", "base_compressed_before_training", "sentinel_compressed",
                      "sentinel_full_attention"}
    # The recipe teaches compression even in a few seconds: compressed perplexity falls below the untrained one.
    assert p["sentinel_compressed"] < p["base_compressed_before_training"]
    sentinel = SentinelConfig.load(tmp_path)
    assert sentinel.sentinel_ids == (4096, 4097)
    assert sentinel.schedule == micro_tiny().recipe.schedule
    assert AutoTokenizer.from_pretrained(tmp_path).convert_ids_to_tokens([4096, 4097]) == ["<CL>", "<CR>"]
    started = time.time()
    assert make_tiny(tmp_path, micro_tiny()) == report  # cached
    assert time.time() - started < 1.0
    assert json.loads((tmp_path / REPORT_FILE).read_text())["fingerprint"] == micro_tiny().fingerprint()

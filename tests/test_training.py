"""The training recipe: sentinel rows + LoRA train, merge is exact, resume continues a crashed run."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import tiny_llama
from vllm_sentinel.training import recipe as sentinel_recipe
from vllm_sentinel.config import ScheduleConfig, SentinelConfig
from vllm_sentinel.oracle import dense_logits
from vllm_sentinel.schedule import ScheduledSpans
from vllm_sentinel.training.recipe import TrainConfig, train

VOCAB = 128
# A learnable stream: an arithmetic pattern, so loss must fall if training works.
STREAM = (torch.arange(12_000) * 7 % 97).tolist()


def word_tokenizer():
    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0")


def recipe(**overrides):
    base = dict(schedule=ScheduleConfig(2, 8, 0), seq_len=64, batch_size=4, steps=40, lr=5e-3,
                eval_every=20, checkpoint_every=10, eval_tokens=1024)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sentinel")
    base = tiny_llama(vocab_size=VOCAB)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    log = train(base, word_tokenizer(), STREAM[:10_000], STREAM[10_000:], recipe(), out)
    return out, base_state, log


def test_writes_a_model_transformers_loads_with_its_config(trained):
    out, _, log = trained
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    sentinel = SentinelConfig.load(out)
    sentinel.validate_for(tokenizer, model.config.vocab_size)
    assert sentinel.sentinel_ids == (VOCAB, VOCAB + 1)
    assert sentinel.schedule == ScheduleConfig(2, 8, 0)
    assert model.config.vocab_size == VOCAB + 2
    assert not (out / "checkpoint").exists()
    saved_log = json.loads((out / "train_log.json").read_text())
    assert saved_log["step"] == 40 and saved_log["config"]["schedule"] == {"sink": 2, "span": 8, "gap": 0, "window": 0}
    assert log["log"][-1]["heldout_ppl"] < log["log"][0]["heldout_ppl"]


def test_lora_and_sentinel_rows_trained_everything_else_frozen(trained):
    out, base_state, _ = trained
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = {k for k, v in base_state.items()
               if k in state and (state[k].shape != v.shape or not torch.equal(state[k], v))}
    assert any("q_proj" in k for k in changed) and any("o_proj" in k for k in changed)
    assert not any("mlp" in k or "norm" in k for k in changed), changed
    embed = state["model.embed_tokens.weight"]
    assert torch.equal(embed[:VOCAB], base_state["model.embed_tokens.weight"])
    # The new rows moved away from their mean-embedding start.
    assert not torch.allclose(embed[VOCAB], embed[VOCAB + 1])


def test_merge_preserves_the_trained_function(tmp_path):
    """Logits of the in-memory peft model == logits of the merged, saved, reloaded model."""
    model = tiny_llama(vocab_size=VOCAB)
    captured = {}
    original = sentinel_recipe.merged

    def keep_peft_logits(peft_model):
        sentinel = SentinelConfig(cl_token_id=VOCAB, cr_token_id=VOCAB + 1, schedule=ScheduleConfig(2, 8, 0))
        ids = STREAM[10_000:10_100]
        peft_model.eval()
        captured["logits"] = dense_logits(peft_model, ids, ScheduledSpans(sentinel.schedule).spans(100), sentinel)
        captured["args"] = (ids, sentinel)
        return original(peft_model)

    sentinel_recipe.merged = keep_peft_logits
    try:
        train(model, word_tokenizer(), STREAM[:10_000], STREAM[10_000:], recipe(steps=15), tmp_path)
    finally:
        sentinel_recipe.merged = original
    ids, sentinel = captured["args"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    after = dense_logits(reloaded, ids, ScheduledSpans(sentinel.schedule).spans(100), sentinel)
    assert (after - captured["logits"]).abs().max().item() <= 1e-4


def test_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_batch = sentinel_recipe.WindowSampler.batch

    def crash_at_step_25(self):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt("simulated crash")
        return real_batch(self)

    monkeypatch.setattr(sentinel_recipe.WindowSampler, "batch", crash_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama(vocab_size=VOCAB), word_tokenizer(), STREAM[:10_000], STREAM[10_000:], recipe(), tmp_path)
    saved = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert saved["step"] == 20
    monkeypatch.setattr(sentinel_recipe.WindowSampler, "batch", real_batch)
    resumed = train(tiny_llama(vocab_size=VOCAB), word_tokenizer(), STREAM[:10_000], STREAM[10_000:], recipe(), tmp_path)
    assert resumed["step"] == 40
    assert [e["step"] for e in resumed["log"]] == [20, 40]  # the pre-crash evaluation is kept, not redone
    assert SentinelConfig.load(tmp_path).sentinel_ids == (VOCAB, VOCAB + 1)


def test_bad_regime_and_short_corpus_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown regime 'dense'"):
        train(tiny_llama(vocab_size=VOCAB), word_tokenizer(), STREAM, STREAM, recipe(regime="dense"), tmp_path)
    with pytest.raises(ValueError, match="need more than seq_len"):
        train(tiny_llama(vocab_size=VOCAB), word_tokenizer(), STREAM[:50], STREAM, recipe(), tmp_path / "x")


def test_train_cli_with_a_window_records_it_and_trains_finite(tmp_path):
    """`vllm-sentinel train --window W`: the windowed mask trains (finite loss) and W is recorded."""
    import math

    from vllm_sentinel import cli

    base = tmp_path / "base"
    tiny_llama(vocab_size=VOCAB).save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for doc in range(24):  # the held-out split is by document
        words = STREAM[doc * 400: (doc + 1) * 400]
        (corpus / f"doc{doc:02d}.txt").write_text(" ".join(f"w{i}" for i in words))
    out = tmp_path / "out"
    code = cli.main(["train", "--base", str(base), "--corpus", str(corpus), "--out", str(out),
                     "--sink", "2", "--span", "8", "--gap", "1", "--window", "5", "--seq-len", "48",
                     "--batch-size", "2", "--steps", "4", "--eval-every", "4", "--checkpoint-every", "100"])
    assert code == 0
    written = json.loads((out / "sentinel_config.json").read_text())
    assert written["schedule"] == {"sink": 2, "span": 8, "gap": 1, "window": 5}
    assert SentinelConfig.load(out).schedule == ScheduleConfig(2, 8, 1, 5)
    log = json.loads((out / "train_log.json").read_text())
    assert log["config"]["schedule"]["window"] == 5 and log["step"] == 4
    assert math.isfinite(log["log"][-1]["train_loss"]) and math.isfinite(log["log"][-1]["heldout_ppl"])


def test_window_sampler_uses_a_jittered_window_per_sample():
    """Each sample's mask follows its own jittered W; W = 0 draws the same spans as before."""
    from vllm_sentinel.masks import build_stream

    stream = torch.as_tensor(STREAM[:5000])
    cfg = recipe(schedule=ScheduleConfig(2, 8, 0, 12), batch_size=6)
    sampler = sentinel_recipe.WindowSampler(stream, cfg, (VOCAB, VOCAB + 1))
    reference = sentinel_recipe.JitteredSpans(cfg.schedule, cfg.jitter, seed=cfg.seed)
    plain = sentinel_recipe.JitteredSpans(ScheduleConfig(2, 8, 0), cfg.jitter, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, stream.numel() - cfg.seq_len, (cfg.batch_size,), generator=generator)
    batch = sampler.batch()
    windows = set()
    for row, start in enumerate(starts.tolist()):
        torch.rand((), generator=generator)  # the sampler's random-span coin
        spans, window = reference.draw(cfg.seq_len)
        assert torch.equal(spans, plain.spans(cfg.seq_len))
        windows.add(window)
        s = build_stream(stream[start: start + cfg.seq_len], spans, VOCAB, VOCAB + 1, window=window)
        visible = batch.attention_mask[row, 0, : len(s), : len(s)] == 0
        assert torch.equal(visible, s.mask)
    assert len(windows) > 1 and all(9 <= w <= 15 for w in windows)


def test_every_regime_draws_the_same_windows_in_the_same_order():
    """The quality comparison's "same data order": scattered's kept-token draws must not shift the
    windows later batches draw (they did when both shared one generator)."""
    stream = torch.as_tensor(STREAM[:5000])
    texts = {}
    for regime in ("sentinel", "scattered", "local", "full"):
        sampler = sentinel_recipe.WindowSampler(stream, recipe(regime=regime, schedule=ScheduleConfig(2, 8, 0, 4)),
                                                (VOCAB, VOCAB + 1))
        batches = [sampler.batch() for _ in range(3)]
        texts[regime] = [b.labels[b.labels != -100] for b in batches]
    for regime in ("scattered", "local", "full"):
        for ours, theirs in zip(texts[regime], texts["sentinel"]):
            assert torch.equal(ours, theirs), regime


def test_marked_windows_compress_inside_their_random_regions_only_and_leave_a_raw_tail():
    """`marked_fraction`: a share of the windows trains with random marked regions (documents
    compressed, the question raw); the sampler's batches follow exactly those spans."""
    from vllm_sentinel.masks import build_stream
    from vllm_sentinel.schedule import MarkedSpans, RandomRegions

    schedule = ScheduleConfig(2, 8, 1, 3)
    draws = RandomRegions(schedule, seed=3)
    for _ in range(50):
        regions = draws.regions(64)
        assert regions.ranges and all(b <= 64 - 8 for _, b in regions.ranges)  # the raw tail: an eighth
        spans = MarkedSpans(schedule, regions).spans(64)
        assert all(any(a <= int(s) and int(e) <= b for a, b in regions.ranges) for s, e in spans.tolist())
    first, second = RandomRegions(schedule, seed=3), RandomRegions(schedule, seed=3)
    assert [first.regions(64) for _ in range(5)] == [second.regions(64) for _ in range(5)]  # seeded

    stream = torch.as_tensor(STREAM[:5000])
    cfg = recipe(schedule=schedule, batch_size=6, marked_fraction=1.0, jitter=0.0)
    batch = sentinel_recipe.WindowSampler(stream, cfg, (VOCAB, VOCAB + 1)).batch()
    generator = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, stream.numel() - cfg.seq_len, (cfg.batch_size,), generator=generator)
    reference = RandomRegions(schedule, seed=cfg.seed)
    for row, start in enumerate(starts.tolist()):
        spans, window = reference.draw(cfg.seq_len)
        s = build_stream(stream[start: start + cfg.seq_len], spans, VOCAB, VOCAB + 1, window=window)
        assert torch.equal(batch.attention_mask[row, 0, : len(s), : len(s)] == 0, s.mask)
    plain = sentinel_recipe.WindowSampler(stream, recipe(schedule=schedule, batch_size=6), (VOCAB, VOCAB + 1))
    same = sentinel_recipe.WindowSampler(stream, recipe(schedule=schedule, batch_size=6, marked_fraction=0.0),
                                         (VOCAB, VOCAB + 1))
    assert torch.equal(plain.batch().attention_mask, same.batch().attention_mask)
    with pytest.raises(ValueError, match="over 1"):
        sentinel_recipe.WindowSampler(stream, recipe(random_span_fraction=0.6, marked_fraction=0.6), (VOCAB, VOCAB + 1))

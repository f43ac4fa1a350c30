"""`vllm-sentinel quality`: its parts against plain definitions, and a whole run in miniature.

The figures of the small run mean nothing (a one-layer base, a few steps); it checks that every
part runs, that every method is scored at every ratio on both corpora with matched keys per query,
and that vLLM and transformers agree on the sentinel+W perplexity of the same windows.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from vllm_sentinel.training.batching import build_example
from vllm_sentinel.config import ScheduleConfig
from vllm_sentinel.training.corpus import DEFAULT_CORPUS
from vllm_sentinel.masks import sentinel_kv_budget, sink_window_attention_mask
from vllm_sentinel.training.pretrain import BaseModelConfig
from vllm_sentinel.training.recall import RecallConfig
from vllm_sentinel.quality import METHODS, QualityConfig, format_report, plan, run_quality
from vllm_sentinel.quality.corpora import round_robin_windows, stdlib_files
from vllm_sentinel.quality.methods import last_query_keys, sentinel_keys, spans_of
from vllm_sentinel.quality.scoring import distant_targets, greedy_continue, rouge_l, rouge_n, span_offsets
from vllm_sentinel.schedule import ScheduledSpans


@pytest.mark.parametrize("schedule,window", [((4, 8, 0), 0), ((4, 8, 0), 20), ((2, 5, 3), 7), ((0, 4, 0), 0)])
def test_sink_window_mask_keeps_the_sink_and_the_budget(schedule, window):
    n = 120
    spans = ScheduledSpans(ScheduleConfig(*schedule)).spans(n)
    mask = sink_window_attention_mask(n, spans, window)
    budget = sentinel_kv_budget(n, spans, window)
    assert torch.equal(mask.sum(dim=1), budget)
    sink = schedule[0]
    for t in range(n):
        expected = {k for k in range(t + 1) if k < min(sink, budget[t]) or k > t - (budget[t] - min(sink, budget[t]))}
        assert set(mask[t].nonzero().flatten().tolist()) == expected


def test_plan_matches_the_target_budget_at_the_end_of_the_window():
    for ratio in (0.5, 0.75, 0.9):
        p = plan(ratio, 1024)
        for method in ("sentinel", "sentinel_window"):
            schedule = p["schedules"][method]
            keys = sentinel_keys(schedule, 1024)
            assert int(keys[-1]) == last_query_keys(schedule, 1024)
            assert abs(int(keys[-1]) - p["target_keys"]) <= 0.03 * p["target_keys"]
        assert p["schedules"]["sentinel"].window == 0
        assert p["schedules"]["sentinel_window"].window == p["target_keys"] // 2
        assert p["schedules"]["local"] == p["schedules"]["sink"] == p["schedules"]["sentinel_window"]


def test_distant_targets_follow_the_definition():
    # local keys per query: 3 (x_t sees x_{t-2}..x_t)
    window = torch.tensor([7, 1, 2, 3, 7, 1, 9, 9])
    distant = distant_targets([window], torch.full((8,), 3))[0]
    # target x_4 = 7 seen at x_0 (outside x_1..x_3): distant; x_5 = 1 seen at x_1 (outside x_2..x_4): distant;
    # x_7 = 9 inside x_4..x_6: not distant; x_6 = 9 never before: not distant.
    assert distant.tolist() == [False, False, False, True, True, False, False]


def test_span_offsets_and_rouge():
    assert span_offsets(torch.tensor([[1, 3], [3, 6]]), 7).tolist() == [-1, 0, 1, 0, 1, 2, -1]
    assert rouge_n([1, 2, 3], [1, 2, 3], 2) == 1.0 and rouge_n([1, 2], [3, 4], 1) == 0.0
    assert rouge_l([1, 9, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.75)


@pytest.mark.parametrize("regime,schedule", [("full", None), ("local", (2, 4, 0, 6)), ("sink", (2, 4, 0, 6)),
                                             ("scattered", (2, 4, 0, 6)), ("sentinel", (2, 4, 0, 0)),
                                             ("sentinel", (2, 3, 0, 5))])
def test_cached_greedy_decoding_equals_the_dense_pass(regime, schedule):
    """Each generated token is the argmax of a fresh dense pass over everything so far."""
    model = tiny_llama(vocab_size=130)
    ids = (126, 127)
    n, prefix = 40, 30
    schedule = ScheduleConfig(*schedule) if schedule else None
    spans, window = spans_of(schedule, n), schedule.window if schedule else 0
    prompts = [torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    examples = [build_example(p, regime, spans, *ids, generator=torch.Generator().manual_seed(i), window=window)
                for i, p in enumerate(prompts)]
    generated = greedy_continue(model, examples, prefix, n - prefix, ids, ids)
    for i, (p, tokens) in enumerate(zip(prompts, generated)):
        full = torch.cat([p[:prefix], torch.tensor(tokens)])
        e = build_example(full, regime, spans, *ids, generator=torch.Generator().manual_seed(i), window=window)
        from vllm_sentinel.masks import additive_mask
        with torch.no_grad():
            logits = model(input_ids=e.input_ids[None], position_ids=e.position_ids[None],
                           attention_mask=additive_mask(e.mask)[None, None]).logits[0]
        real = ((e.input_ids != ids[0]) & (e.input_ids != ids[1])).nonzero().flatten()
        logits[:, list(ids)] = float("-inf")
        assert logits[real[prefix - 1: n - 1]].argmax(-1).tolist() == tokens


def test_stdlib_corpus_has_no_tests_and_a_stable_order():
    files = stdlib_files()
    assert len(files) > 300 and files == stdlib_files()
    assert not any("site-packages" in f.parts or "test" in f.parts or f.name.startswith("test_") for f in files)
    windows = round_robin_windows([[1] * 10, [2] * 25, [3] * 4], 5, 4)
    assert [int(w[0]) for w in windows] == [1, 2, 1, 2]


def test_a_small_quality_run(tmp_path):
    base = BaseModelConfig(hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=128,
                           seq_len=128, batch_size=2, steps=2, warmup=1)
    cfg = QualityConfig(base_model=base, corpus=str(DEFAULT_CORPUS / "tutorial"), out=str(tmp_path), window=128,
                        steps=2, batch_size=2, eval_tokens=256, eval_batch=2, continuation_prompts=2,
                        continuation_len=8, vllm_ratio=0.75, vllm_windows=2,
                        recall=RecallConfig(facts=2, queries=2), recall_documents=3)
    report = run_quality(cfg)
    recall = report["recall"]
    assert recall["documents"] == {"documents": 6, "queries": 3 + 3 * 2, "digits": 4, "facts": 2, "asked": 2}
    for row in recall["results"].values():
        assert set(row) == set(METHODS)
        for scores in row.values():
            assert scores["all"]["queries"] == 9
            assert sum(a["queries"] for a in scores["by_place"].values()) == 9
            assert sum(a["queries"] for a in scores["by_bucket"].values()) == 9
    assert set(recall["gate"]["checks"]) and isinstance(recall["gate"]["passed"], bool)
    # documents marked, questions raw: sentinel+W and local attention at the same keys per query
    assert set(recall["marked"]) == set(recall["results"])
    for row in recall["marked"].values():
        assert set(row) == {"sentinel_window", "local"}
        assert all(r["all"]["queries"] == sum(a["queries"] for a in r["by_place"].values()) == 9 for r in row.values())
    assert "documents marked, questions raw" in format_report(report)
    # Every recall answer through vLLM is transformers' greedy answer, whatever the (untrained) model says.
    served = recall["vllm"]
    assert served["greedy_equal_to_transformers"] == served["verdicts_equal"] == served["queries"] == 9
    assert all(h < f for h, f in zip(served["kv_slots_per_request"], served["full_attention_slots_per_request"]))
    assert "recall gate:" in format_report(report) and (tmp_path / "quality-recall.png").stat().st_size > 10_000
    for corpus in ("docs", "stdlib"):
        assert set(report["results"][corpus]) == {"0.5", "0.75", "0.9"}
        for row in report["results"][corpus].values():
            assert set(row) == set(METHODS)
            for scores in row.values():
                assert 1 < scores["perplexity"] < 1e6 and scores["tokens"] == 2 * 127
                assert scores["distant_tokens"] == row["local"]["distant_tokens"]
                assert 0 <= scores["continuation"]["rougeL_f1"] <= 1 and scores["continuation"]["judge_perplexity"] > 1
    for p in report["plan"].values():
        assert p["baselines_match_sentinel_window_per_query"]
        assert abs(p["keys_per_query"]["sentinel"]["last"] - p["target_keys"]) <= max(3, 0.1 * p["target_keys"])
    assert report["vllm_check"]["relative_difference"] < 1e-3
    assert "targets met" in format_report(report)
    assert json.loads((tmp_path / "quality.json").read_text())["config"]["ratios"] == [0.5, 0.75, 0.9]
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    again = run_quality(cfg)  # everything cached: the same figures
    assert again["results"] == report["results"] and again["recall"]["results"] == recall["results"]
    # The user-facing example runs on the run's models: both answers and the KV held are printed.
    example = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "examples" /
                                                  "recall_beyond_window.py"), "--quality-dir", str(tmp_path),
                              "--ratio", "0.75", "--length", "128", "--min-distance", "60"],
                             capture_output=True, text=True, timeout=600)
    assert example.returncode == 0, example.stderr[-3000:]
    assert re.search(r"sentinel\+W through vLLM .*: '.*' (correct|wrong) \| KV held: \d+ slots", example.stdout)
    assert re.search(r"local attention at the same keys per query .*: '.*' (correct|wrong)", example.stdout)

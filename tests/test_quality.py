"""`vllm-sentinel quality` in miniature: one ratio, three fine-tuning steps per model, a few windows.

The figures of a run this small mean nothing; the test checks that every part runs and that vLLM
and transformers agree on the sentinel perplexity of the same windows.
"""
import json

from vllm_sentinel.corpus import DEFAULT_CORPUS
from vllm_sentinel.quality import METHODS, QualityConfig, format_report, run_quality


def test_a_small_quality_run(base_model_dir, tmp_path):
    cfg = QualityConfig(base=str(base_model_dir), corpus=str(DEFAULT_CORPUS / "tutorial"), out=str(tmp_path),
                        steps=3, ratios=(0.9,), window=64, eval_tokens=512, vllm_ratio=0.9,
                        continuation_prompts=4, prefix_len=32, continuation_len=16,
                        recipe_overrides={"batch_size": 2})
    report = run_quality(cfg)
    assert set(report["perplexity"]) == {"full@1.0"} | {f"{m}@0.9" for m in METHODS}
    assert all(1 < value < 10_000 for value in report["perplexity"].values())
    assert report["vllm_check"]["relative_difference"] < 1e-3
    for name in ("compressed", "full attention"):
        scores = report["continuation"][name]
        assert 0 <= scores["rouge1_f1"] <= 1 and scores["judge_perplexity"] > 1
    assert "sentinel beats both baselines at every ratio" in format_report(report)
    assert json.loads((tmp_path / "quality.json").read_text())["config"]["ratios"] == [0.9]
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    for method in METHODS:
        assert (tmp_path / f"{method}-0.9" / "train_log.json").is_file()

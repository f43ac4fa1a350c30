"""`vllm-sentinel soak`, small: 16 clients for half a minute against `vllm serve --attention-backend sentinel`."""
import json
import subprocess
import sys
from pathlib import Path

VLLM_SENTINEL = str(Path(sys.executable).parent / "vllm-sentinel")


def test_a_small_soak_passes(sentinel_model_dir, tmp_path):
    out = tmp_path / "soak"
    result = subprocess.run([VLLM_SENTINEL, "soak", "--model", str(sentinel_model_dir), "--clients", "16",
                             "--minutes", "0.5", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    summary = [line for line in result.stdout.splitlines() if line.startswith("soak: ")]
    assert len(summary) == 1, result.stdout + result.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text())
    assert report["summary"] == summary[0]
    assert (out / "serve.log").exists()
    failures = json.dumps(report["first_failures"], indent=1)[:3000]
    assert report["bad_inputs"]["sent"] >= len(report["bad_inputs"]["one_at_a_time_before_the_load"]) > 0
    assert report["bad_inputs"]["not_4xx"] == [], f"{summary[0]}\n{failures}"
    assert report["bad_inputs"]["got_4xx"] == report["bad_inputs"]["sent"]
    assert report["passed"] and result.returncode == 0, f"{summary[0]}\n{failures}"
    assert report["preemptions"] > 0  # the pool is small enough
    assert report["outcomes"]["dropped"] > 0 and report["outcomes"]["ok"] > 0
    assert set(report["by_compression"]) == {"default", "schedule", "uncompressed"}

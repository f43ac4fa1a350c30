"""Every script in examples/ runs as written (on small models and budgets); openai_stream.py runs in
test_engine_serve.py, next to the server it needs, and recall_beyond_window.py in test_quality.py, on
the models of the small quality run."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_sentinel.training.corpus import DEFAULT_CORPUS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, timeout: int = 900, stderr: bool = False):
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return (result.stdout, result.stderr) if stderr else result.stdout


def test_every_example_is_covered():
    covered = {"offline_generate.py", "ray_batch.py", "train_sentinel.py", "sweep_tiny_base.py", "openai_stream.py",
               "recall_beyond_window.py", "marked_documents.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == covered


def test_offline_generate_shows_the_sentinel_engine_holding_fewer_blocks(sentinel_model_dir):
    out, err = run_example("offline_generate.py", "--model", str(sentinel_model_dir), "--num-prompts", "8",
                           "--max-tokens", "200", "--kv-blocks", "24", "--enforce-eager", stderr=True)
    numbers = {}
    for backend in ("stock", "sentinel"):
        line = re.search(rf"^\s*{backend}: .*$", out, re.M).group(0)
        numbers[backend] = {key: int(value) for key, value in re.findall(r"(peak KV blocks held|preemptions) +(\d+)", line)}
    assert numbers["stock"]["preemptions"] > 0 and numbers["sentinel"]["preemptions"] == 0
    assert numbers["sentinel"]["peak KV blocks held"] < numbers["stock"]["peak KV blocks held"]
    assert "sentinel completion of" in out
    # Our lines, not pages of vLLM's log: that goes to a file.
    assert " INFO " not in out and "[core.py" not in out
    # nor vLLM's known-harmless CPU notices, nor its weight-loading bars, on either stream
    for noise in ("doesn't include CPU backend", "reduce_op", "Loading safetensors checkpoint shards"):
        assert noise not in out + err, noise
    assert "sentinel compression on" in Path("runs/logs/offline_generate.log").read_text()


def test_marked_documents_hold_less_kv_than_the_same_chat_unmarked(sentinel_model_dir):
    out = run_example("marked_documents.py", "--model", str(sentinel_model_dir), "--documents", "2", "--chars", "800",
                      "--max-tokens", "8")
    regions = re.search(r"marked documents are regions (\[\[.*\]\]), the question's (\d+) tokens", out)
    assert regions and len(json.loads(regions.group(1))) == 2 and int(regions.group(2)) > 5
    blocks = {name: int(n) for name, n in re.findall(r"^\s*(documents marked|nothing marked): peak KV blocks held +(\d+)",
                                                       out, re.M)}
    assert set(blocks) == {"documents marked", "nothing marked"}
    assert blocks["documents marked"] < blocks["nothing marked"] / 2
    assert out.count("answer: ") == 2 and " INFO " not in out


@pytest.mark.xdist_group("ray")  # with test_batch.py: one Ray cluster at a time
def test_ray_batch_answers_every_row(sentinel_model_dir):
    out = run_example("ray_batch.py", "--model", str(sentinel_model_dir), "--replicas", "2", "--rows", "8",
                      "--max-tokens", "8", "--enforce-eager")
    lines = [line for line in out.splitlines() if re.match(r"^\d+ ", line)]
    assert [int(line.split()[0]) for line in lines] == list(range(8))
    assert all("Error" not in line for line in lines)


def test_train_sentinel_turns_a_base_model_into_a_sentinel_model(base_model_dir, tmp_path):
    out_dir = tmp_path / "sentinel"
    out = run_example("train_sentinel.py", "--base", str(base_model_dir), "--out", str(out_dir),
                      "--corpus", str(DEFAULT_CORPUS / "tutorial"), "--steps", "3", "--seq-len", "64",
                      "--eval-tokens", "512")
    assert re.search(r"held-out perplexity, full attention: [\d.]+", out)
    assert re.search(r"held-out perplexity, sentinel attention: [\d.]+", out)
    assert (out_dir / "sentinel_config.json").is_file() and (out_dir / "model.safetensors").is_file()


def test_the_base_model_size_sweep_prints_its_table():
    out = run_example("sweep_tiny_base.py", "--steps", "3", "--corpus", str(DEFAULT_CORPUS / "tutorial"))
    table = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 3 and all(float(line.split("|")[-2]) > 1 for line in table)

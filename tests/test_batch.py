"""`vllm-sentinel batch`: Ray Data's vLLM processor over a prompts file, checked against LLM.generate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm import SamplingParams

from engine_helpers import close, make_llm
from vllm_sentinel.batch import read_prompts
from vllm_sentinel.training.corpus import DEFAULT_CORPUS, load_documents

CLI = str(Path(sys.executable).parent / "vllm-sentinel")
ENGINE_FLAGS = ["--dtype", "float32", "--kv-cache-memory-bytes", "64M", "--max-model-len", "1024", "--enforce-eager",
                "--engine-args", json.dumps({"seed": 0})]
MAX_TOKENS = 12
# One Ray cluster at a time: the tests of Ray batches share a pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("ray")


def prompt_texts(count: int) -> list[str]:
    docs = load_documents(DEFAULT_CORPUS / "tutorial")
    text = " ".join(d.text for d in docs)
    return [text[i * 997: i * 997 + 80 + 23 * i] for i in range(count)]


def regions_for(i: int, ids: list[int]) -> list[list[int]] | None:
    """Every sixth row marks regions (every twelfth marks none: nothing of its prompt compressed)."""
    if i % 6:
        return None
    return [] if i % 12 else [[1, len(ids) // 2], [len(ids) // 2 + 3, len(ids)]]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory, sentinel_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sentinel_model_dir)
    lines, expected = [], []  # expected: (id, prompt token ids or None when the line must fail, regions)
    for i, text in enumerate(prompt_texts(52)):
        if i % 3 == 0:  # some rows as token ids, the rest as text
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            line = {"id": f"p{i}", "prompt_token_ids": ids}
            if regions_for(i, ids) is not None:
                line["regions"] = regions_for(i, ids)
            lines.append(json.dumps(line))
        else:
            lines.append(json.dumps({"id": f"p{i}", "prompt": text}))
            ids = tokenizer(text)["input_ids"]
        expected.append((f"p{i}", ids, regions_for(i, ids) if i % 3 == 0 else None))
    lines.insert(10, "{this line is not json")
    expected.insert(10, (11, None, None))
    lines.insert(20, json.dumps({"id": "with-sentinel", "prompt_token_ids": [5, 6, 4097, 8]}))
    expected.insert(20, ("with-sentinel", None, None))
    lines.insert(30, json.dumps({"id": "regions-past-the-prompt", "prompt_token_ids": [5, 6, 7], "regions": [[0, 9]]}))
    expected.insert(30, ("regions-past-the-prompt", None, None))
    lines.insert(31, json.dumps({"id": "regions-not-pairs", "prompt": "x", "regions": [[0, 1, 2]]}))
    expected.insert(31, (32, None, None))
    path = tmp_path_factory.mktemp("batch") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is no prompt
    return path, expected


@pytest.fixture(scope="module")
def references(sentinel_model_dir, prompts_file):
    """LLM.generate on the same prompts: the sentinel engine, and stock vLLM to tell them apart."""
    _, expected = prompts_file
    runnable = [(ids, regions) for _, ids, regions in expected if ids is not None]
    out = {}
    for name, sentinel in (("sentinel", True), ("stock", False)):
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                 extra_args={"sentinel": {"regions": regions}} if sentinel and regions is not None
                                 else None) for _, regions in runnable]
        llm = make_llm(sentinel_model_dir, sentinel=sentinel)
        results = llm.generate([{"prompt_token_ids": ids} for ids, _ in runnable], params, use_tqdm=False)
        out[name] = [list(r.outputs[0].token_ids) for r in results]
        close(llm)
    return out


def run_cli(model_dir, prompts, output, *flags, env=None):
    result = subprocess.run([CLI, "batch", "--model", str(model_dir), "--input", str(prompts), "--output", str(output),
                             "--max-tokens", str(MAX_TOKENS), "--ignore-eos", *ENGINE_FLAGS, *flags],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_reading_the_prompts_file(prompts_file):
    path, expected = prompts_file
    good, bad = read_prompts(path)
    assert len(good) + len(bad) == len(expected)
    assert [row["line"] for row in bad] == [11, 32]
    assert "line 11: " in bad[0]["error"] and '"regions" must be a list of [start, end] pairs' in bad[1]["error"]
    assert sum(row["regions"] is not None for row in good) == 10  # nine rows, and the one past its prompt
    assert json.loads(good[0]["id"]) == "p0" and good[0]["prompt_token_ids"] is not None and good[1]["prompt"]


def test_two_replicas_return_every_row_in_order_equal_to_llm_generate(sentinel_model_dir, prompts_file, references,
                                                                      tmp_path):
    path, expected = prompts_file
    rows = run_cli(sentinel_model_dir, path, tmp_path / "out.jsonl", "--replicas", "2")
    assert [row["id"] for row in rows] == [key for key, *_ in expected]
    assert [row["line"] for row in rows] == list(range(1, len(expected) + 1))
    generated = [row for row, (_, ids, _) in zip(rows, expected) if ids is not None]
    assert all(row["error"] is None for row in generated)
    assert [row["generated_token_ids"] for row in generated] == references["sentinel"]
    assert all(row["num_generated_tokens"] == MAX_TOKENS and row["generated_text"] for row in generated)
    # The replicas really compressed (the plugin ran inside every Ray worker's vLLM): most rows differ
    # from what stock vLLM generates for the same prompt, and every row equals the sentinel engine.
    differ = sum(a != b for a, b in zip(references["sentinel"], references["stock"]))
    assert differ >= len(generated) // 2
    failed = {row["id"]: row["error"] for row in rows if row["error"]}
    assert set(failed) == {11, "with-sentinel", "regions-past-the-prompt", 32}
    assert failed[11].startswith("line 11: ") and "sentinel token <CR>" in failed["with-sentinel"]
    assert "region 0 [0, 9) is out of range" in failed["regions-past-the-prompt"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel 2 needs two CPU cores")
def test_tensor_parallel_two_on_cpu_gives_the_same_rows(sentinel_model_dir, prompts_file, references, tmp_path):
    path, expected = prompts_file
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(path.read_text().splitlines()[:8]) + "\n")
    # The machine's cores shared out between the two ranks, not the one core a test worker's engines bind to.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    rows = run_cli(sentinel_model_dir, small, tmp_path / "out.jsonl", "--tensor-parallel-size", "2", env=env)
    assert [row["generated_token_ids"] for row in rows] == references["sentinel"][:8]


def test_a_missing_input_file_is_reported(sentinel_model_dir, tmp_path):
    result = subprocess.run([CLI, "batch", "--model", str(sentinel_model_dir), "--input", str(tmp_path / "nope.jsonl"),
                             "--output", str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nope.jsonl" in result.stderr

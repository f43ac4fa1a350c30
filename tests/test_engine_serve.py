"""`vllm serve MODEL --attention-backend sentinel` through the `openai` client, as users run it."""
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import ENGINE_MODEL_SCHEDULE
from engine_helpers import Oracle
from vllm_sentinel.bench.serve import free_port, wait_until_healthy
from vllm_sentinel.config import Regions, ScheduleConfig

VLLM = str(Path(sys.executable).parent / "vllm")
DEFAULT = ScheduleConfig(*ENGINE_MODEL_SCHEDULE)
SERVE_ARGS = ["--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", "64M", "--max-model-len", "1024"]


@pytest.fixture(scope="module")
def server(sentinel_model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as sink:
        process = subprocess.Popen([VLLM, "serve", str(sentinel_model_dir), "--attention-backend", "Sentinel",
                                    "--host", "127.0.0.1", "--port", str(port), *SERVE_ARGS],
                                   stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, base + "/health", log, timeout_s=240)
    except RuntimeError as error:
        process.kill()
        pytest.fail(f"{error}:\n{log.read_text()[-3000:]}")
    yield {"base": base, "model": str(sentinel_model_dir), "log": log,
           "client": openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)}
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def no_sentinel_text(text: str) -> bool:
    return "<CL>" not in text and "<CR>" not in text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions(server, stream):
    client, model = server["client"], server["model"]
    prompt = "The Python tutorial explains " * 20  # long enough to close spans in the prompt too
    if stream:
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=40, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        response = client.completions.create(model=model, prompt=prompt, max_tokens=40,
                                             extra_body={"ignore_eos": True})
        text, usage = response.choices[0].text, response.usage
    assert text and no_sentinel_text(text)
    assert usage.completion_tokens == 40


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_completions(server, stream):
    client, model = server["client"], server["model"]
    messages = [{"role": "user", "content": "Explain list comprehensions. " * 10}]
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=30, stream=True,
                                                     extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=30,
                                                  extra_body={"ignore_eos": True})
        text = response.choices[0].message.content
        assert response.usage.completion_tokens == 30
    assert text and no_sentinel_text(text)


def test_per_request_options_over_http(server):
    client, model = server["client"], server["model"]
    for xargs in ({"sentinel_enabled": False}, {"sentinel_span": 8, "sentinel_gap": 2}):
        response = client.completions.create(model=model, prompt="x " * 50, max_tokens=5,
                                             extra_body={"vllm_xargs": xargs})
        assert response.usage.completion_tokens == 5


def oracle_greedy(oracle, prompt, generated, regions):
    """The oracle's greedy continuation of `prompt` over `generated` (its argmax at each step)."""
    reference = oracle.logprobs(prompt + generated, DEFAULT, regions)
    return reference[len(prompt) - 1: -1].argmax(-1).tolist()


@pytest.fixture(scope="module")
def oracle(sentinel_model_dir):
    return Oracle(sentinel_model_dir)


def test_marked_regions_over_http_are_the_ones_served(server, oracle):
    """vllm_xargs carries regions as one flat list [start, end, start, end, ...]; the answer is the
    oracle's over those regions' spans, not the schedule's."""
    client, model = server["client"], server["model"]
    prompt = [random.Random(7).randrange(3, 4096) for _ in range(300)]
    flat = [20, 140, 180, 300]
    response = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True,
                                                     "vllm_xargs": {"sentinel_regions": flat}})
    generated = list(response.choices[0].token_ids)
    regions = Regions(((20, 140), (180, 300)), len(prompt))
    assert generated == oracle_greedy(oracle, prompt, generated, regions)
    schedule_only = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
    assert list(schedule_only.choices[0].token_ids) == oracle_greedy(
        oracle, prompt, list(schedule_only.choices[0].token_ids), None)


def test_chat_messages_marked_compress_become_regions(server, oracle, sentinel_model_dir):
    from transformers import AutoTokenizer

    from vllm_sentinel.engine.marked_messages import marked_chat

    client, model = server["client"], server["model"]
    documents = ["The tutorial explains how lists, tuples and dictionaries hold data. " * 6,
                 "Modules group functions; a package is a directory of modules. " * 6]
    messages = [*({"role": "user", "content": d, "sentinel": "compress"} for d in documents),
                {"role": "user", "content": "Which directory holds modules?"}]
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
    prompt = list(response.prompt_token_ids)
    generated = list(response.choices[0].token_ids)
    ids, regions = marked_chat(AutoTokenizer.from_pretrained(sentinel_model_dir), messages)
    assert ids == prompt and len(regions) == 2  # one region per document; the question stays raw
    question_start = len(prompt) - len(AutoTokenizer.from_pretrained(sentinel_model_dir)(
        "Which directory holds modules?\nassistant:", add_special_tokens=False)["input_ids"])
    assert all(b <= question_start for _, b in regions)
    marked = Regions(tuple(map(tuple, regions)), len(prompt))
    assert generated == oracle_greedy(oracle, prompt, generated, marked)


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "user", "content": "doc", "sentinel": "squash"}]}, "the allowed marks are"),
    ({"messages": [{"role": "user", "content": "doc", "sentinel": "compress"}],
      "vllm_xargs": {"sentinel_regions": [0, 1]}}, "not both"),
])
def test_bad_chat_marks_get_400(server, body, message):
    client, model = server["client"], server["model"]
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model=model, messages=body["messages"], max_tokens=3,
                                       extra_body={"vllm_xargs": body["vllm_xargs"]} if "vllm_xargs" in body else None)


@pytest.mark.parametrize("body, message", [
    ({"prompt": [5, 6, 4097, 7]}, "sentinel token <CR>"),
    ({"prompt": "x", "vllm_xargs": {"sentinel_span": 1}}, "sentinel_span=1 is out of range"),
    ({"prompt": "x", "vllm_xargs": {"sentinel_span": 2 ** 63}}, "sentinel_span=9223372036854775808 is out of range"),
    ({"prompt": "x", "vllm_xargs": {"sentinel_span": 2 ** 62, "sentinel_gap": 2 ** 62}}, "is out of range"),
    ({"prompt": "x", "vllm_xargs": {"sentinel_span": "8"}}, "sentinel_span='8' is not an integer"),
    ({"prompt": "x", "vllm_xargs": {"sentinel_span": 8.5}}, "sentinel_span=8.5 is not an integer"),
    ({"prompt": "x", "vllm_xargs": {"sentinel_colour": 1}}, "unknown sentinel option"),
    ({"prompt": "x", "allowed_token_ids": [4096, 4097]}, "holds only sentinel ids"),
    ({"prompt": [5, 10 ** 9]}, "out of vocabulary"),
    ({"prompt": [5, 6, 7], "vllm_xargs": {"sentinel_regions": [0, 4]}}, r"\[0, 4\) is out of range.*<= 3"),
    ({"prompt": [5, 6, 7], "vllm_xargs": {"sentinel_regions": [0, 2, 1]}}, "even number of offsets"),
    ({"prompt": "x y z", "vllm_xargs": {"sentinel_regions": [2, 3, 0, 1]}}, "must be sorted"),
    ({"prompt": "x", "vllm_xargs": {"sentinel_output": "schedule"}}, "give sentinel_regions too"),
])
def test_bad_requests_get_400_and_the_server_serves_on(server, body, message):
    client, model = server["client"], server["model"]
    extra = {k: v for k, v in body.items() if k != "prompt"}
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(model=model, prompt=body["prompt"], max_tokens=4, extra_body=extra or None)
    assert client.completions.create(model=model, prompt="still serving", max_tokens=3).usage.completion_tokens == 3


def test_the_text_of_a_sentinel_is_served_as_text(server):
    client, model = server["client"], server["model"]
    response = client.completions.create(model=model, prompt="map <CR> to save, match <CL>", max_tokens=4,
                                         extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 4


def metric(text: str, name: str) -> float:
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)]
    assert values, f"{name} not in /metrics"
    return sum(values)


def test_counters_reach_metrics_and_the_log(server):
    client, model = server["client"], server["model"]
    client.completions.create(model=model, prompt="a b c d " * 40, max_tokens=64, extra_body={"ignore_eos": True})
    time.sleep(1)
    text = urllib.request.urlopen(server["base"] + "/metrics", timeout=10).read().decode()
    assert metric(text, "vllm:sentinel_spans_closed_total") > 0
    assert metric(text, "vllm:sentinel_tokens_total") == metric(text, "vllm:sentinel_spans_closed_total")
    assert metric(text, "vllm:sentinel_kv_blocks_freed_total") >= 0
    assert "vllm:kv_cache_usage_perc" in text  # vLLM's own metrics are still there
    deadline = time.time() + 20  # vLLM logs stats every 5 s
    while "Sentinel:" not in server["log"].read_text() and time.time() < deadline:
        time.sleep(1)
    assert re.search(r"Sentinel: \d+ spans closed, \d+ sentinel tokens", server["log"].read_text())


def test_the_api_server_module_accepts_the_backend_and_a_missing_config_is_explained(sentinel_model_dir, tmp_path):
    for path in sentinel_model_dir.iterdir():
        if path.name != "sentinel_config.json":
            shutil.copy(path, tmp_path / path.name)
    result = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path),
                             "--attention-backend", "sentinel", *SERVE_ARGS],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{tmp_path}/sentinel_config.json not found" in output and "vllm-sentinel train" in output


def test_the_openai_streaming_example_runs_against_the_server(server):
    example = Path(__file__).resolve().parent.parent / "examples" / "openai_stream.py"
    result = subprocess.run([sys.executable, str(example), "--base-url", server["base"] + "/v1",
                             "--model", server["model"], "--max-tokens", "16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "completion: " in result.stdout and "chat: " in result.stdout and "without compression: " in result.stdout
    assert no_sentinel_text(result.stdout)

"""`vllm serve MODEL --attention-backend sentinel` through the `openai` client, as users run it."""
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from vllm_sentinel.bench.serve import free_port, wait_until_healthy

VLLM = str(Path(sys.executable).parent / "vllm")
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

"""`vllm-sentinel soak`: no request can hurt the server.

Starts `vllm serve MODEL --attention-backend sentinel` on a KV pool small enough that requests get
preempted, then drives it from N concurrent client loops (asyncio + httpx, 127.0.0.1 only) for T
minutes with a reproducible random mix: completions and chat completions of random prompt and
output lengths (text prompts include the text `<CR>` / `<CL>`, which is ordinary characters),
per-request schedules and compression off (`vllm_xargs`), whole streams, streams dropped after a
few chunks, requests given a short client timeout, and a stream of bad inputs.
Every bad input is also sent once, one at a time, before the load, so that one which kills the
server is named. Then it checks:

- no request failed that should have succeeded: every good request that was not dropped or timed
  out on purpose got a 200 with exactly `max_tokens` completion tokens (`ignore_eos`);
- every bad input got a 4xx (and never a 5xx or a dead connection);
- the server still answers /health and its process is alive;
- `vllm:num_requests_running`, `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` on
  /metrics return to 0;
- a greedy reference completion (compression on and off) is identical before and after.

It prints one summary line and writes `soak.json` (with `passed`) and the server's log `serve.log`
under the output directory.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from .serve import VLLM, free_port, wait_until_healthy

HOST = "127.0.0.1"
MAX_FAILURES_KEPT = 20
REFERENCE_PROMPT = "The Python tutorial explains how to open a file, read it line by line and"
WORDS = ("the file list dict string module class function return import value object method loop "
         "error exception with open read write print format number index key iterator generator "
         "lambda tuple set default argument keyword buffer socket thread async await path").split()
# The sentinels' text in a prompt is ordinary characters (a vim mapping, a regex), never a sentinel id.
WORDS += ["<CR>", "<CL>", "nnoremap x :w<CR>", "<CL>a<CR>"]
# Share of requests of each kind (the rest of a draw), and of each compression choice for good ones.
KINDS = {"complete": 0.32, "chat": 0.14, "stream": 0.10, "stream_drop": 0.14, "timeout": 0.12, "bad": 0.18}
FLAVOURS = {"default": 0.6, "schedule": 0.2, "uncompressed": 0.2}


@dataclass
class SoakConfig:
    model: str
    clients: int = 256
    minutes: float = 10.0              # of load, after the server is up and the references are taken
    seed: int = 0
    max_requests: int = 1_000_000      # across all clients: the load stops at this count or the time
    kv_blocks: int = 24                # the KV pool (--num-gpu-blocks-override): small, so requests get preempted
    block_size: int = 32
    max_model_len: int = 512
    max_prompt_tokens: int = 256       # random prompts: 1 .. this many tokens (text prompts about as long)
    max_output_tokens: int = 128       # random max_tokens: 1 .. this many
    out: str = "runs/soak"
    port: int = 0                      # 0: a free one
    request_timeout_s: float = 600.0   # what a good request may take, queueing included, before it counts as failed
    short_timeout_s: tuple[float, float] = (0.05, 1.0)  # the client timeouts of the `timeout` kind
    drain_timeout_s: float = 30.0      # for the gauges to return to 0 after the load
    startup_timeout_s: float = 300.0
    reference_tokens: int = 32
    serve_args: tuple[str, ...] = ("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", "64M")
    probe_bad_inputs: bool = True      # send every bad input once, one at a time, before the load
    max_failures: int = 500            # stop the load early once this many requests failed (the run has failed)
    progress: bool = True              # a tqdm bar on stderr

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


# -- the requests ----------------------------------------------------------------------------------

@dataclass
class ModelFacts:
    name: str
    cl_token_id: int
    cr_token_id: int

    @classmethod
    def read(cls, model: str) -> "ModelFacts":
        data = json.loads((Path(model) / "sentinel_config.json").read_text())
        return cls(model, int(data["cl_token_id"]), int(data["cr_token_id"]))

    @property
    def max_plain_id(self) -> int:
        """Ids below this are ordinary tokenizer tokens (the sentinels are appended to the tokenizer)."""
        return min(self.cl_token_id, self.cr_token_id)


def bad_inputs(facts: ModelFacts, max_model_len: int) -> dict[str, tuple[str, dict]]:
    """Name -> (endpoint, body): requests the contract answers with a 4xx, the server serving on."""
    model, cl, cr = facts.name, facts.cl_token_id, facts.cr_token_id

    def completion(**fields) -> tuple[str, dict]:
        return "/v1/completions", {"model": model, "prompt": "x y z", "max_tokens": 4, **fields}

    def xargs(**values) -> tuple[str, dict]:
        return completion(vllm_xargs=values)

    return {
        "sentinel_span 2**63": xargs(sentinel_span=2**63),
        "sentinel_span 2**62, sentinel_gap 2**62": xargs(sentinel_span=2**62, sentinel_gap=2**62),
        'sentinel_span "8" (a string)': xargs(sentinel_span="8"),
        "sentinel_span 8.5": xargs(sentinel_span=8.5),
        "sentinel_span true": xargs(sentinel_span=True),
        "sentinel_span null": xargs(sentinel_span=None),
        "sentinel_span 0": xargs(sentinel_span=0),
        "sentinel_span 1": xargs(sentinel_span=1),
        "sentinel_span -3": xargs(sentinel_span=-3),
        "unknown key sentinel_spam": xargs(sentinel_spam=8),
        "sentinel_span > max_model_len": xargs(sentinel_span=max_model_len + 1),
        "sentinel ids in prompt_token_ids": completion(prompt=[5, cl, 6, cr, 7]),
        "token id 10**9": completion(prompt=[5, 6, 10**9]),
        "empty prompt": completion(prompt=""),
        "max_tokens -1": completion(max_tokens=-1),
        "allowed_token_ids only the sentinels": completion(allowed_token_ids=[cl, cr]),
        "logprobs 10**6": completion(logprobs=10**6),
        "chat: top_logprobs 10**6": ("/v1/chat/completions", {
            "model": model, "max_tokens": 4, "logprobs": True, "top_logprobs": 10**6,
            "messages": [{"role": "user", "content": "hello"}]}),
    }


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _text(rng: random.Random, max_tokens: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max(1, max_tokens // 2))))


def good_request(rng: random.Random, kind: str, facts: ModelFacts, config: SoakConfig) -> tuple[str, dict, str]:
    """(endpoint, body, compression flavour) of one request that must succeed."""
    max_tokens = rng.randint(1, config.max_output_tokens)
    body: dict = {"model": facts.name, "max_tokens": max_tokens, "ignore_eos": True,
                  "temperature": rng.choice([0.0, 0.7, 1.0])}
    if kind == "chat":
        endpoint = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": _text(rng, config.max_prompt_tokens // 2)}]
    else:
        endpoint = "/v1/completions"
        if rng.random() < 0.5:
            length = rng.randint(1, config.max_prompt_tokens)
            body["prompt"] = [rng.randrange(facts.max_plain_id) for _ in range(length)]
        else:
            body["prompt"] = _text(rng, config.max_prompt_tokens)
    if kind in ("stream", "stream_drop"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if kind == "stream_drop":
        body["max_tokens"] = max(body["max_tokens"], 16)  # more chunks than are read before the drop
    flavour = _pick(rng, FLAVOURS)
    if flavour == "uncompressed":
        body["vllm_xargs"] = {"sentinel_enabled": False}
    elif flavour == "schedule":
        choice = {"sentinel_span": rng.randint(2, 32), "sentinel_gap": rng.randint(0, 4),
                  "sentinel_sink": rng.randint(0, 8)}
        keys = rng.sample(sorted(choice), rng.randint(1, 3))
        body["vllm_xargs"] = {k: choice[k] for k in keys}
    return endpoint, body, flavour


@dataclass
class Outcome:
    kind: str
    outcome: str            # ok | dropped | timed_out | bad_4xx | failure
    status: int | None = None
    case: str | None = None  # the bad input's name, or the compression flavour
    detail: str = ""


def _completion_tokens(payload: dict) -> int | None:
    usage = payload.get("usage") or {}
    return usage.get("completion_tokens")


async def send(http, base: str, kind: str, endpoint: str, body: dict, case: str | None,
               config: SoakConfig, rng: random.Random) -> Outcome:
    import httpx

    url = base + endpoint
    want = body.get("max_tokens")
    try:
        if kind in ("stream", "stream_drop"):
            drop_after = rng.randint(1, 4) if kind == "stream_drop" else None
            chunks, usage = 0, None
            async with http.stream("POST", url, json=body, timeout=config.request_timeout_s) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    return Outcome(kind, "failure", response.status_code, case, text[:500])
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    payload = json.loads(data)
                    if "error" in payload:
                        return Outcome(kind, "failure", 200, case, f"error event in the stream: {data[:500]}")
                    usage = _completion_tokens(payload) if payload.get("usage") else usage
                    chunks += 1
                    if drop_after is not None and chunks >= drop_after:
                        return Outcome(kind, "dropped", 200, case)  # leaving the block closes the connection
            if drop_after is not None:
                return Outcome(kind, "failure", 200, case, f"the stream ended after {chunks} chunks")
            if usage != want:
                return Outcome(kind, "failure", 200, case, f"{usage} completion tokens streamed, wanted {want}")
            return Outcome(kind, "ok", 200, case)
        timeout = rng.uniform(*config.short_timeout_s) if kind == "timeout" else config.request_timeout_s
        response = await http.post(url, json=body, timeout=timeout)
    except httpx.TimeoutException as error:
        if kind == "timeout":
            return Outcome(kind, "timed_out", None, case)
        return Outcome(kind, "failure", None, case, f"client timeout: {error!r}")
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return Outcome(kind, "failure", None, case, repr(error)[:500])
    if kind == "bad":
        if 400 <= response.status_code < 500:
            return Outcome(kind, "bad_4xx", response.status_code, case)
        return Outcome(kind, "failure", response.status_code, case, response.text[:500])
    if response.status_code != 200:
        return Outcome(kind, "failure", response.status_code, case, response.text[:500])
    try:
        payload = response.json()
        got, finish = _completion_tokens(payload), payload["choices"][0].get("finish_reason")
    except (ValueError, KeyError, IndexError) as error:
        return Outcome(kind, "failure", 200, case, f"{error!r}: {response.text[:400]}")
    if got != want or finish != "length":
        return Outcome(kind, "failure", 200, case, f"{got} completion tokens (finish {finish}), wanted {want}")
    return Outcome(kind, "ok", 200, case)


# -- the server ------------------------------------------------------------------------------------

def start_server(config: SoakConfig, port: int, log: Path) -> subprocess.Popen:
    command = [VLLM, "serve", config.model, "--attention-backend", "sentinel", "--host", HOST, "--port", str(port),
               "--block-size", str(config.block_size), "--num-gpu-blocks-override", str(config.kv_blocks),
               "--max-model-len", str(config.max_model_len), *config.serve_args]
    with open(log, "w") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        sink.flush()
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value summed over label sets} (one engine: one label set each)."""
    values: dict[str, float] = defaultdict(float)
    for match in re.finditer(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})? (\S+)$", text, re.M):
        try:
            values[match.group(1)] += float(match.group(2))
        except ValueError:
            pass
    return dict(values)


def metric(values: dict[str, float], name: str) -> float | None:
    for key in (name, name + "_total"):
        if key in values:
            return values[key]
    return None


async def scrape(http, base: str) -> dict[str, float]:
    response = await http.get(base + "/metrics", timeout=30)
    response.raise_for_status()
    return parse_metrics(response.text)


async def healthy(http, base: str, timeout: float = 10) -> bool:
    import httpx

    try:
        return (await http.get(base + "/health", timeout=timeout)).status_code == 200
    except httpx.HTTPError:
        return False


async def serves(http, base: str, facts: ModelFacts) -> bool:
    """/health answers and a small good request gets its tokens (a dead engine can leave /health at 200)."""
    import httpx

    if not await healthy(http, base):
        return False
    body = {"model": facts.name, "prompt": "still serving", "max_tokens": 2, "ignore_eos": True}
    try:
        response = await http.post(base + "/v1/completions", json=body, timeout=120)
        return response.status_code == 200 and _completion_tokens(response.json()) == 2
    except (httpx.HTTPError, ValueError):
        return False


async def reference(http, base: str, facts: ModelFacts, config: SoakConfig) -> dict:
    """Greedy completions of a fixed prompt, compression on and off: text and token ids."""
    import httpx

    result = {}
    for name, xargs in (("compressed", None), ("uncompressed", {"sentinel_enabled": False})):
        body = {"model": facts.name, "prompt": REFERENCE_PROMPT, "max_tokens": config.reference_tokens,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
        if xargs:
            body["vllm_xargs"] = xargs
        try:
            response = await http.post(base + "/v1/completions", json=body, timeout=config.request_timeout_s)
        except httpx.HTTPError as error:
            result[name] = {"error": repr(error)}
            continue
        if response.status_code != 200:
            result[name] = {"error": f"HTTP {response.status_code}: {response.text[:300]}"}
            continue
        choice = response.json()["choices"][0]
        result[name] = {"text": choice.get("text"), "token_ids": choice.get("token_ids")}
    return result


# -- the run ---------------------------------------------------------------------------------------

class Tally:
    def __init__(self) -> None:
        self.outcomes: Counter = Counter()
        self.by_kind: dict[str, Counter] = defaultdict(Counter)
        self.by_flavour: dict[str, Counter] = defaultdict(Counter)
        self.bad_cases: dict[str, Counter] = defaultdict(Counter)
        self.failures: list[dict] = []
        self.num_failures = 0

    def add(self, result: Outcome, phase: str) -> None:
        self.outcomes[result.outcome] += 1
        self.by_kind[result.kind][result.outcome] += 1
        if result.kind == "bad":
            self.bad_cases[result.case][str(result.status)] += 1
        elif result.case:
            self.by_flavour[result.case][result.outcome] += 1
        if result.outcome == "failure":
            self.num_failures += 1
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append({"phase": phase, **asdict(result)})

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())


async def _soak(config: SoakConfig, base: str, process: subprocess.Popen, facts: ModelFacts) -> dict:
    import httpx
    from tqdm import tqdm

    bad = bad_inputs(facts, config.max_model_len)
    bad_names = list(bad)
    tally = Tally()
    report: dict = {"preload_bad_inputs": {}}
    limits = httpx.Limits(max_connections=config.clients + 16, max_keepalive_connections=config.clients + 16)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as http:
        report["reference_before"] = await reference(http, base, facts, config)
        metrics_before = await scrape(http, base)

        stop_reason: str | None = None
        down_during_load = False
        if config.probe_bad_inputs:
            for name in bad_names:
                endpoint, body = bad[name]
                result = await send(http, base, "bad", endpoint, body, name, config, random.Random(0))
                tally.add(result, "probe")
                report["preload_bad_inputs"][name] = result.status
                if not await serves(http, base, facts):
                    stop_reason = f"the server stopped serving after the bad input {name!r}"
                    break

        stop = asyncio.Event()
        if stop_reason:
            stop.set()
        deadline = time.monotonic() + config.minutes * 60
        issued = 0

        async def client_loop(client: int) -> None:
            nonlocal issued, stop_reason
            rng = random.Random(config.seed * 1_000_003 + client)
            bad_sent = 0
            while not stop.is_set() and time.monotonic() < deadline and issued < config.max_requests:
                issued += 1
                kind = _pick(rng, KINDS)
                if kind == "bad":
                    name = bad_names[(client + bad_sent * config.clients) % len(bad_names)]
                    bad_sent += 1
                    endpoint, body = bad[name]
                    result = await send(http, base, kind, endpoint, body, name, config, rng)
                else:
                    endpoint, body, flavour = good_request(rng, kind, facts, config)
                    result = await send(http, base, kind, endpoint, body, flavour, config, rng)
                tally.add(result, "load")
                if tally.num_failures >= config.max_failures and not stop.is_set():
                    stop_reason = f"the load stopped early after {tally.num_failures} failures"
                    stop.set()

        async def watch() -> None:
            nonlocal stop_reason, down_during_load
            misses = 0
            bar = tqdm(total=round(config.minutes * 60), unit="s", desc="soak", file=sys.stderr,
                       disable=not config.progress, dynamic_ncols=True)
            started = time.monotonic()
            try:
                while not stop.is_set():
                    await asyncio.sleep(1)
                    bar.n = min(bar.total, round(time.monotonic() - started))
                    bar.set_postfix(requests=tally.total, ok=tally.outcomes["ok"], failures=tally.num_failures,
                                    refresh=False)
                    bar.refresh()
                    if process.poll() is not None:
                        stop_reason = f"vllm serve exited with {process.returncode} during the load"
                        down_during_load = True
                        stop.set()
                    elif not await healthy(http, base, timeout=5):
                        misses += 1
                        if misses >= 3:
                            stop_reason = "the server stopped answering /health during the load"
                            down_during_load = True
                            stop.set()
                    else:
                        misses = 0
            finally:
                bar.close()

        watcher = asyncio.create_task(watch())
        load_started = time.monotonic()
        if not stop.is_set():
            await asyncio.gather(*(client_loop(c) for c in range(config.clients)))
        load_seconds = time.monotonic() - load_started
        stop.set()
        await watcher

        report["stop_reason"] = stop_reason
        report["down_during_load"] = down_during_load
        report["healthy_after"] = process.poll() is None and await serves(http, base, facts)
        report["reference_after"] = await reference(http, base, facts, config) if report["healthy_after"] else None

        # The gauges return to 0 (bounded wait: vLLM refreshes them once per engine step).
        gauges = {"vllm:num_requests_running": None, "vllm:num_requests_waiting": None,
                  "vllm:kv_cache_usage_perc": None}
        metrics_after: dict[str, float] = {}
        if report["healthy_after"]:
            drain_deadline = time.monotonic() + config.drain_timeout_s
            while True:
                try:
                    metrics_after = await scrape(http, base)
                except httpx.HTTPError:
                    metrics_after = {}
                gauges = {name: metric(metrics_after, name) for name in gauges}
                if all(v == 0 for v in gauges.values()) or time.monotonic() > drain_deadline:
                    break
                await asyncio.sleep(1)

    def delta(name: str) -> float | None:
        after, before = metric(metrics_after, name), metric(metrics_before, name)
        return None if after is None else after - (before or 0)

    report.update({
        "load_seconds": round(load_seconds, 1), "tally": tally, "gauges_after": gauges,
        "preemptions": delta("vllm:num_preemptions"),
        "sentinel_spans_closed": delta("vllm:sentinel_spans_closed"),
        "sentinel_kv_blocks_freed": delta("vllm:sentinel_kv_blocks_freed"),
    })
    return report


def run_soak(config: SoakConfig) -> dict:
    """Start the server, soak it, stop it; returns (and writes to OUT/soak.json) the report."""
    out_dir = config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = ModelFacts.read(config.model)
    port = config.port or free_port()
    log = out_dir / "serve.log"
    base = f"http://{HOST}:{port}"
    started = time.monotonic()
    process = start_server(config, port, log)
    try:
        wait_until_healthy(process, base + "/health", log, timeout_s=config.startup_timeout_s)
        startup_seconds = time.monotonic() - started
        raw = asyncio.run(_soak(config, base, process, facts))
    finally:
        stop_server(process)
    tally: Tally = raw.pop("tally")

    bad_total = tally.by_kind["bad"].total()
    bad_4xx = tally.by_kind["bad"]["bad_4xx"]
    not_4xx = sorted(name for name, statuses in tally.bad_cases.items()
                     if any(not status.startswith("4") for status in statuses))
    before, after = raw["reference_before"], raw["reference_after"]
    reference_identical = bool(after) and all("error" not in v for v in before.values()) and before == after
    gauges = raw["gauges_after"]
    checks = {
        "no_failed_good_requests": sum(c["failure"] for k, c in tally.by_kind.items() if k != "bad") == 0,
        "bad_inputs_all_4xx": bad_total > 0 and bad_4xx == bad_total,
        "server_healthy": bool(raw["healthy_after"]) and not raw["down_during_load"],
        "requests_running_0": gauges["vllm:num_requests_running"] == 0,
        "requests_waiting_0": gauges["vllm:num_requests_waiting"] == 0,
        "kv_usage_0": gauges["vllm:kv_cache_usage_perc"] == 0,
        "reference_identical": reference_identical,
    }
    report = {
        "passed": all(checks.values()), "checks": checks, "config": asdict(config),
        "server_log": str(log), "startup_seconds": round(startup_seconds, 1),
        "requests": tally.total, "outcomes": dict(tally.outcomes),
        "by_kind": {k: dict(v) for k, v in sorted(tally.by_kind.items())},
        "by_compression": {k: dict(v) for k, v in sorted(tally.by_flavour.items())},
        "bad_inputs": {"sent": bad_total, "got_4xx": bad_4xx, "not_4xx": not_4xx,
                       "by_case": {k: dict(v) for k, v in sorted(tally.bad_cases.items())},
                       "one_at_a_time_before_the_load": raw.pop("preload_bad_inputs")},
        "failures": tally.num_failures, "first_failures": tally.failures,
        **raw,
    }
    report["summary"] = summary_line(report)
    (out_dir / "soak.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def summary_line(report: dict) -> str:
    config, outcomes, bad = report["config"], report["outcomes"], report["bad_inputs"]
    gauges = report["gauges_after"]
    kv = gauges["vllm:kv_cache_usage_perc"]
    running = gauges["vllm:num_requests_running"]
    preemptions = report["preemptions"]
    line = (f"soak: {config['clients']} clients x {config['minutes']:g} min: {report['requests']} requests "
            f"({outcomes.get('ok', 0)} ok, {outcomes.get('dropped', 0)} dropped, "
            f"{outcomes.get('timed_out', 0)} timed out, {bad['sent']} bad -> 4xx {bad['got_4xx']}/{bad['sent']}), "
            f"{'?' if preemptions is None else int(preemptions)} preemptions, {report['failures']} failures, "
            f"running {'?' if running is None else f'{running:g}'}, "
            f"KV {'?' if kv is None else f'{100 * kv:.1f}%'}, "
            f"reference {'identical' if report['checks']['reference_identical'] else 'NOT identical'}: "
            f"{'PASS' if report['passed'] else 'FAIL'}")
    failed = [name for name, ok in report["checks"].items() if not ok]
    if failed:
        line += f" ({', '.join(failed)}"
        if bad["not_4xx"]:
            line += f"; not 4xx: {', '.join(bad['not_4xx'])}"
        if report.get("stop_reason"):
            line += f"; {report['stop_reason']}"
        line += ")"
    return line

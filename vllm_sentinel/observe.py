"""Run a workload through an `LLM` and watch vLLM's own accounting while it runs.

`run_workload` adds every request, steps the engine until all finish, and after each step samples
vLLM's metrics: running and waiting requests, KV cache blocks in use, preemptions, and the
sentinel counters when the sentinel backend runs. Time to first token and time per output token
come from when each request's tokens reach the caller. Needs `LLM(..., disable_log_stats=False)`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestTiming:
    num_prompt_tokens: int
    first_token_s: float | None = None  # since the workload started (all requests arrive at 0)
    finished_s: float | None = None
    num_output_tokens: int = 0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s

    @property
    def tpot_s(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.finished_s - self.first_token_s) / (self.num_output_tokens - 1)


@dataclass
class RunRecord:
    elapsed_s: float
    num_blocks: int
    outputs: list = field(default_factory=list)          # RequestOutput per request, in submission order
    timings: list[RequestTiming] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)     # one per engine step
    counters: dict = field(default_factory=dict)          # final values of vLLM's and the sentinel's counters

    @property
    def output_tokens(self) -> int:
        return sum(t.num_output_tokens for t in self.timings)

    @property
    def prompt_tokens(self) -> int:
        return sum(t.num_prompt_tokens for t in self.timings)

    @property
    def peak_running(self) -> int:
        return max((s["running"] for s in self.samples), default=0)

    @property
    def peak_kv_blocks(self) -> int:
        return max((s["kv_blocks"] for s in self.samples), default=0)

    @property
    def preemptions(self) -> int:
        return int(self.counters.get("vllm:num_preemptions", 0))

    def percentile_ms(self, what: str, q: float) -> float:
        values = [getattr(t, what) for t in self.timings]
        values = [v for v in values if v is not None]
        return float(np.percentile(values, q) * 1e3) if values else float("nan")

    def summary(self) -> dict:
        return {
            "elapsed_s": self.elapsed_s,
            "requests_per_s": len(self.timings) / self.elapsed_s,
            "output_tokens_per_s": self.output_tokens / self.elapsed_s,
            "total_tokens_per_s": (self.output_tokens + self.prompt_tokens) / self.elapsed_s,
            "peak_running": self.peak_running,
            "preemptions": self.preemptions,
            "peak_kv_blocks": self.peak_kv_blocks,
            "num_kv_blocks": self.num_blocks,
            "ttft_ms_p50": self.percentile_ms("ttft_s", 50), "ttft_ms_p99": self.percentile_ms("ttft_s", 99),
            "tpot_ms_p50": self.percentile_ms("tpot_s", 50), "tpot_ms_p99": self.percentile_ms("tpot_s", 99),
            "sentinel_tokens": int(self.counters.get("vllm:sentinel_tokens", 0)),
            "spans_closed": int(self.counters.get("vllm:sentinel_spans_closed", 0)),
            "kv_blocks_freed": int(self.counters.get("vllm:sentinel_kv_blocks_freed", 0)),
        }


_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def _read_metrics(llm, kind: str | None = None) -> dict:
    """name -> value of this engine's gauges and counters (summed over its engine indices).

    Prometheus is process-wide: an engine started earlier in the process (another model in a
    bench) leaves its label set behind, so only this model's samples count."""
    from vllm.v1.metrics.reader import Counter, Gauge

    wanted = {"counter": (Counter,), "gauge": (Gauge,), None: (Counter, Gauge)}[kind]
    model_name = llm.llm_engine.vllm_config.model_config.served_model_name
    values = {}
    for metric in llm.get_metrics():
        if isinstance(metric, wanted) and metric.labels.get("model_name", model_name) == model_name:
            values[metric.name] = values.get(metric.name, 0) + metric.value
    return values


def run_workload(llm, prompts: list, params, progress: str | None = None) -> RunRecord:
    """Submit all `prompts` at once (token-id lists or strings) and step to the end.

    `params` is one SamplingParams for all, or one per prompt; `progress` labels a progress bar
    of output tokens.
    """
    from tqdm import tqdm

    engine = llm.llm_engine
    num_blocks = engine.vllm_config.cache_config.num_gpu_blocks
    params = params if isinstance(params, list) else [params] * len(prompts)
    before = _read_metrics(llm, "counter")
    timings, index = [], {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        request = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
        engine.add_request(str(i), request, p)
        timings.append(RequestTiming(num_prompt_tokens=len(prompt) if isinstance(prompt, list) else 0))
        index[str(i)] = i
    outputs = [None] * len(prompts)
    samples = []
    bar = tqdm(total=sum(p.max_tokens or 0 for p in params), desc=progress, unit="tok", disable=progress is None,
               leave=False)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        step_outputs = engine.step()
        now = time.perf_counter() - start
        for out in step_outputs:
            timing = timings[index[out.request_id]]
            produced = len(out.outputs[0].token_ids)
            if produced and timing.first_token_s is None:
                timing.first_token_s = now
            bar.update(produced - timing.num_output_tokens)
            timing.num_output_tokens = produced
            if out.finished:
                timing.finished_s = now
                timing.num_prompt_tokens = len(out.prompt_token_ids)
                outputs[index[out.request_id]] = out
        metrics = _read_metrics(llm, "gauge")
        samples.append({"t": now, "running": int(metrics.get(_GAUGES[0], 0)), "waiting": int(metrics.get(_GAUGES[1], 0)),
                        "kv_blocks": round(metrics.get(_GAUGES[2], 0.0) * num_blocks),
                        # KV slots held and real tokens they stand for, over running requests (sentinel only)
                        "kv_slots": int(metrics.get("vllm:sentinel_kv_slots_held", 0)),
                        "kv_tokens": int(metrics.get("vllm:sentinel_kv_tokens_represented", 0))})
    elapsed = time.perf_counter() - start
    bar.close()
    after = _read_metrics(llm, "counter")
    counters = {name: value - before.get(name, 0) for name, value in after.items()}
    return RunRecord(elapsed, num_blocks, outputs, timings, samples, counters)

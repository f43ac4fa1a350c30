"""`vllm-sentinel bench-chat`: prefix caching with compaction, next to stock vLLM's.

Three engines on the same model, prompts and KV pool, one after another in this process: stock
vLLM with prefix caching (its default), the sentinel backend without it, and the sentinel backend
with it. Two workloads:
- system-prompt: requests sharing one long system prompt, each with its own short user turn, all
  submitted at once (the shape of `vllm bench`'s prefix-repetition dataset);
- conversation: conversations of several turns; turn t's prompt is turn t - 1's prompt, its answer
  and a new user message. All conversations send a turn together and the next once all have
  answered.
Per engine: vLLM's own prefix-cache counters (hit rate = hit tokens / queried tokens), time to first
token, throughput and peak KV blocks in use. The pool is ample for stock (no preemption), so the
comparison is of reuse and speed, and the KV blocks show the memory compression saves on top.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..config import SentinelConfig
from .throughput import BLOCK_SIZE, pool_settings, random_prompts

ENGINES = (("stock", False, True), ("sentinel, no prefix caching", True, False), ("sentinel", True, True))


@dataclass(frozen=True)
class ChatWorkload:
    system_prompt: int = 2000     # tokens shared by every request
    user_turn: int = 32           # tokens of each request's own question
    requests: int = 64
    answer: int = 32
    conversations: int = 8
    turns: int = 8
    first_message: int = 256
    message: int = 64             # each later user message
    turn_answer: int = 128
    max_num_batched_tokens: int | None = None  # None: vLLM's default

    @property
    def conversation_len(self) -> int:
        return self.first_message + (self.turns - 1) * self.message + self.turns * self.turn_answer

    @property
    def max_model_len(self) -> int:
        return max(self.system_prompt + self.user_turn + self.answer, self.conversation_len) + 1


# Small enough for a CI test; steps of two prompts, so later requests arrive after the first is cached.
QUICK = ChatWorkload(system_prompt=600, user_turn=16, requests=6, answer=8, conversations=2, turns=4,
                     first_message=400, message=24, turn_answer=24, max_num_batched_tokens=1232)


def _run(llm, prompts: list[list[int]], max_tokens: int, extra: dict | None, label: str):
    from vllm import SamplingParams

    from ..observe import run_workload

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=extra)
    return run_workload(llm, prompts, params, progress=label)


def _summary(records: list, elapsed: float) -> dict:
    counters = {}
    for record in records:
        for name, value in record.counters.items():
            counters[name] = counters.get(name, 0) + value
    ttft = [t.ttft_s for record in records for t in record.timings if t.ttft_s is not None]
    tokens = sum(record.prompt_tokens + record.output_tokens for record in records)
    queried = counters.get("vllm:prefix_cache_queries", 0)
    return {"elapsed_s": elapsed, "total_tokens_per_s": tokens / elapsed,
            "prefix_cache_queries": int(queried), "prefix_cache_hits": int(counters.get("vllm:prefix_cache_hits", 0)),
            "hit_rate": counters.get("vllm:prefix_cache_hits", 0) / queried if queried else 0.0,
            "ttft_ms_p50": float(np.percentile(ttft, 50) * 1e3), "ttft_ms_p90": float(np.percentile(ttft, 90) * 1e3),
            "peak_kv_blocks": max(record.peak_kv_blocks for record in records),
            "preemptions": int(counters.get("vllm:num_preemptions", 0))}


def run_engine(model_dir: str, sentinel: bool, caching: bool, workload: ChatWorkload, settings: dict,
               window: int | None, seed: int = 0) -> dict:
    from vllm import LLM

    config = json.loads((Path(model_dir) / "config.json").read_text())
    avoid = SentinelConfig.load(model_dir).sentinel_ids
    vocab = config["vocab_size"]
    longest = max(workload.requests, workload.conversations) * workload.max_model_len
    kwargs = {**settings, "max_model_len": workload.max_model_len, "seed": 0,
              "disable_log_stats": False, "enable_prefix_caching": caching,
              # ample for stock: every request of the larger workload uncompressed, with a quarter to spare
              **pool_settings(config, int(1.25 * longest / BLOCK_SIZE) + 1, settings["dtype"])}
    if workload.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = workload.max_num_batched_tokens
    if sentinel:
        kwargs["attention_backend"] = "sentinel"
    extra = {"sentinel": {"window": window}} if sentinel and window is not None else None
    label = ("sentinel" if sentinel else "stock") + (" cached" if caching else "")
    llm = LLM(model=model_dir, **kwargs)
    try:
        system = random_prompts(1, workload.system_prompt, vocab, avoid, seed=seed)[0]
        questions = random_prompts(workload.requests, workload.user_turn, vocab, avoid, seed=seed + 1)
        started = time.perf_counter()
        record = _run(llm, [system + q for q in questions], workload.answer, extra, f"system-prompt {label}")
        system_prompt = _summary([record], time.perf_counter() - started)

        conversations = random_prompts(workload.conversations, workload.first_message, vocab, avoid, seed=seed + 2)
        records, started = [], time.perf_counter()
        for turn in range(workload.turns):
            if turn:
                messages = random_prompts(workload.conversations, workload.message, vocab, avoid, seed=seed + 2 + turn)
                conversations = [c + list(out.outputs[0].token_ids) + m
                                 for c, out, m in zip(conversations, records[-1].outputs, messages)]
            records.append(_run(llm, conversations, workload.turn_answer, extra, f"turn {turn + 1} {label}"))
        conversation = _summary(records, time.perf_counter() - started)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return {"system-prompt": system_prompt, "conversation": conversation}


def bench_chat(model_dir: str, out_dir: str | Path, quick: bool = False, window: int | None = None,
               dtype: str = "auto", load_format: str = "auto", label: str | None = None,
               enforce_eager: bool = False) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workload = QUICK if quick else ChatWorkload()
    settings = {"dtype": dtype, "load_format": load_format, "enforce_eager": enforce_eager}
    schedule = SentinelConfig.load(model_dir).schedule
    if window is not None:
        schedule = replace(schedule, window=window)
    started = time.time()
    runs = {name: run_engine(model_dir, sentinel, caching, workload, settings, window)
            for name, sentinel, caching in ENGINES}
    label = label or Path(model_dir).name
    report = {"model": str(model_dir), "label": label, "workload": asdict(workload), "schedule": asdict(schedule),
              "seconds": time.time() - started, "runs": runs}
    for part in ("system-prompt", "conversation"):
        stock, ours = runs["stock"][part], runs["sentinel"][part]
        report[f"{part} ratios"] = {
            "hit_rate": ours["hit_rate"] / stock["hit_rate"] if stock["hit_rate"] else float("nan"),
            "ttft_p50": ours["ttft_ms_p50"] / stock["ttft_ms_p50"],
            "throughput": ours["total_tokens_per_s"] / stock["total_tokens_per_s"],
            "peak_kv_blocks": ours["peak_kv_blocks"] / stock["peak_kv_blocks"]}
    name = f"bench-chat-{label}"
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot(report, out_dir / f"{name}.png")
    print(format_report(report), flush=True)
    return report


def format_report(report: dict) -> str:
    w, s = report["workload"], report["schedule"]
    lines = [f"[chat] {report['label']}, schedule sink {s['sink']} span {s['span']} gap {s['gap']} window {s['window']}"]
    for part, what in (("system-prompt", f"{w['requests']} requests x ({w['system_prompt']} shared + {w['user_turn']}) "
                                        f"in x {w['answer']} out"),
                       ("conversation", f"{w['conversations']} conversations x {w['turns']} turns, "
                                        f"{w['first_message']} then {w['message']} in, {w['turn_answer']} out per turn")):
        lines.append(f" {part}: {what}")
        for name, runs in report["runs"].items():
            r = runs[part]
            lines.append(f"  {name:>27}: hit rate {r['hit_rate']:6.1%} | TTFT p50/p90 {r['ttft_ms_p50']:7.0f}/"
                         f"{r['ttft_ms_p90']:7.0f} ms | {r['total_tokens_per_s']:7.1f} total tok/s | "
                         f"peak KV blocks {r['peak_kv_blocks']:5d} | preemptions {r['preemptions']}")
        ratio = report[f"{part} ratios"]
        lines.append(f"  sentinel / stock (both caching): hit rate {ratio['hit_rate']:.2f}x, TTFT p50 "
                     f"{ratio['ttft_p50']:.2f}x, throughput {ratio['throughput']:.2f}x, peak KV blocks "
                     f"{ratio['peak_kv_blocks']:.2f}x")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("hit_rate", "prefix-cache hit rate"), ("ttft_ms_p50", "TTFT p50 (ms)"),
               ("total_tokens_per_s", "total tokens / s"), ("peak_kv_blocks", "peak KV blocks"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(18, 4.2))
    names = list(report["runs"])
    x = np.arange(2)
    for ax, (key, title) in zip(axes, metrics):
        for i, name in enumerate(names):
            values = [report["runs"][name][part][key] for part in ("system-prompt", "conversation")]
            bars = ax.bar(x + (i - 1) * 0.27, values, width=0.27, label=name, color=f"C{i}")
            for bar, value in zip(bars, values):
                text = f"{value:.0%}" if key == "hit_rate" else f"{value:.0f}"
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(x, ["system prompt", "conversation"])
        ax.set_title(title)
    axes[0].set_ylim(0, 1.35)
    axes[0].legend(fontsize=8, loc="upper center", ncol=1)
    s = report["schedule"]
    fig.suptitle(f"prefix caching: stock vLLM vs sentinel ({report['label']}, sink {s['sink']} span {s['span']} "
                 f"gap {s['gap']} window {s['window']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""`vllm-sentinel bench`: stock vLLM against the sentinel backend on the same model, prompts and KV budget.

The conventions of `vllm bench throughput`: random-token prompts of a fixed input length, a fixed
output length with `ignore_eos`, every request submitted at once; requests/s, output tokens/s and
total tokens/s. Both engines run in this one process, one after the other, and the ratios are
printed. Compiled, as vLLM runs by default (`enforce_eager=True` for eager). Per engine also: peak running requests, preemptions, KV blocks in use over time, time to
first token and per output token (p50/p99), and the sentinel tokens the backend added.

Workloads:
- kv-bound: a KV budget that holds only a few uncompressed requests, long generations;
- overhead: ample memory, short outputs (what compression costs when memory is not the limit);
- prefill: long prompts, short outputs;
- long-gen: long generations; stock on an ample pool only, sentinel on a small one; and the limit:
  stock at the physical context sentinel held (its mean KV slots per request), whose TPOT is the
  best a compacting engine could reach;
- span-sweep: the kv-bound workload, smaller, at several span lengths L;
- long-prompt: one prompt of 16k or 32k tokens per engine, each engine in its own process: time to
  first token and the peak memory of the process tree (`long_prompts`).

Workloads with a small pool also run stock on an *ample* pool in the same run, so the report
says how far sentinel gets towards (or past) what the machine can do with all the memory it wants.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..config import ScheduleConfig, SentinelConfig
from ..engine.layout import cdiv

BLOCK_SIZE = 32


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    kv_budget_requests: float | None = None  # KV pool = this many uncompressed requests; None: ample
    span: int | None = None                  # per-request span override (the sweep); None: the model's
    stock_on_budget: bool = True             # False: stock runs on the ample pool only

    @property
    def kv_budget_tokens(self) -> int | None:
        if self.kv_budget_requests is None:
            return None
        return int(self.kv_budget_requests * (self.input_len + self.output_len))


# Sized for two CPU cores: the whole bench (both models) in under 20 minutes. The kv-bound budget
# holds under three uncompressed requests; the sentinel backend fits all 32 in it.
WORKLOADS = {
    "kv-bound": Workload("kv-bound", 32, 64, 1536, kv_budget_requests=2.75),
    "overhead": Workload("overhead", 64, 128, 128),
    "prefill": Workload("prefill", 16, 1536, 16),
    # 32 x 4,096 tokens: the tiny model's whole context (4,096 positions)
    "long-gen": Workload("long-gen", 32, 64, 4032, kv_budget_requests=2.75, stock_on_budget=False),
}
SWEEP = Workload("span-sweep", 16, 64, 512, kv_budget_requests=4)
SWEEP_SPANS = (4, 8, 16, 32)
QUICK = {  # a configuration small enough for a CI test: same code paths, minutes become seconds
    "kv-bound": Workload("kv-bound", 16, 64, 192, kv_budget_requests=4),
    "overhead": Workload("overhead", 16, 32, 32),
    "prefill": Workload("prefill", 8, 384, 8),
    "long-gen": Workload("long-gen", 8, 32, 320, kv_budget_requests=2.75, stock_on_budget=False),
}
QUICK_SWEEP = Workload("span-sweep", 8, 64, 96, kv_budget_requests=3)
QUICK_SPANS = (4, 16)


def random_prompts(count: int, length: int, vocab: int, avoid: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    """Random token ids, as `vllm bench`'s random dataset draws them, never a sentinel."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, vocab, size=(count, length))
    for token in avoid:
        prompts[prompts == token] = 3
    return prompts.tolist()


def pool_settings(config: dict, num_blocks: int, dtype: str, block_size: int = BLOCK_SIZE) -> dict:
    """Engine options for a KV pool of exactly `num_blocks` blocks of `block_size` tokens.

    vLLM allocates the override's blocks whatever `kv_cache_memory_bytes` says, but on CPU it first
    checks that figure against the free memory of the NUMA node: give it the pool's true size, so
    the check is about this pool (a fixed 8 GiB failed on a node with 7.7 GiB free)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    served = (config.get("dtype") or config.get("torch_dtype")) if dtype == "auto" else dtype
    itemsize = 2 if served in ("bfloat16", "float16", "half") else 4
    block_bytes = config["num_hidden_layers"] * 2 * kv_heads * head_dim * block_size * itemsize
    return {"block_size": block_size, "num_gpu_blocks_override": num_blocks,
            "kv_cache_memory_bytes": num_blocks * block_bytes}


def engine_kwargs(workload: Workload, config: dict, dtype: str, load_format: str, enforce_eager: bool) -> dict:
    length = workload.input_len + workload.output_len
    # "Ample" is every request fully uncompressed, with room to spare; a budget is a KV pool of
    # the given size. Either way the pool is allocated to that size, not to all of memory.
    tokens = workload.kv_budget_tokens or int(1.25 * workload.num_prompts * length)
    return {"dtype": dtype, "load_format": load_format, "enforce_eager": enforce_eager,
            "max_model_len": length, "disable_log_stats": False, "seed": 0,
            **pool_settings(config, cdiv(tokens, BLOCK_SIZE) + 1, dtype)}  # + vLLM's null block


def kv_slots_per_request(record) -> dict | None:
    """Physical KV slots per request against the semantics page's ideal, when every request ran at once."""
    full = [s for s in record.samples if s["kv_tokens"] and s["running"] == len(record.timings)]
    if not full:
        return None
    last = full[-1]
    return {"tokens": last["kv_tokens"] / last["running"], "slots": last["kv_slots"] / last["running"]}


def mean_kv_slots_per_request(record) -> float | None:
    """The physical KV slots a running request held, averaged over the run's steps (sentinel only)."""
    held = [s for s in record.samples if s["running"] and s["kv_slots"]]
    return sum(s["kv_slots"] for s in held) / sum(s["running"] for s in held) if held else None


def limit_workload(workload: Workload, mean_slots: float) -> Workload:
    """Stock at the physical context sentinel held: the same requests, a prompt of half the mean
    slots and an output as long as them, so a request's context averages the same over its decode."""
    return Workload(f"{workload.name}-limit", workload.num_prompts, max(1, round(mean_slots / 2)),
                    max(2, round(mean_slots)))


def _summarise(record) -> dict:
    return {**record.summary(), "kv_per_request": kv_slots_per_request(record),
            "mean_kv_slots_per_request": mean_kv_slots_per_request(record),
            "kv_blocks_over_time": [(round(s["t"], 3), s["kv_blocks"], s["running"]) for s in record.samples]}


def _vllm_collectors() -> list:
    """vLLM's own Prometheus collectors now in the registry (the sentinel's are process-wide)."""
    from prometheus_client import REGISTRY

    return [collector for collector in list(REGISTRY._collector_to_names)
            if getattr(collector, "_name", "").startswith("vllm:")
            and not collector._name.startswith("vllm:sentinel")]


class BenchEngine:
    """One engine of a comparison: an `LLM` with the backend's settings, running workloads."""

    def __init__(self, model_dir: str, backend: str, settings: dict):
        from vllm import LLM

        kwargs = dict(settings)
        if backend == "sentinel":
            kwargs["attention_backend"] = "sentinel"
        self.backend = backend
        started = time.perf_counter()
        self.llm = LLM(model=model_dir, **kwargs)
        self.startup_s = time.perf_counter() - started
        # A new engine's Prometheus logger unregisters every earlier engine's collectors, and the
        # bench reads its gauges from the registry: each engine puts its own back before it runs.
        self.collectors = _vllm_collectors()

    def _own_metrics(self) -> None:
        from prometheus_client import REGISTRY

        current = _vllm_collectors()
        if {id(c) for c in current} != {id(c) for c in self.collectors}:
            for collector in current:
                REGISTRY.unregister(collector)
            for collector in self.collectors:
                REGISTRY.register(collector)

    def run(self, workload: Workload, prompts, label: str | None = None) -> dict:
        from vllm import SamplingParams

        from ..observe import run_workload

        self._own_metrics()
        extra = {"sentinel": {"span": workload.span}} if self.backend == "sentinel" and workload.span else None
        params = SamplingParams(max_tokens=workload.output_len, temperature=0, ignore_eos=True, extra_args=extra)
        record = run_workload(self.llm, prompts, params, progress=label)
        return {"backend": self.backend, "startup_s": self.startup_s, **_summarise(record)}

    def warm_up(self, workload: Workload, vocab: int, avoid) -> None:
        """A short batch first, so that no round pays for what a fresh engine does once."""
        self.run(replace(workload, num_prompts=min(4, workload.num_prompts), output_len=min(4, workload.output_len)),
                 random_prompts(min(4, workload.num_prompts), workload.input_len, vocab, avoid, seed=10_000))

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm


def run_engine(model_dir: str, backend: str, workloads: list[Workload], prompts, settings: dict) -> list[dict]:
    """One engine, the given workloads one after another (they differ only in per-request options)."""
    engine = BenchEngine(model_dir, backend, settings)
    try:
        return [engine.run(workload, prompts, label=f"{workload.name} {backend}") for workload in workloads]
    finally:
        engine.close()


def run_rounds(model_dir: str, plan: list[tuple], prompts_of, rounds: int, vocab: int, avoid) -> dict[str, list]:
    """Each engine of `plan` ((name, backend, settings, workloads)) alive at once, warmed up, then
    `rounds` rounds of fresh prompts (`prompts_of(round)`), the engines taking turns (the first
    each round rotates), so that a slow minute of the machine falls on all of them alike.
    name -> per workload, the summary of each round."""
    engines = {}
    try:
        for name, backend, settings, workloads in plan:
            engines[name] = BenchEngine(model_dir, backend, settings)
            engines[name].warm_up(workloads[0], vocab, avoid)
        runs = {name: [[] for _ in workloads] for name, _, _, workloads in plan}
        for r in range(rounds):
            prompts = prompts_of(r)
            order = plan[r % len(plan):] + plan[: r % len(plan)]
            for name, backend, _, workloads in order:
                for i, workload in enumerate(workloads):
                    runs[name][i].append(engines[name].run(workload, prompts,
                                                           label=f"{workload.name} {backend} round {r + 1}/{rounds}"))
        return runs
    finally:
        for engine in engines.values():
            engine.close()


def median_round(summaries: list[dict]) -> dict:
    """The round whose elapsed time is the median (the lower middle one for an even count)."""
    ordered = sorted(summaries, key=lambda s: s["elapsed_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds_elapsed_s": [s["elapsed_s"] for s in summaries]}


def compare(model_dir: str, workloads: list[Workload], settings: dict, backends=("stock", "sentinel"),
            rounds: int = 1) -> list[dict]:
    """Each backend runs every workload (same prompts, same engine settings); one result per workload.

    Stock vLLM ignores the per-request span, so it runs the first workload only. With `rounds` > 1
    every engine stays up, warmed, and the engines take turns over fresh prompts each round; a
    ratio is then the median over rounds of that round's ratio.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    sentinel = SentinelConfig.load(model_dir)
    vocab, avoid = config["vocab_size"], sentinel.sentinel_ids
    first = workloads[0]

    def prompts_of(round_: int, workload: Workload = first):
        return random_prompts(workload.num_prompts, workload.input_len, vocab, avoid, seed=round_)

    engine_settings = engine_kwargs(first, config, **settings)
    ample_settings = engine_kwargs(replace(first, kv_budget_requests=None), config, **settings)
    plan = []
    for backend in backends:
        if backend == "stock" and first.kv_budget_requests is not None and len(workloads) == 1:
            # the machine's limit: stock with all the KV it wants, next to both engines on the small pool
            plan.append(("stock-ample", "stock", ample_settings, workloads[:1]))
            if not first.stock_on_budget:
                continue
        plan.append((backend, backend, engine_settings, workloads if backend == "sentinel" else workloads[:1]))
    if rounds > 1:
        per_round = run_rounds(model_dir, plan, prompts_of, rounds, vocab, avoid)
    else:
        per_round = {name: [[run] for run in run_engine(model_dir, backend, runs, prompts_of(0), settings_)]
                     for name, backend, settings_, runs in plan}
    limit = None
    if first.name == "long-gen" and per_round.get("sentinel"):
        held = [run["mean_kv_slots_per_request"] for run in per_round["sentinel"][0]]
        if all(held):
            # The most a compacting engine can reach on decode: stock attending to as many slots.
            limit_slots = float(np.median(held))
            limit = limit_workload(first, limit_slots)
            limit_plan = [("stock-limit", "stock", engine_kwargs(limit, config, **settings), [limit])]
            limit_prompts = lambda r: prompts_of(r, limit)  # noqa: E731
            per_round.update(run_rounds(model_dir, limit_plan, limit_prompts, rounds, vocab, avoid) if rounds > 1 else
                             {"stock-limit": [[run_engine(model_dir, "stock", [limit], limit_prompts(0),
                                                          limit_plan[0][2])[0]]]})
    results = []
    for i, workload in enumerate(workloads):
        rounds_of = {backend: run[i] for backend, run in per_round.items() if i < len(run)}
        by_backend = {backend: median_round(summaries) for backend, summaries in rounds_of.items()}
        result = {"workload": asdict(workload), "kv_budget_tokens": workload.kv_budget_tokens, "runs": by_backend,
                  "rounds": rounds}
        keys = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")

        def ratios(ours: str, theirs: str) -> tuple[dict, dict]:
            each = {key: [a[key] / b[key] for a, b in zip(rounds_of[ours], rounds_of[theirs])] for key in keys}
            return {key: float(np.median(values)) for key, values in each.items()}, each

        if "sentinel" in by_backend and "stock" in by_backend:
            result["ratios"], result["ratios_by_round"] = ratios("sentinel", "stock")
        if "sentinel" in by_backend and "stock-ample" in by_backend:
            result["ratios_vs_ample"], result["ratios_vs_ample_by_round"] = ratios("sentinel", "stock-ample")
        if limit is not None and i == 0:
            sentinel_tpot = float(np.median([run["tpot_ms_p50"] for run in rounds_of["sentinel"]]))
            limit_tpot = float(np.median([run["tpot_ms_p50"] for run in rounds_of["stock-limit"]]))
            result["limit"] = {"workload": asdict(limit), "mean_kv_slots": limit_slots,
                               "tpot_ratio": limit_tpot / sentinel_tpot}
        schedule = sentinel.schedule if not workload.span else replace(sentinel.schedule, span=workload.span)
        per_request = by_backend.get("sentinel", {}).get("kv_per_request")
        if per_request:
            ideal = schedule.ideal_kv_slots(round(per_request["tokens"]))
            result["kv_slots_vs_ideal"] = {**per_request, "ideal": ideal, "ratio": per_request["slots"] / ideal,
                                           "schedule": asdict(schedule)}
        results.append(result)
    return results


def format_result(result: dict) -> str:
    w = result["workload"]
    budget = f"KV budget {result['kv_budget_tokens']} tokens" if result["kv_budget_tokens"] else "ample KV"
    lines = [f"[{w['name']}] {w['num_prompts']} requests x {w['input_len']} in x {w['output_len']} out, {budget}"
             + (f", span {w['span']}" if w.get("span") else "")]
    for backend, run in result["runs"].items():
        lines.append(f"  {backend:>11}: {run['requests_per_s']:6.2f} req/s {run['output_tokens_per_s']:8.1f} out tok/s "
                     f"{run['total_tokens_per_s']:8.1f} total tok/s | peak running {run['peak_running']:3d} "
                     f"preemptions {run['preemptions']:4d} peak KV blocks {run['peak_kv_blocks']:5d} | "
                     f"TTFT p50/p99 {run['ttft_ms_p50']:.0f}/{run['ttft_ms_p99']:.0f} ms "
                     f"TPOT p50/p99 {run['tpot_ms_p50']:.1f}/{run['tpot_ms_p99']:.1f} ms | "
                     f"sentinel tokens {run['sentinel_tokens']}")
    rounds = result.get("rounds", 1)

    def spread(key: str) -> str:  # the per-round ratios behind a median
        values = result[key]["total_tokens_per_s"]
        return f" (median of {rounds} rounds, {min(values):.2f}-{max(values):.2f})" if rounds > 1 else ""

    if "ratios" in result:
        r = result["ratios"]
        lines.append(f"  sentinel / stock: {r['requests_per_s']:.2f}x req/s, {r['output_tokens_per_s']:.2f}x output "
                     f"tok/s, {r['total_tokens_per_s']:.2f}x total tok/s" + spread("ratios_by_round"))
    if "ratios_vs_ample" in result:
        r = result["ratios_vs_ample"]
        lines.append(f"  sentinel (this pool) / stock (ample pool): {r['output_tokens_per_s']:.2f}x output tok/s, "
                     f"{r['total_tokens_per_s']:.2f}x total tok/s" + spread("ratios_vs_ample_by_round"))
    if "limit" in result:
        lim = result["limit"]
        lines.append(f"  the limit: stock attending to the {lim['mean_kv_slots']:.0f} slots sentinel held on average "
                     f"({lim['workload']['input_len']} in x {lim['workload']['output_len']} out): stock TPOT / "
                     f"sentinel TPOT = {lim['tpot_ratio']:.2f} (1.00: compaction costs nothing)")
    if "kv_slots_vs_ideal" in result:
        k = result["kv_slots_vs_ideal"]
        lines.append(f"  KV slots per request at {k['tokens']:.0f} tokens: {k['slots']:.1f} "
                     f"(ideal S + (n - S)(G + 1)/(L + G) + L = {k['ideal']:.1f}; {k['ratio']:.2f}x)")
    return "\n".join(lines)


def plot(results: list[dict], sweep: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    compared = [r for r in results if "ratios" in r or "ratios_vs_ample" in r]
    names = [r["workload"]["name"] for r in compared]
    x = np.arange(len(compared))
    tallest = 1.0
    for offset, key, against, label, color in ((-0.2, "ratios", "stock", "vs stock, same pool", "C1"),
                                               (0.2, "ratios_vs_ample", "stock-ample", "vs stock, ample pool", "C0")):
        # total tokens/s: lengths are fixed, so every token rate gives the same ratio
        heights = [r[key]["total_tokens_per_s"] if key in r else 0.0 for r in compared]
        bars = ax.bar(x + offset, heights, width=0.4, color=color, label=label)
        for bar, r in zip(bars, compared):
            if key in r:
                stock, ours = r["runs"][against]["total_tokens_per_s"], r["runs"]["sentinel"]["total_tokens_per_s"]
                ax.annotate(f"{bar.get_height():.2f}x\n{ours:.0f} vs\n{stock:.0f}", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=7)
        tallest = max([tallest] + heights)
    ax.set_xticks(x, names)
    ax.axhline(1.0, color="grey", linestyle="--")
    ax.set_ylim(0, tallest * 1.4)
    ax.set_ylabel("sentinel / stock total tokens/s")
    ax.legend(fontsize=8)
    ax.set_title("throughput ratio, same model and prompts")

    ax = axes[1]
    kv_bound = next((r for r in results if r["workload"]["name"] == "kv-bound"), None)
    if kv_bound:
        for backend, run in kv_bound["runs"].items():
            t, blocks, _ = zip(*run["kv_blocks_over_time"])
            ax.plot(t, blocks, label=f"{backend} (preemptions {run['preemptions']})")
        ax.axhline(cdiv(kv_bound["kv_budget_tokens"], BLOCK_SIZE), color="grey", linestyle=":", label="KV pool")
        ax.set_xlabel("seconds")
        ax.set_ylabel("KV blocks in use")
        ax.set_title("kv-bound: KV blocks over time")
        ax.legend()

    ax = axes[2]
    if sweep:
        spans = [r["workload"]["span"] for r in sweep]
        ax.plot(spans, [r["runs"]["sentinel"]["output_tokens_per_s"] for r in sweep], "o-", label="sentinel")
        stock = next((r["runs"]["stock"]["output_tokens_per_s"] for r in sweep if "stock" in r["runs"]), None)
        if stock:
            ax.axhline(stock, color="C0", linestyle="--", label="stock")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("span length L")
        ax.set_ylabel("output tokens / s")
        ax.set_title("span-sweep")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench(model_dir: str, out_dir: str | Path, workloads: list[str], quick: bool = False, dtype: str = "auto",
          load_format: str = "auto", enforce_eager: bool = False, label: str | None = None, rounds: int = 1) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"dtype": dtype, "load_format": load_format, "enforce_eager": enforce_eager}
    print(f"{Path(model_dir).name}: both engines {'eager (--enforce-eager)' if enforce_eager else 'compiled'}, "
          f"dtype {dtype}" + (f", {rounds} rounds of fresh prompts, engines taking turns" if rounds > 1 else ""),
          flush=True)
    table = QUICK if quick else WORKLOADS
    started = time.time()
    results, sweep = [], []
    for name in workloads:
        if name == "span-sweep":
            base, spans = (QUICK_SWEEP, QUICK_SPANS) if quick else (SWEEP, SWEEP_SPANS)
            sweep = compare(model_dir, [replace(base, span=span) for span in spans], settings, rounds=rounds)
            for result in sweep:
                print(format_result(result), flush=True)
            continue
        if name not in table:
            raise ValueError(f"unknown workload {name!r}; choose from {sorted(table) + ['span-sweep']}")
        results += compare(model_dir, [table[name]], settings, rounds=rounds)
        print(format_result(results[-1]), flush=True)
    label = label or Path(model_dir).name
    report = {"model": str(model_dir), "label": label, "settings": settings, "quick": quick, "rounds": rounds,
              "seconds": time.time() - started, "results": results, "span_sweep": sweep}
    (out_dir / f"bench-{label}.json").write_text(json.dumps(report, indent=2))
    plot(results, sweep, out_dir / f"bench-{label}.png", f"stock vLLM vs sentinel backend: {label}")
    return report


# A Llama of realistic proportions (grouped-query attention 3:1, head size 64, SwiGLU 2.67x, 32k
# vocabulary), 75M multiply-adds per token: small enough to bench on two cores.
REALISTIC_SHAPE = dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                       vocab_size=32000, max_position_embeddings=8192)


def realistic_dummy_model(out_dir: str | Path, schedule: ScheduleConfig = ScheduleConfig(4, 16, 0),
                          max_positions: int | None = None) -> Path:
    """A weightless model directory: vLLM runs it with load_format="dummy" (random weights)."""
    from ..random_model import LlamaShape, write_random_sentinel_model

    out_dir = Path(out_dir)
    shape = LlamaShape(**{**REALISTIC_SHAPE, **({"max_position_embeddings": max_positions} if max_positions else {})})
    config_file = out_dir / "config.json"
    current = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if (current.get("hidden_size"), current.get("num_hidden_layers"), current.get("max_position_embeddings")) \
            != (shape.hidden_size, shape.num_layers, shape.max_position_embeddings) \
            or not (out_dir / "sentinel_config.json").is_file():
        write_random_sentinel_model(out_dir, shape, schedule, weights=False)
    return out_dir


# -- long prompts: one engine per process, so that each one's peak memory is its own ---------------
# (prompt length, span override): the default schedule at 16k and 32k, and spans of 8 at 32k, where a
# chunk holds the most pieces.
LONG_PROMPTS = [(16384, None), (32768, None), (32768, 8)]
QUICK_LONG_PROMPTS = [(512, 8)]


def _long_prompt_child(spec: dict) -> dict:
    """In a fresh process: one engine, one prompt, one output token; time to first token."""
    from vllm import LLM, SamplingParams

    length, span = spec["length"], spec["span"]
    # a pool of exactly one uncompressed request: the prompt and its output token fit stock too
    workload = Workload("long-prompt", 1, length, 16, kv_budget_requests=1.0)
    config = json.loads((Path(spec["model"]) / "config.json").read_text())
    kwargs = engine_kwargs(workload, config, dtype="bfloat16", load_format="dummy", enforce_eager=spec["enforce_eager"])
    if spec["backend"] == "sentinel":
        kwargs["attention_backend"] = "sentinel"
    llm = LLM(model=spec["model"], **kwargs)
    prompt = random_prompts(1, length, spec["vocab"], tuple(spec["avoid"]))[0]
    extra = {"sentinel": {"span": span}} if span and spec["backend"] == "sentinel" else None
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, extra_args=extra)
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    ttft = time.perf_counter() - started
    llm.llm_engine.engine_core.shutdown()
    return {"ttft_s": ttft}


def _run_measuring_tree_rss(command: list[str]) -> tuple[int, str, str, float]:
    """Run `command`, sampling the summed RSS of it and all its descendants (EngineCore is one):
    (return code, stdout, stderr, peak GiB)."""
    import subprocess
    import tempfile

    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), peak / (1 << 30)


def long_prompts(out_dir: str | Path, quick: bool = False, enforce_eager: bool = False) -> list[dict]:
    """Stock and sentinel on single long prompts (default `max_num_batched_tokens`), each engine in
    its own process; a realistic-shape dummy model with room for 32k positions."""
    import sys

    cases = QUICK_LONG_PROMPTS if quick else LONG_PROMPTS
    longest = max(length for length, _ in cases)
    model = realistic_dummy_model(Path(out_dir) / f"model-dummy-{longest // 1024}k", max_positions=longest + 64)
    config = json.loads((model / "config.json").read_text())
    avoid = list(SentinelConfig.load(model).sentinel_ids)
    results = []
    for length, span in cases:
        row = {"length": length, "span": span}
        for backend in ("stock", "sentinel"):
            spec = {"backend": backend, "model": str(model), "length": length, "span": span,
                    "enforce_eager": enforce_eager,
                    "vocab": config["vocab_size"], "avoid": avoid}
            code = ("import json, sys; from vllm_sentinel.bench.throughput import _long_prompt_child; "
                    "print('RESULT ' + json.dumps(_long_prompt_child(json.loads(sys.argv[1]))))")
            returncode, stdout, stderr, peak = _run_measuring_tree_rss([sys.executable, "-c", code, json.dumps(spec)])
            lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
            if returncode != 0 or not lines:
                raise RuntimeError(f"long-prompt {backend} at {length} tokens failed:\n{stderr[-3000:]}")
            row[backend] = {**json.loads(lines[-1][len("RESULT "):]), "peak_rss_gib": peak}
        row["ttft_ratio"] = row["sentinel"]["ttft_s"] / row["stock"]["ttft_s"]
        row["rss_ratio"] = row["sentinel"]["peak_rss_gib"] / row["stock"]["peak_rss_gib"]
        print(format_long_prompt(row), flush=True)
        results.append(row)
    return results


def format_long_prompt(row: dict) -> str:
    span = f", span {row['span']}" if row["span"] else ""
    return (f"[long-prompt] one prompt of {row['length']} tokens{span}: time to first token stock "
            f"{row['stock']['ttft_s']:.1f} s, sentinel {row['sentinel']['ttft_s']:.1f} s ({row['ttft_ratio']:.2f}x); "
            f"peak RSS stock {row['stock']['peak_rss_gib']:.2f} GiB, sentinel {row['sentinel']['peak_rss_gib']:.2f} GiB "
            f"({row['rss_ratio']:.2f}x)")

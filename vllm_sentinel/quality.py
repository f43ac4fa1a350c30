"""`vllm-sentinel quality`: the paper's language-modelling comparison, in miniature.

From one base model (by default the tiny default's base), fine-tune with the same recipe and the
same budget (the same number of steps on the same data): the sentinel method and the paper's two
baselines, local attention and scattered attention, each at the KV budgets of net compression
ratios 0.5, 0.75 and 0.9 (schedules with spans of 2, 4 and 10 tokens back to back), plus full
attention. Then:

1. held-out perplexity of each model under its own regime: the table, printed and plotted;
2. the sentinel perplexity measured through vLLM (`prompt_logprobs`, sentinel backend) against the
   transformers figure for the same windows;
3. zero-shot continuation: held-out document prefixes continued with compression and with full
   attention; n-gram overlap with the true continuation, and the perplexity of the generated text
   under the full-attention fine-tune.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import ScheduleConfig, SentinelConfig
from .corpus import DEFAULT_CORPUS, corpus_streams
from .evaluate import perplexity, windows
from .training import TrainConfig, load_base, train

METHODS = ("sentinel", "local", "scattered")
RATIOS = {0.5: ScheduleConfig(4, 2, 0), 0.75: ScheduleConfig(4, 4, 0), 0.9: ScheduleConfig(4, 10, 0)}


@dataclass
class QualityConfig:
    base: str = "models/tiny/base"
    corpus: str = str(DEFAULT_CORPUS)
    out: str = "runs/quality"
    steps: int = 150               # fine-tuning steps per model: the same for every method
    budget_s: float | None = None  # optional: also stop at the same seconds each (sentinel steps cost more)
    ratios: tuple[float, ...] = (0.5, 0.75, 0.9)
    window: int = 256
    eval_tokens: int = 16_384
    vllm_ratio: float = 0.9         # which sentinel model goes through vLLM
    continuation_prompts: int = 32
    prefix_len: int = 128
    continuation_len: int = 48
    lora_rank: int = 16
    seed: int = 0
    recipe_overrides: dict = field(default_factory=dict)  # e.g. {"seq_len": 64, "batch_size": 2} for tiny runs


def fine_tune(cfg: QualityConfig, method: str, schedule: ScheduleConfig, streams, out_dir: Path) -> Path:
    """One model of the table, cached by its directory while its recipe stays the same."""
    recipe = TrainConfig(schedule=schedule, regime=method, steps=cfg.steps, time_budget_s=cfg.budget_s,
                         lora_rank=cfg.lora_rank, eval_every=10**9, checkpoint_every=10**9, seed=cfg.seed,
                         eval_tokens=min(cfg.eval_tokens, 4096), seq_len=cfg.window, **cfg.recipe_overrides)
    log = out_dir / "train_log.json"
    if log.is_file() and json.loads(log.read_text())["config"] == {**asdict(recipe), "schedule": asdict(schedule)}:
        return out_dir
    model, tokenizer = load_base(cfg.base)
    train(model, tokenizer, *streams, recipe, out_dir)
    return out_dir


def perplexity_table(cfg: QualityConfig, heldout: list[int], models: dict) -> dict:
    table = {}
    for (method, ratio), model_dir in models.items():
        model, _ = load_base(model_dir)
        schedule = RATIOS.get(ratio, ScheduleConfig())
        # Only the sentinel regime uses the sentinel ids; the baselines need the schedule's spans.
        config = SentinelConfig.load(model_dir) if method == "sentinel" else SentinelConfig(schedule=schedule)
        table[f"{method}@{ratio}"] = perplexity(model, heldout, method, config, schedule, window=cfg.window,
                                                 max_tokens=cfg.eval_tokens)
    return table


def vllm_perplexity(model_dir: Path, heldout: list[int], cfg: QualityConfig) -> dict:
    """Sentinel perplexity through vLLM's prompt_logprobs and through the dense oracle, same windows."""
    from vllm import LLM, SamplingParams

    from .oracle import dense_logits, mask_sentinels
    from .schedule import ScheduledSpans

    chunks = windows(heldout, cfg.window, cfg.eval_tokens)
    llm = LLM(model=str(model_dir), attention_backend="sentinel", dtype="float32", enforce_eager=True,
              kv_cache_memory_bytes=1 << 30, max_model_len=cfg.window + 8, seed=0)
    try:
        outputs = llm.generate([{"prompt_token_ids": c.tolist()} for c in chunks],
                               SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    engine_nll = -sum(out.prompt_logprobs[i][int(c[i])].logprob for out, c in zip(outputs, chunks)
                      for i in range(1, len(c)))
    model, _ = load_base(model_dir)
    config = SentinelConfig.load(model_dir)
    spans = ScheduledSpans(config.schedule).spans(cfg.window)
    oracle_nll = 0.0
    for c in chunks:
        logprobs = torch.log_softmax(mask_sentinels(dense_logits(model, c, spans, config), config), dim=-1)
        oracle_nll -= float(logprobs[torch.arange(len(c) - 1), c[1:]].sum())
    count = sum(len(c) - 1 for c in chunks)
    engine, oracle = math.exp(engine_nll / count), math.exp(oracle_nll / count)
    return {"vllm": engine, "transformers": oracle, "relative_difference": abs(engine - oracle) / oracle,
            "tokens": count}


def ngram_overlap(candidate: list[int], reference: list[int], n: int) -> float:
    """F1 of n-gram counts (ROUGE-n on token ids)."""
    def grams(ids):
        counts = {}
        for i in range(len(ids) - n + 1):
            gram = tuple(ids[i: i + n])
            counts[gram] = counts.get(gram, 0) + 1
        return counts

    c, r = grams(candidate), grams(reference)
    overlap = sum(min(count, r.get(gram, 0)) for gram, count in c.items())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(c.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def continuations(model_dir: Path, judge_dir: Path, heldout: list[int], cfg: QualityConfig) -> dict:
    """Continue held-out prefixes compressed and uncompressed; score overlap and judge perplexity."""
    from vllm import LLM, SamplingParams

    span = cfg.prefix_len + cfg.continuation_len
    starts = range(0, len(heldout) - span, max(span, (len(heldout) - span) // cfg.continuation_prompts))
    pieces = [heldout[s: s + span] for s in list(starts)[: cfg.continuation_prompts]]
    prefixes, references = [p[: cfg.prefix_len] for p in pieces], [p[cfg.prefix_len:] for p in pieces]
    params = SamplingParams(max_tokens=cfg.continuation_len, temperature=0, ignore_eos=True)
    generated = {}
    for name, kwargs in (("compressed", {"attention_backend": "sentinel"}), ("full attention", {})):
        llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 30,
                  max_model_len=span + 8, seed=0, **kwargs)
        try:
            outs = llm.generate([{"prompt_token_ids": p} for p in prefixes], params, use_tqdm=False)
        finally:
            llm.llm_engine.engine_core.shutdown()
        generated[name] = [list(o.outputs[0].token_ids) for o in outs]
    judge, _ = load_base(judge_dir)
    report = {}
    for name, texts in generated.items():
        nll, count = 0.0, 0
        with torch.no_grad():
            for prefix, text in zip(prefixes, texts):
                ids = torch.tensor([prefix + text])
                logprobs = torch.log_softmax(judge(input_ids=ids).logits[0, :-1].float(), dim=-1)
                targets = ids[0, 1:]
                picked = logprobs[torch.arange(len(targets)), targets][len(prefix) - 1:]
                nll -= float(picked.sum())
                count += picked.numel()
        report[name] = {"rouge1_f1": sum(ngram_overlap(t, r, 1) for t, r in zip(texts, references)) / len(texts),
                        "rouge2_f1": sum(ngram_overlap(t, r, 2) for t, r in zip(texts, references)) / len(texts),
                        "judge_perplexity": math.exp(nll / count)}
    report["prompts"] = len(prefixes)
    return report


def plot(table: dict, cfg: QualityConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    for method in METHODS:
        points = [(ratio, table[f"{method}@{ratio}"]) for ratio in cfg.ratios if f"{method}@{ratio}" in table]
        if points:
            ax.plot(*zip(*points), "o-", label=method)
    if "full@1.0" in table:
        ax.axhline(table["full@1.0"], color="grey", linestyle="--", label="full attention")
    ax.set_xlabel("net compression ratio (share of KV dropped)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("same base, recipe and budget per model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(report: dict) -> str:
    cfg, table = report["config"], report["perplexity"]
    budget = f"{cfg['budget_s']:.0f} s" if cfg["budget_s"] else f"{cfg['steps']} steps"
    lines = [f"held-out perplexity ({cfg['eval_tokens']} tokens in windows of {cfg['window']}; "
             f"{budget} of fine-tuning per model):",
             "  ratio   " + "".join(f"{m:>12}" for m in METHODS)]
    for ratio in cfg["ratios"]:
        row = "".join(f"{table.get(f'{m}@{ratio}', float('nan')):12.2f}" for m in METHODS)
        best = min(METHODS, key=lambda m: table.get(f"{m}@{ratio}", float("inf")))
        lines.append(f"  {ratio:<7} {row}   best: {best}")
    lines.append(f"  full attention: {table['full@1.0']:.2f}")
    wins = report["sentinel_beats_both_baselines"]
    lines.append(f"sentinel beats both baselines at every ratio: {all(wins.values())} ({wins})")
    v = report["vllm_check"]
    lines.append(f"sentinel perplexity at ratio {cfg['vllm_ratio']}: vLLM {v['vllm']:.4f}, transformers "
                 f"{v['transformers']:.4f} (relative difference {v['relative_difference']:.1e}, {v['tokens']} tokens)")
    c = report["continuation"]
    for name in ("compressed", "full attention"):
        lines.append(f"continuation, {name:>14}: ROUGE-1 F1 {c[name]['rouge1_f1']:.3f}, ROUGE-2 F1 "
                     f"{c[name]['rouge2_f1']:.3f}, perplexity under the full-attention model "
                     f"{c[name]['judge_perplexity']:.2f} ({c['prompts']} held-out prefixes)")
    return "\n".join(lines)


def run_quality(cfg: QualityConfig) -> dict:
    started = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_base(cfg.base)
    streams = corpus_streams(cfg.corpus, tokenizer)
    models = {("full", 1.0): fine_tune(cfg, "full", ScheduleConfig(), streams, out / "full")}
    for ratio in cfg.ratios:
        for method in METHODS:
            models[(method, ratio)] = fine_tune(cfg, method, RATIOS[ratio], streams, out / f"{method}-{ratio}")
    table = perplexity_table(cfg, streams[1], models)
    wins = {str(r): table[f"sentinel@{r}"] < min(table[f"local@{r}"], table[f"scattered@{r}"]) for r in cfg.ratios}
    sentinel_dir = models[("sentinel", cfg.vllm_ratio)]
    report = {"config": asdict(cfg), "perplexity": table, "sentinel_beats_both_baselines": wins,
              "vllm_check": vllm_perplexity(sentinel_dir, streams[1], cfg),
              "continuation": continuations(sentinel_dir, models[("full", 1.0)], streams[1], cfg)}
    report["seconds"] = time.time() - started
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    plot(table, cfg, out / "quality.png")
    return report

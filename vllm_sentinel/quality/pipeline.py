"""One run of `vllm-sentinel quality`: base -> fine-tunes -> scores -> vLLM check -> JSON + PNG."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ScheduleConfig
from ..training.corpus import DEFAULT_CORPUS, load_documents, split_documents
from ..training.pretrain import BaseModelConfig, Stage, pretrain_base, train_tokenizer
from ..training.recall import RecallConfig, RecallGenerator
from ..training.recipe import TrainConfig, load_base, train
from .corpora import CORPORA, docs_windows, long_document_streams, stdlib_windows
from .methods import LABELS, METHODS, REGIME, plan, spans_of
from .recall import gate, plot_recall, predicted_tokens, score_marked_recall, score_recall, summarise_recall
from .scoring import (distant_targets, examples_for, greedy_continue, judge_perplexity, perplexity_of, rouge_l,
                      rouge_n, span_offsets, token_nll)


def long_base(steps: int = 3000, **overrides) -> BaseModelConfig:
    """A small Llama that uses its whole window of 1,024 tokens: hidden 128 (two heads of 64, what
    vLLM's CPU attention takes), 4 layers, 1.85M parameters, pretrained through a stated curriculum
    of `steps` steps (3,000 by default, ~22 min on 2 quiet cores):

    1. 60% of the steps on 32 windows of 128 tokens, every one a recall document (3 facts, 3 queries);
    2. 20% on 8 windows of 512 tokens, half prose, half recall documents (6 facts, 6 queries);
    3. 20% on 4 windows of 1,024 tokens, half prose, half recall documents (the evaluation's shape).

    Why: the retrieval circuit (find "WORD is" earlier, copy what followed) forms suddenly, after
    ~1,000 steps of dense short recall documents at a learning rate of 1e-3; on windows of 1,024
    tokens with prose in the mix, or at 3e-3, it had not formed after 1,500 steps. The later stages
    carry it to the whole window and teach the prose."""
    stage_steps = [round(steps * 0.6), round(steps * 0.2)]
    stage_steps.append(steps - sum(stage_steps))
    curriculum = (Stage(stage_steps[0], 128, 32, 1.0, RecallConfig(facts=3, queries=3)),
                  Stage(stage_steps[1], 512, 8, 0.5, RecallConfig(facts=6, queries=6)),
                  Stage(stage_steps[2], 1024, 4, 0.5, RecallConfig(facts=8, queries=6)))
    shape = {"hidden_size": 128, "num_layers": 4, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 352,
             "seq_len": 1024, "batch_size": 4, "steps": steps, "warmup": 30, "lr": 1e-3, "curriculum": curriculum}
    return BaseModelConfig(**{**shape, **overrides})


@dataclass
class QualityConfig:
    base: str | None = None        # an existing base model directory; None: build (and cache) the long-context base
    base_model: BaseModelConfig = field(default_factory=long_base)
    corpus: str = str(DEFAULT_CORPUS)
    max_documents: int | None = None  # a slice of the corpus (tests)
    stdlib: str | None = None         # the second corpus' root; None: this interpreter's stdlib
    out: str = "runs/quality"
    window: int = 1024                # real tokens per training and evaluation window
    ratios: tuple[float, ...] = (0.5, 0.75, 0.9)
    window_fraction: float = 0.5      # sentinel+W: W = this share of the KV budget (a rule fixed in advance)
    steps: int = 120                  # fine-tuning steps per model: the same for every method
    batch_size: int = 2               # windows per fine-tuning step
    warmup: int | None = None         # fine-tuning warm-up steps (None: a tenth of the steps)
    lora_rank: int = 16
    eval_tokens: int = 12_288         # per corpus (windows of `window`)
    eval_batch: int = 4
    continuation_prompts: int = 4     # per corpus
    continuation_len: int = 32
    vllm_ratio: float = 0.9           # which sentinel+W model goes through vLLM
    vllm_windows: int = 4
    seed: int = 0
    recall: RecallConfig = field(default_factory=lambda: RecallConfig(facts=8, queries=6))  # length: `window`
    recall_share: float = 0.5         # of the fine-tuning windows (the base has its own curriculum)
    recall_documents: int = 48        # held-out recall documents of each kind
    recipe_overrides: dict = field(default_factory=dict)  # more TrainConfig fields

    @property
    def eval_windows(self) -> int:
        return max(1, self.eval_tokens // self.window)

    @property
    def recall_config(self) -> RecallConfig:
        return replace(self.recall, length=self.window)


def _fingerprint(blob) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- the base ----------------------------------------------------------------------------------------

def build_base(cfg: QualityConfig) -> tuple[Path, str]:
    """The long-context base, cached under --out by the fingerprint of its corpus and config."""
    if cfg.base:
        return Path(cfg.base), _fingerprint({"base": str(Path(cfg.base).resolve())})
    key = _fingerprint({"corpus": cfg.corpus, "max_documents": cfg.max_documents, "base": asdict(cfg.base_model)})
    base_dir = Path(cfg.out) / f"base-{key}"
    if (base_dir / "pretrain_stats.json").is_file():
        return base_dir, key
    train_docs, _ = split_documents(load_documents(cfg.corpus)[: cfg.max_documents])
    tokenizer = train_tokenizer([d.text for d in train_docs])  # held-out text never shapes the vocabulary
    streams = long_document_streams(cfg.corpus, tokenizer, cfg.base_model.seq_len, cfg.max_documents)
    model, stats = pretrain_base(cfg.base_model, *streams, tokenizer=tokenizer)
    stats["train_tokens_in_long_documents"] = len(streams[0])
    tmp = base_dir.with_name(base_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain_stats.json").write_text(json.dumps(stats, indent=2))
    tmp.rename(base_dir)
    return base_dir, key


# -- the fine-tunes ----------------------------------------------------------------------------------

def recipe(cfg: QualityConfig, method: str, schedule: ScheduleConfig | None) -> TrainConfig:
    return TrainConfig(schedule=schedule or ScheduleConfig(), regime=REGIME[method], seq_len=cfg.window,
                       batch_size=cfg.batch_size, steps=cfg.steps, lora_rank=cfg.lora_rank, eval_every=10**9,
                       warmup=cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 10),
                       checkpoint_every=10**9, eval_tokens=cfg.window, seed=cfg.seed,
                       recall_share=cfg.recall_share, recall=cfg.recall_config, **cfg.recipe_overrides)


def fine_tune(cfg: QualityConfig, base_dir: Path, method: str, schedule, streams, out_dir: Path) -> Path:
    """One model of the table, cached by its directory while its recipe stays the same."""
    config = recipe(cfg, method, schedule)
    log = out_dir / "train_log.json"
    if log.is_file() and json.loads(log.read_text())["config"] == {**asdict(config), "schedule": asdict(config.schedule)}:
        return out_dir
    model, tokenizer = load_base(base_dir)
    train(model, tokenizer, *streams, config, out_dir)
    return out_dir


def model_dirs(cfg: QualityConfig, plans: dict, base_dir: Path, base_key: str, streams) -> dict:
    root = Path(cfg.out) / f"models-{base_key}"
    dirs = {("full", None): fine_tune(cfg, base_dir, "full", None, streams, root / "full")}
    for ratio, p in plans.items():
        for method in METHODS[1:]:
            dirs[(method, ratio)] = fine_tune(cfg, base_dir, method, p["schedules"][method], streams,
                                              root / f"{method}-{ratio}")
    return dirs


# -- scores ------------------------------------------------------------------------------------------

def sentinel_ids_of(tokenizer) -> tuple[int, int]:
    return tuple(tokenizer.convert_tokens_to_ids(["<CL>", "<CR>"]))


def kv_counts(plans: dict, n: int, sentinel_ids: tuple[int, int]) -> dict:
    """Per method and ratio: keys per query measured off the method's own mask."""
    counts = {}
    for ratio, p in plans.items():
        per_method = {}
        for method in METHODS:
            schedule = p["schedules"][method]
            [example] = examples_for([torch.full((n,), 5)], REGIME[method], spans_of(schedule, n), sentinel_ids,
                                     schedule.window if schedule else 0)
            real = ((example.input_ids != sentinel_ids[0]) & (example.input_ids != sentinel_ids[1])).nonzero().squeeze(1)
            per_method[method] = example.mask[real].sum(dim=1)
        counts[ratio] = per_method
    return counts


def continuation_prompts(windows: list[torch.Tensor], count: int, length: int) -> list[torch.Tensor]:
    picks = sorted({round(i * (len(windows) - 1) / max(1, count - 1)) for i in range(count)})
    return [windows[i] for i in picks][:count]


def score_model(model, tokenizer, method: str, schedule, windows: list[torch.Tensor], prompts: list[torch.Tensor],
                cfg: QualityConfig, progress) -> dict:
    ids = sentinel_ids_of(tokenizer)
    n = cfg.window
    w = schedule.window if schedule else 0
    examples = examples_for(windows, REGIME[method], spans_of(schedule, n), ids, w, seed=cfg.seed)
    nll = token_nll(model, examples, cfg.eval_batch, progress, banned_ids=ids)
    prompt_examples = examples_for(prompts, REGIME[method], spans_of(schedule, n), ids, w, seed=cfg.seed + 1)
    prefix_len = n - cfg.continuation_len
    generated = []
    for first in range(0, len(prompt_examples), cfg.eval_batch):
        generated += greedy_continue(model, prompt_examples[first: first + cfg.eval_batch], prefix_len,
                                     cfg.continuation_len, ids, ids)
    return {"nll": nll, "generated": generated}


def summarise(nll: torch.Tensor, distant: torch.Tensor, offsets: torch.Tensor) -> dict:
    overall, tokens = perplexity_of(nll)
    far, far_tokens = perplexity_of(nll, distant)
    by_offset = []
    offsets = offsets[: nll.shape[1]]
    for k in range(int(offsets.max()) + 1 if offsets.numel() else 0):
        by_offset.append(perplexity_of(nll[:, offsets == k])[0])
    outside = perplexity_of(nll[:, offsets < 0])[0] if bool((offsets < 0).any()) else None
    return {"perplexity": overall, "tokens": tokens, "distant_perplexity": far, "distant_tokens": far_tokens,
            "perplexity_by_span_offset": by_offset, "perplexity_outside_spans": outside}


def continuation_scores(generated: list[list[int]], prompts: list[torch.Tensor], judge, cfg: QualityConfig,
                        banned_ids: tuple[int, ...]) -> dict:
    prefix_len = cfg.window - cfg.continuation_len
    references = [p[prefix_len:].tolist() for p in prompts]
    prefixes = [p[:prefix_len].tolist() for p in prompts]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"rouge1_f1": mean([rouge_n(g, r, 1) for g, r in zip(generated, references)]),
            "rouge2_f1": mean([rouge_n(g, r, 2) for g, r in zip(generated, references)]),
            "rougeL_f1": mean([rouge_l(g, r) for g, r in zip(generated, references)]),
            "judge_perplexity": judge_perplexity(judge, prefixes, generated, banned_ids), "prompts": len(prompts)}


@torch.no_grad()
def base_context_use(base_dir: Path, windows: list[torch.Tensor], batch: int) -> dict:
    """Does the base use distant context? Perplexity of the second half of each window's targets
    with every key, and with only the most recent K keys."""
    from ..training.batching import Example

    model, _ = load_base(base_dir)
    n = windows[0].numel()
    key, query = torch.arange(n).unsqueeze(0), torch.arange(n).unsqueeze(1)
    report = {}
    for keys in sorted({k for k in (32, 128, n // 2, n) if k <= n}):
        mask = (key <= query) & (key > query - keys)
        examples = []
        for w in windows:
            labels = torch.full((n,), -100, dtype=torch.long)
            labels[n // 2: -1] = w[n // 2 + 1:]
            examples.append(Example(w, torch.arange(n), labels, mask))
        nll = token_nll(model, examples, batch)
        report["all keys" if keys == n else f"last {keys} keys"] = perplexity_of(nll)[0]
    return report


# -- vLLM --------------------------------------------------------------------------------------------

def vllm_check(model_dir: Path, windows: list[torch.Tensor], transformers_nll: torch.Tensor, n: int) -> dict:
    """The sentinel+W model's perplexity through vLLM (`prompt_logprobs`, sentinel backend, the
    schedule and window its sentinel_config.json records) against the transformers figure."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), attention_backend="sentinel", dtype="float32", enforce_eager=True,
              kv_cache_memory_bytes=1 << 30, max_model_len=n + 8, seed=0)
    try:
        outputs = llm.generate([{"prompt_token_ids": w.tolist()} for w in windows],
                               SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    engine = torch.tensor([[-out.prompt_logprobs[i][int(w[i])].logprob for i in range(1, len(w))]
                           for out, w in zip(outputs, windows)], dtype=torch.float64)
    reference = transformers_nll[: len(windows)].double()
    v, t = math.exp(float(engine.mean())), math.exp(float(reference.mean()))
    return {"vllm": v, "transformers": t, "relative_difference": abs(v - t) / t,
            "max_token_logprob_difference": float((engine - reference).abs().max()), "tokens": engine.numel()}


def vllm_recall_check(model_dir: Path, documents, schedule: ScheduleConfig, transformers_rows: list[dict],
                      batch_size: int) -> dict:
    """Every recall query through vLLM (sentinel backend, greedy): the same answers as transformers'
    greedy decoding (each vLLM answer is checked to be the dense masked pass's argmax at every step),
    the same exact-match verdicts as the teacher-forced scoring, and the KV each request held."""
    from vllm import LLM, SamplingParams

    from ..engine.layout import KVLayout
    from ..observe import run_workload

    prompts = [doc.ids[: q.answer_start].tolist() for doc in documents for q in doc.queries]
    answers = [doc.ids[q.answer_start: q.answer_end].tolist() for doc in documents for q in doc.queries]
    longest = max(len(p) + len(a) for p, a in zip(prompts, answers))
    llm = LLM(model=str(model_dir), attention_backend="sentinel", dtype="float32", enforce_eager=True,
              kv_cache_memory_bytes=1 << 30, max_model_len=longest + 8, seed=0, disable_log_stats=False)
    try:
        record = run_workload(llm, prompts, [SamplingParams(max_tokens=len(a), temperature=0, ignore_eos=True)
                                             for a in answers], progress="recall through vLLM")
    finally:
        llm.llm_engine.engine_core.shutdown()
    generated = [list(out.outputs[0].token_ids) for out in record.outputs]
    model, tokenizer = load_base(model_dir)
    ids = sentinel_ids_of(tokenizer)
    # Greedy in transformers: each generated token must be the dense masked pass's argmax after what precedes it.
    streams = [torch.tensor(p + g) for p, g in zip(prompts, generated)]
    same = 0
    for first in range(0, len(streams), batch_size):
        part = streams[first: first + batch_size]
        examples = [examples_for([x], "sentinel", spans_of(schedule, x.numel()), ids, schedule.window)[0] for x in part]
        for x, pred, p in zip(part, predicted_tokens(model, examples, ids, batch_size), prompts[first: first + batch_size]):
            same += bool(torch.equal(pred[len(p) - 1: x.numel() - 1], x[len(p):]))
    vllm_hits = [g == a for g, a in zip(generated, answers)]
    layout = KVLayout(schedule)
    full = [len(p) + len(a) - 1 for p, a in zip(prompts, answers)]  # tokens computed by the last step
    held = [max(layout.physical_len(len(p)), layout.physical_len(n)) for p, n in zip(prompts, full)]
    gauge = [s for s in record.samples if s["running"] and s["kv_tokens"]]
    return {"queries": len(prompts), "greedy_equal_to_transformers": same,
            "exact_match_vllm": sum(vllm_hits) / len(vllm_hits),
            "exact_match_transformers": sum(r["hit"] for r in transformers_rows) / len(transformers_rows),
            "verdicts_equal": sum(h == r["hit"] for h, r in zip(vllm_hits, transformers_rows)),
            "kv_slots_per_request": held, "full_attention_slots_per_request": full,
            "vllm_slots_per_token": (sum(s["kv_slots"] for s in gauge) / sum(s["kv_tokens"] for s in gauge)
                                     if gauge else None),
            "schedule": asdict(schedule)}


# -- the run -----------------------------------------------------------------------------------------

# "Documents compressed, question raw" (marked regions) against a sliding window at the same KV.
MARKED_METHODS = ("sentinel_window", "local")


def run_quality(cfg: QualityConfig) -> dict:
    from .report import plot, verdicts

    started = time.time()
    seconds = {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n = cfg.window
    plans = {ratio: plan(ratio, n, cfg.window_fraction) for ratio in cfg.ratios}

    base_dir, base_key = build_base(cfg)
    seconds["base"] = time.time() - started
    _, tokenizer = load_base(base_dir)
    windows = {"docs": docs_windows(cfg.corpus, tokenizer, n, cfg.eval_windows, cfg.max_documents),
               "stdlib": stdlib_windows(tokenizer, n, cfg.eval_windows, cfg.stdlib)}
    context_use = base_context_use(base_dir, windows["docs"], cfg.eval_batch)

    mark = time.time()
    streams = long_document_streams(cfg.corpus, tokenizer, n, cfg.max_documents)
    dirs = model_dirs(cfg, plans, base_dir, base_key, streams)
    seconds["fine_tunes"] = time.time() - mark

    mark = time.time()
    prompts = {c: continuation_prompts(windows[c], cfg.continuation_prompts, n) for c in CORPORA}
    documents = RecallGenerator(streams[1], tokenizer, cfg.recall_config).evaluation_set(cfg.recall_documents,
                                                                                         seed=cfg.seed + 1000)
    raw, recall_rows, marked = {}, {}, {}
    total = len(dirs) * (sum(len(w) for w in windows.values()) + len(documents)) + \
        sum(method in MARKED_METHODS for method, _ in dirs) * len(documents)
    with tqdm(total=total, desc="score") as progress:
        for (method, ratio), model_dir in dirs.items():
            model, tokenizer = load_base(model_dir)
            schedule = plans[ratio]["schedules"][method] if ratio is not None else None
            for corpus in CORPORA:
                raw[(method, ratio, corpus)] = score_model(model, tokenizer, method, schedule, windows[corpus],
                                                           prompts[corpus], cfg, progress)
            recall_rows[(method, ratio)] = score_recall(model, documents, REGIME[method], schedule,
                                                        sentinel_ids_of(tokenizer), cfg.eval_batch, cfg.seed, progress)
            if method in MARKED_METHODS:  # the same documents marked, the questions raw, at equal keys per query
                marked[(method, ratio)] = score_marked_recall(
                    model, REGIME[method], documents, plans[ratio]["schedules"]["sentinel_window"],
                    sentinel_ids_of(tokenizer), cfg.eval_batch, progress)
    ids = sentinel_ids_of(tokenizer)
    counts = kv_counts(plans, n, ids)
    recall = {"documents": {"documents": len(documents), "queries": sum(len(d.queries) for d in documents),
                            "digits": cfg.recall.digits, "facts": cfg.recall.facts, "asked": cfg.recall.queries},
              "local_keys_last": {str(r): int(counts[r]["local"][-1]) for r in cfg.ratios},
              "results": {str(ratio): {method: summarise_recall(recall_rows[(method, None if method == "full" else ratio)],
                                                                counts[ratio]["local"], plans[ratio]["schedules"][method], n)
                                       for method in METHODS} for ratio in cfg.ratios}}
    recall["gate"] = gate(recall["results"])
    recall["marked"] = {str(ratio): {method: marked[(method, ratio)] for method in MARKED_METHODS}
                        for ratio in cfg.ratios}
    judge, _ = load_base(dirs[("full", None)])
    results = {}
    for corpus in CORPORA:
        results[corpus] = {}
        for ratio in cfg.ratios:
            distant = distant_targets(windows[corpus], counts[ratio]["local"])
            row = {}
            for method in METHODS:
                key = (method, None if method == "full" else ratio, corpus)
                schedule = plans[ratio]["schedules"][method]
                offsets = span_offsets(spans_of(schedule, n), n)
                row[method] = {**summarise(raw[key]["nll"], distant, offsets),
                               "continuation": continuation_scores(raw[key]["generated"], prompts[corpus], judge, cfg, ids)}
            results[corpus][str(ratio)] = row
    seconds["scoring"] = time.time() - mark

    mark = time.time()
    vllm_dir = dirs[("sentinel_window", cfg.vllm_ratio)]
    check = vllm_check(vllm_dir, windows["docs"][: cfg.vllm_windows],
                       raw[("sentinel_window", cfg.vllm_ratio, "docs")]["nll"], n)
    check["ratio"] = cfg.vllm_ratio
    recall["vllm"] = vllm_recall_check(vllm_dir, documents, plans[cfg.vllm_ratio]["schedules"]["sentinel_window"],
                                       recall_rows[("sentinel_window", cfg.vllm_ratio)], cfg.eval_batch)
    recall["vllm"]["ratio"] = cfg.vllm_ratio
    seconds["vllm_check"] = time.time() - mark
    seconds["total"] = time.time() - started

    report = {
        "config": asdict(cfg),
        "base": {"dir": str(base_dir), "pretrain": _read_json(base_dir / "pretrain_stats.json"),
                 "context_use_docs": context_use},
        "corpora": {c: {"windows": len(windows[c]), "tokens_per_window": n} for c in CORPORA},
        "plan": {str(ratio): {
            "target_keys": p["target_keys"],
            "schedules": {m: (asdict(s) if s else None) for m, s in p["schedules"].items()},
            "keys_per_query": {m: {"last": int(c[-1]), "mean": float(c.float().mean()), "max": int(c.max())}
                               for m, c in counts[ratio].items()},
            "baselines_match_sentinel_window_per_query": all(
                bool(torch.equal(counts[ratio][m], counts[ratio]["sentinel_window"]))
                for m in ("local", "sink", "scattered")),
        } for ratio, p in plans.items()},
        "recall": recall,
        "results": results,
        "vllm_check": check,
        "labels": LABELS,
        "seconds": seconds,
    }
    report["verdicts"] = verdicts(report)
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "quality.png")
    plot_recall(recall, out / "quality-recall.png")
    return report


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None

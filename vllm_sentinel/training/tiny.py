"""`vllm-sentinel make-tiny`: the offline default model, built from nothing but a Debian package.

1. split the python3.11-doc corpus by document into train / held-out (deterministic);
2. train a byte-level BPE tokenizer and a small Llama base model from scratch on train;
3. run the sentinel recipe on that base;
4. report held-out perplexity: full attention, sentinel compression, and the same compressed
   evaluation of the base model before sentinel training (what the recipe has to beat).
Each stage is cached in the output directory, so a second call returns at once.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ScheduleConfig, SentinelConfig
from .corpus import DEFAULT_CORPUS, corpus_streams, load_documents, split_documents
from .evaluate import perplexity
from .pretrain import BaseModelConfig, pretrain_base, train_tokenizer
from .recipe import DEFAULT_CHAT_TEMPLATE, TrainConfig, add_sentinel_tokens, load_base, train

REPORT_FILE = "make_tiny_report.json"


@dataclass
class TinyConfig:
    corpus: str = str(DEFAULT_CORPUS)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    # A recent window of two spans: the quality table (docs/results.md) puts sentinel with a window
    # within 0.4% of full attention and the paper's W = 0 16-24% behind it.
    recipe: TrainConfig = field(default_factory=lambda: TrainConfig(
        schedule=ScheduleConfig(sink=4, span=16, gap=0, window=32), steps=300,
        lr=2e-3, eval_every=1_000_000, checkpoint_every=50))
    max_documents: int | None = None  # a slice of the corpus, for quick runs and tests
    eval_tokens: int = 32_768

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build_base(cfg: TinyConfig, base_dir: Path) -> None:
    train_docs, _ = split_documents(load_documents(cfg.corpus)[: cfg.max_documents])
    tokenizer = train_tokenizer([d.text for d in train_docs])  # held-out never shapes the vocabulary
    model, stats = pretrain_base(cfg.base, *corpus_streams(cfg.corpus, tokenizer, cfg.max_documents))
    model.save_pretrained(base_dir, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "pretrain_stats.json").write_text(json.dumps(stats, indent=2))


def _add_chat_template(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        tokenizer.save_pretrained(model_dir)


def compressed_baseline_perplexity(base_dir: Path, heldout: list[int], cfg: TinyConfig) -> float:
    """The base model with the two tokens added but untrained, evaluated compressed."""
    model, tokenizer = load_base(base_dir)
    cl, cr = add_sentinel_tokens(model, tokenizer)
    sentinel = SentinelConfig(cl_token_id=cl, cr_token_id=cr, schedule=cfg.recipe.schedule)
    return perplexity(model, heldout, "sentinel", sentinel, window=cfg.recipe.seq_len, max_tokens=cfg.eval_tokens)


def make_tiny(out_dir: str | Path, cfg: TinyConfig | None = None, force: bool = False) -> dict:
    cfg = cfg or TinyConfig()
    out_dir = Path(out_dir)
    report_path = out_dir / REPORT_FILE
    if not force and report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("fingerprint") == cfg.fingerprint():
            _add_chat_template(out_dir)  # models built before the recipe wrote one
            return report
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    base_dir = out_dir / "base"
    if force or not (base_dir / "pretrain_stats.json").is_file():
        base_dir.mkdir(exist_ok=True)
        _build_base(cfg, base_dir)
    base_seconds = time.time() - started

    model, tokenizer = load_base(base_dir)
    train_ids, heldout_ids = corpus_streams(cfg.corpus, tokenizer, cfg.max_documents)
    window = cfg.recipe.seq_len
    base_full = perplexity(model, heldout_ids, "full", SentinelConfig(schedule=cfg.recipe.schedule),
                           window=window, max_tokens=cfg.eval_tokens)
    base_compressed = compressed_baseline_perplexity(base_dir, heldout_ids, cfg)

    train(model, tokenizer, train_ids, heldout_ids, copy.deepcopy(cfg.recipe), out_dir)
    sentinel_model, _ = load_base(out_dir)
    sentinel = SentinelConfig.load(out_dir)
    report = {
        "fingerprint": cfg.fingerprint(),
        "schedule": asdict(cfg.recipe.schedule),
        "eval_window": window,
        "eval_tokens": cfg.eval_tokens,
        "perplexity": {
            "base_full_attention": base_full,
            "base_compressed_before_training": base_compressed,
            "sentinel_compressed": perplexity(sentinel_model, heldout_ids, "sentinel", sentinel,
                                              window=window, max_tokens=cfg.eval_tokens),
            "sentinel_full_attention": perplexity(sentinel_model, heldout_ids, "full", sentinel,
                                                  window=window, max_tokens=cfg.eval_tokens),
        },
        "base_pretrain": json.loads((base_dir / "pretrain_stats.json").read_text()),
        "seconds": {"base": base_seconds, "total": time.time() - started},
    }
    report_path.write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    p = report["perplexity"]
    s = report["schedule"]
    lines = [f"held-out perplexity ({report['eval_tokens']} tokens, windows of {report['eval_window']}, "
             f"schedule sink={s['sink']} span={s['span']} gap={s['gap']} window={s.get('window', 0)}):",
             f"  (a) full attention, base model            {p['base_full_attention']:8.2f}",
             f"      full attention, sentinel model        {p['sentinel_full_attention']:8.2f}",
             f"  (b) compressed, sentinel model            {p['sentinel_compressed']:8.2f}",
             f"  (c) compressed, base before training      {p['base_compressed_before_training']:8.2f}"]
    return "\n".join(lines)

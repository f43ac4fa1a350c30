"""The sentinel training recipe: a Hugging Face causal LM -> a sentinel model that vLLM serves.

Adds `<CL>`/`<CR>` to the vocabulary, trains LoRA on the attention projections plus the two new
embedding rows (or everything, with `full_finetune`), with the paper's loss: every real token
predicts the next real token, sentinels are never targets. Spans follow the schedule the model
will be served with, jittered, optionally mixed with the paper's random spans. Ends by merging
LoRA and writing safetensors, the tokenizer and `sentinel_config.json`.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .batching import REGIMES, batch_loss, build_example, collate
from .recall import RecallConfig, RecallGenerator, draw_windows
from ..config import ScheduleConfig, SentinelConfig
from .evaluate import perplexity
from ..oracle import UnsupportedModelError, check_custom_mask_support
from ..schedule import JitteredSpans, RandomRegions, RandomSpans

# For base models that never had a chat format, so `/v1/chat/completions` works on the result.
DEFAULT_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass
class TrainConfig:
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    regime: str = "sentinel"          # or a baseline: local / scattered / full
    seq_len: int = 256                # real tokens per training window
    batch_size: int = 8
    steps: int = 300
    time_budget_s: float | None = None  # stop (and shorten the LR schedule) to fit this
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    lora_rank: int = 16
    lora_alpha: int = 32
    full_finetune: bool = False
    jitter: float = 0.25
    random_span_fraction: float = 0.0  # share of windows with the paper's random spans instead
    marked_fraction: float = 0.0       # share of windows with random marked regions (RandomRegions) instead
    recall_share: float = 0.0          # share of windows that are recall documents (recall.py)
    recall: RecallConfig = field(default_factory=RecallConfig)  # their shape (length = seq_len)
    eval_every: int = 100
    eval_tokens: int = 8192
    checkpoint_every: int = 100
    seed: int = 0


# -- model surgery ---------------------------------------------------------------------------------

def add_sentinel_tokens(model, tokenizer, cl_token: str = "<CL>", cr_token: str = "<CR>") -> tuple[int, int]:
    """Add the two tokens (once), grow the embeddings if needed, start them at the mean embedding."""
    tokenizer.add_tokens([cl_token, cr_token], special_tokens=True)
    ids = tuple(tokenizer.convert_tokens_to_ids([cl_token, cr_token]))
    old_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for embedding in {model.get_input_embeddings(), model.get_output_embeddings()}:
                embedding.weight[old_size:] = embedding.weight[:old_size].mean(dim=0)
    return ids


def lora_targets(model) -> list[str]:
    """The model's own attention projections, by full name, fused or not: q/k/v/o_proj (Llama),
    qkv_proj (Phi-3), query_key_value and dense (GPT-NeoX), out_proj (OPT)."""
    targets = [f"{name}.{child_name}" for name, module in model.named_modules() if type(module).__name__.endswith("Attention")
               for child_name, child in module.named_children() if isinstance(child, torch.nn.Linear)]
    if not targets:
        raise UnsupportedModelError(f"found no linear projections inside the attention modules of "
                                    f"{type(model).__name__}; train it with --full-finetune")
    return targets


def embedding_name(model) -> str:
    """The input embedding's module name (embed_tokens, embed_in, ...), whatever the layout."""
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding)


def prepare_trainable(model, cfg: TrainConfig, sentinel_ids: tuple[int, int]):
    if cfg.full_finetune:
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=lora_targets(model),
                      trainable_token_indices={embedding_name(model): list(sentinel_ids)})
    return get_peft_model(model, lora)


def merged(model):
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# -- data ------------------------------------------------------------------------------------------

class WindowSampler:
    """Random windows of real tokens from the training stream, each with its spans."""

    def __init__(self, token_stream: list[int], cfg: TrainConfig, sentinel_ids: tuple[int, int],
                 recall: RecallGenerator | None = None):
        self.ids = torch.as_tensor(token_stream, dtype=torch.long)
        self.recall = recall
        if self.ids.numel() <= cfg.seq_len:
            raise ValueError(f"training text has {self.ids.numel()} tokens; need more than seq_len={cfg.seq_len}")
        if cfg.regime not in REGIMES:
            raise ValueError(f"unknown regime {cfg.regime!r}; choose one of {REGIMES}")
        self.cfg, self.sentinel_ids = cfg, sentinel_ids
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # The scattered baseline's kept-token draws get their own generator: drawn from the window
        # generator they would shift every later window, and "same data order" across methods would fail.
        self.keep_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.scheduled = JitteredSpans(cfg.schedule, cfg.jitter, seed=cfg.seed)
        self.random = RandomSpans(min(cfg.schedule.net_ratio, 0.9), sink=cfg.schedule.sink, seed=cfg.seed)
        self.marked = RandomRegions(cfg.schedule, seed=cfg.seed)
        if cfg.random_span_fraction + cfg.marked_fraction > 1:
            raise ValueError(f"random_span_fraction {cfg.random_span_fraction} + marked_fraction "
                             f"{cfg.marked_fraction} is over 1: they are shares of the same windows")

    def _spans(self, n: int) -> tuple[torch.Tensor, int]:
        """One sample's spans and recent window: the schedule's, jittered, or the paper's random
        spans, or random marked regions (both keep the schedule's window as it is). One uniform draw
        picks among them, so shares of 0 draw exactly as before."""
        u = float(torch.rand((), generator=self.generator))
        if u < self.cfg.random_span_fraction:
            return self.random.spans(n), self.cfg.schedule.window
        if u < self.cfg.random_span_fraction + self.cfg.marked_fraction:
            return self.marked.draw(n)
        return self.scheduled.draw(n)

    def batch(self):
        n = self.cfg.seq_len
        examples = []
        for ids in draw_windows(self.ids, n, self.cfg.batch_size, self.generator, self.recall, self.cfg.recall_share):
            spans, window = self._spans(n)
            examples.append(build_example(ids, self.cfg.regime, spans, *self.sentinel_ids,
                                          generator=self.keep_generator, window=window))
        return collate(examples, pad_id=0)


# -- the loop --------------------------------------------------------------------------------------

def steps_in_budget(budget_s: float, elapsed_s: float, step: int, max_steps: int) -> int:
    """Total steps that fit the time budget at the pace so far.

    Re-fitted every few steps rather than once: the first steps are slow (allocator and kernel
    warm-up), and a one-off estimate would leave much of the budget unused.
    """
    return max(step + 1, min(max_steps, int(budget_s * step / max(elapsed_s, 1e-9))))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(path: Path, model, optimizer, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    trainable = {k: v for k, v in model.named_parameters() if v.requires_grad}
    torch.save(trainable, tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a crash mid-save never leaves a half checkpoint behind


def _load_checkpoint(path: Path, model, optimizer) -> dict:
    trainable = torch.load(path / "trainable.pt")
    missing = set(trainable) - {k for k, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"checkpoint {path} does not match this model/recipe (e.g. {sorted(missing)[:2]}); "
                         "use a new --out or delete the checkpoint")
    model.load_state_dict(trainable, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt"))
    return json.loads((path / "state.json").read_text())


def train(model, tokenizer, train_stream: list[int], heldout_stream: list[int], cfg: TrainConfig,
          out_dir: str | Path) -> dict:
    """Train in place and write the merged sentinel model to `out_dir`. Returns the training log.

    Resumes from `out_dir/checkpoint` when one exists (same data, same seed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    check_custom_mask_support(model)
    sentinel_ids = add_sentinel_tokens(model, tokenizer)
    sentinel = SentinelConfig(cl_token_id=sentinel_ids[0], cr_token_id=sentinel_ids[1], schedule=cfg.schedule)
    model = prepare_trainable(model, cfg, sentinel_ids)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    recall = RecallGenerator(train_stream, tokenizer, replace(cfg.recall, length=cfg.seq_len)) if cfg.recall_share else None
    sampler = WindowSampler(train_stream, cfg, sentinel_ids, recall)

    checkpoint = out_dir / "checkpoint"
    state = {"step": 0, "elapsed_s": 0.0, "total_steps": cfg.steps, "log": []}
    if checkpoint.is_dir():
        state = _load_checkpoint(checkpoint, model, optimizer)
        sampler.generator.manual_seed(cfg.seed + state["step"])  # fresh windows after a resume
        sampler.keep_generator.manual_seed(cfg.seed + 1 + state["step"])

    def evaluate() -> float:
        return perplexity(model, heldout_stream, cfg.regime, sentinel, window=cfg.seq_len,
                          max_tokens=cfg.eval_tokens, batch_size=cfg.batch_size)

    started = time.time() - state["elapsed_s"]
    bar = tqdm(total=state["total_steps"], initial=state["step"], desc=f"train[{cfg.regime}]")
    while state["step"] < state["total_steps"]:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, state["total_steps"], cfg)
        loss = batch_loss(model, sampler.batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state["step"] = step + 1
        state["elapsed_s"] = time.time() - started
        if cfg.time_budget_s and state["step"] % 10 == 0:
            state["total_steps"] = steps_in_budget(cfg.time_budget_s, state["elapsed_s"], state["step"], cfg.steps)
            bar.total = state["total_steps"]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if state["step"] % cfg.eval_every == 0 or state["step"] == state["total_steps"]:
            state["log"].append({"step": state["step"], "train_loss": loss.item(),
                                 "heldout_ppl": evaluate(), "elapsed_s": state["elapsed_s"]})
            bar.write(f"step {state['step']}: held-out perplexity ({cfg.regime}) {state['log'][-1]['heldout_ppl']:.2f}")
        if state["step"] % cfg.checkpoint_every == 0 and state["step"] < state["total_steps"]:
            _save_checkpoint(checkpoint, model, optimizer, state)
    bar.close()

    final = merged(model)
    final.eval()
    final.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    if cfg.regime == "sentinel":
        sentinel.save(out_dir)
    (out_dir / "train_log.json").write_text(json.dumps(
        {"config": {**asdict(cfg), "schedule": asdict(cfg.schedule)}, **state}, indent=2))
    shutil.rmtree(checkpoint, ignore_errors=True)
    return state


def load_base(base_dir: str | Path, dtype: torch.dtype = torch.float32):
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation="sdpa")
    return model, tokenizer

"""A tokenizer and a small Llama base model from scratch, for a fixed number of steps.

No model hub is reachable here, so the default model is grown locally. nanoGPT-style: a config
dataclass and short functions.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .batching import Batch, batch_loss
from .recall import RecallConfig, RecallGenerator, draw_windows
from ..masks import IGNORE_INDEX, additive_mask

BASE_VOCAB = 4096  # the sentinels are appended after it: <CL> = 4096, <CR> = 4097
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def train_tokenizer(texts: list[str], vocab_size: int = BASE_VOCAB) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is representable, so any text round-trips."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@dataclass(frozen=True)
class Stage:
    """Part of pretraining: `steps` steps of `batch_size` windows of `seq_len` tokens, a
    `recall_share` of them recall documents shaped by `recall` (its length is `seq_len`)."""
    steps: int
    seq_len: int
    batch_size: int
    recall_share: float = 0.0
    recall: RecallConfig = field(default_factory=RecallConfig)


@dataclass
class BaseModelConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4          # head_dim 64: a size vLLM's CPU attention supports
    num_kv_heads: int = 4
    intermediate_size: int = 704
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    steps: int = 800  # a step count, not seconds: the same model on a busy or a quiet machine
    seed: int = 0
    # Stages run in order, one learning-rate schedule over all of them; none: one stage of `steps`
    # steps of `batch_size` windows of `seq_len` prose tokens. `seq_len` is the evaluation length.
    curriculum: tuple[Stage, ...] = ()

    def stages(self) -> tuple[Stage, ...]:
        return self.curriculum or (Stage(self.steps, self.seq_len, self.batch_size),)

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                           max_position_embeddings=4096, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2, attn_implementation="sdpa")


def causal_batch(windows: torch.Tensor) -> Batch:
    size, length = windows.shape
    labels = torch.full_like(windows, IGNORE_INDEX)
    labels[:, :-1] = windows[:, 1:]
    causal = additive_mask(torch.ones(length, length, dtype=torch.bool).tril())
    return Batch(windows, torch.arange(length).expand(size, length), labels, causal.expand(size, 1, length, length))


@torch.no_grad()
def heldout_perplexity(model, heldout_ids: list[int], seq_len: int, max_tokens: int = 32_768) -> float:
    ids = torch.as_tensor(heldout_ids[:max_tokens], dtype=torch.long)
    count = ids.numel() // seq_len
    windows = ids[: count * seq_len].view(count, seq_len)
    was_training = model.training
    model.eval()
    total = sum(float(batch_loss(model, causal_batch(w), reduction="sum")) for w in windows.split(16))
    model.train(was_training)
    return math.exp(total / (count * (seq_len - 1)))


def pretrain_base(cfg: BaseModelConfig, train_ids: list[int], heldout_ids: list[int], tokenizer=None):
    """Train from scratch through `cfg.stages()` (seeded and counted in steps: the same model on any
    machine, only the time differs). Stages with recall documents need the `tokenizer`."""
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(cfg.llama_config())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.as_tensor(train_ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(cfg.seed)
    stages = cfg.stages()
    total_steps, step, tokens, started = sum(stage.steps for stage in stages), 0, 0, time.time()
    bar = tqdm(total=total_steps, desc="pretrain base")
    for stage in stages:
        recall = None
        if stage.recall_share > 0:
            if tokenizer is None:
                raise ValueError("a pretraining stage with recall documents needs the tokenizer")
            recall = RecallGenerator(train_ids, tokenizer, replace(stage.recall, length=stage.seq_len))
        for _ in range(stage.steps):
            if step < cfg.warmup:
                lr = cfg.lr * (step + 1) / cfg.warmup
            else:
                progress = min(1.0, (step - cfg.warmup) / max(total_steps - cfg.warmup, 1))
                lr = cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            windows = draw_windows(data, stage.seq_len, stage.batch_size, generator, recall, stage.recall_share)
            loss = batch_loss(model, causal_batch(torch.stack(windows)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            tokens += stage.batch_size * stage.seq_len
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", seq=stage.seq_len)
    bar.close()
    elapsed = time.time() - started
    model.eval()
    stats = {"config": asdict(cfg), "steps": step, "seconds": elapsed, "tokens_seen": tokens,
             "tokens_per_s": tokens / elapsed, "parameters": sum(p.numel() for p in model.parameters()),
             "heldout_perplexity": heldout_perplexity(model, heldout_ids, cfg.seq_len)}
    return model, stats

"""Sentinel model directories with random weights (or none): for tests and for benchmarks.

`write_random_sentinel_model(out_dir, shape)` writes what `vllm serve` and transformers need:
a Llama `config.json`, a byte-level BPE tokenizer (trained on the corpus) with `<CL>`/`<CR>`
appended, `sentinel_config.json` and, unless `weights=False`, random safetensors. Without
weights, vLLM runs it with `load_format="dummy"`: the shape of a real model at no training cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ScheduleConfig, SentinelConfig
from .training.corpus import DEFAULT_CORPUS, load_documents
from .training.pretrain import train_tokenizer
from .training.recipe import DEFAULT_CHAT_TEMPLATE


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 256
    head_dim: int = 64  # a head size vLLM's CPU attention supports
    base_vocab: int = 4096         # tokens the corpus tokenizer is trained to (before the sentinels)
    vocab_size: int | None = None  # the model's vocabulary, when larger (a realistic lm_head)
    max_position_embeddings: int = 4096


def corpus_tokenizer(vocab_size: int, corpus: str | Path = DEFAULT_CORPUS, max_documents: int = 80):
    """A byte-level BPE tokenizer of `vocab_size` tokens from the first documents of the corpus."""
    docs = load_documents(corpus)[:max_documents]
    return train_tokenizer([d.text for d in docs], vocab_size=vocab_size)


def write_random_sentinel_model(out_dir: str | Path, shape: LlamaShape = LlamaShape(),
                                schedule: ScheduleConfig = ScheduleConfig(), *, weights: bool = True,
                                init_std: float = 0.02, logit_scale: float = 1.0, seed: int = 0,
                                tokenizer=None) -> SentinelConfig:
    """`logit_scale` sharpens the output distribution, as training would: tests comparing greedy
    tokens across implementations need clear winners, not float-rounding ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or corpus_tokenizer(shape.base_vocab)
    tokenizer.add_tokens(["<CL>", "<CR>"], special_tokens=True)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    cl_id, cr_id = tokenizer.convert_tokens_to_ids(["<CL>", "<CR>"])
    config = LlamaConfig(vocab_size=max(len(tokenizer), shape.vocab_size or 0), hidden_size=shape.hidden_size,
                         head_dim=shape.head_dim,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                         num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                         max_position_embeddings=shape.max_position_embeddings, initializer_range=init_std,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="float32")
    if weights:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    sentinel = SentinelConfig(cl_token_id=cl_id, cr_token_id=cr_id, schedule=schedule)
    sentinel.save(out_dir)
    return sentinel

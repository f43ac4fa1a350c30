"""Sentinel model directories with random weights (or none): for tests and for benchmarks.

`write_random_sentinel_model(out_dir, shape, family=...)` writes what `vllm serve` and transformers
need: the `config.json` of a Llama (or of any served family, `FAMILIES`), a byte-level BPE tokenizer (trained on the corpus) with `<CL>`/`<CR>`
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


def family_config(family: str, shape: LlamaShape, vocab_size: int, special_ids: dict, init_std: float):
    """A transformers config of `family` with `shape`'s sizes: what differs from Llama stays in (the
    point of testing a family), with its defaults where they are what real checkpoints use."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                  num_attention_heads=shape.num_heads, max_position_embeddings=shape.max_position_embeddings,
                  initializer_range=init_std, tie_word_embeddings=False, torch_dtype="float32", **special_ids)
    llama_like = dict(common, intermediate_size=shape.intermediate_size, num_key_value_heads=shape.num_kv_heads)
    if family in ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "phi3"):
        extra = {"llama": {"head_dim": shape.head_dim}, "mistral": {"sliding_window": None},
                 "qwen2": {"use_sliding_window": False}, "qwen3": {"head_dim": shape.head_dim, "use_sliding_window": False},
                 "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.03125,
                             "logits_scaling": 4.0},
                 "olmo2": {}, "phi3": {"sliding_window": None,
                                        "original_max_position_embeddings": shape.max_position_embeddings}}[family]
        names = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                 "granite": "GraniteConfig", "olmo2": "Olmo2Config", "phi3": "Phi3Config"}
        return getattr(transformers, names[family])(**llama_like, **extra)
    if family == "gemma":
        return transformers.GemmaConfig(**{**llama_like, "tie_word_embeddings": True}, head_dim=shape.head_dim,
                                        hidden_activation="gelu_pytorch_tanh")
    if family == "smollm3":  # the last layer without RoPE, as every fourth one is in the real model
        return transformers.SmolLM3Config(**llama_like, use_sliding_window=False, sliding_window=None,
                                          no_rope_layers=[1] * (shape.num_layers - 1) + [0])
    if family == "opt":  # OPT-350m's layout: embeddings projected to the hidden size, norms after each block
        return transformers.OPTConfig(**{**common, "tie_word_embeddings": True}, ffn_dim=shape.intermediate_size,
                                      word_embed_proj_dim=shape.hidden_size // 2, do_layer_norm_before=False,
                                      init_std=init_std)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, intermediate_size=shape.intermediate_size, rotary_pct=0.25,
                                          use_parallel_residual=True)
    raise ValueError(f"no random model for family {family!r}; choose one of {sorted(FAMILIES)}")


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "gemma", "olmo2", "opt", "gpt_neox", "smollm3")


def write_random_sentinel_model(out_dir: str | Path, shape: LlamaShape = LlamaShape(),
                                schedule: ScheduleConfig = ScheduleConfig(), *, weights: bool = True,
                                init_std: float = 0.02, logit_scale: float = 1.0, seed: int = 0,
                                tokenizer=None, family: str = "llama", sentinels: bool = True) -> SentinelConfig | None:
    """`logit_scale` sharpens the output distribution, as training would: tests comparing greedy
    tokens across implementations need clear winners, not float-rounding ties. `sentinels=False`
    writes a base model (no `<CL>`/`<CR>`, no sentinel_config.json), what the recipe starts from."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or corpus_tokenizer(shape.base_vocab)
    if sentinels:
        tokenizer.add_tokens(["<CL>", "<CR>"], special_tokens=True)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = family_config(family, shape, max(len(tokenizer), shape.vocab_size or 0), special, init_std)
    if weights:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)  # tied heads scale the embeddings too
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not sentinels:
        return None
    cl_id, cr_id = tokenizer.convert_tokens_to_ids(["<CL>", "<CR>"])
    sentinel = SentinelConfig(cl_token_id=cl_id, cr_token_id=cr_id, schedule=schedule)
    sentinel.save(out_dir)
    return sentinel

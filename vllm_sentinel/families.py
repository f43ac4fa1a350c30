"""Which model families the sentinel contract holds for, and why the others are refused.

The contract (the semantics page) needs decoder-only attention that is a softmax over keys a mask
can hide, every layer seeing the whole causal context, with positions given per token. Then `<CL>`,
`<CR>` and compaction mean the same in training, in the dense oracle (transformers with a 4-D mask
and explicit position ids) and in the engine. What position means varies by family; the engine
follows each layer's own handling (`engine/cl_kv.py`).

`SERVED` says, per `model_type`, what differs from Llama; `REFUSED` why a known family cannot be
served. docs/engine.md has the table.
"""
from __future__ import annotations

SERVED = {
    "llama": "the reference: RoPE on every layer's keys",
    "mistral": "Llama's attention (a config with a sliding window is refused)",
    "qwen2": "biases on the q, k, v projections",
    "qwen3": "RMSNorm per head on q and k, before RoPE",
    "phi3": "fused qkv_proj and gate_up_proj (a Llama subclass in vLLM)",
    "granite": "embedding, attention and residual multipliers, logit scaling",
    "gemma": "GeGLU MLP, embeddings scaled by sqrt(hidden), RMSNorm with 1 + weight, a tied head",
    "olmo2": "RMSNorm over the whole q and k projections before RoPE, norms after each block "
             "(vLLM's Transformers modeling backend)",
    "opt": "learned absolute positions, LayerNorm, biases, ReLU; optionally embeddings projected to the "
           "hidden size and norms after each block (OPT-350m)",
    "gpt_neox": "RoPE on a part of each head (rotary_pct), a fused query_key_value, parallel residual "
                "(vLLM's Transformers modeling backend)",
    "smollm3": "RoPE left out on some layers (every fourth by default) (vLLM's Transformers modeling backend)",
}

REFUSED = {
    "gemma2": "its layers alternate with sliding-window attention, and it soft-caps attention logits",
    "gemma3": "five of every six layers use sliding-window attention",
    "gemma3_text": "five of every six layers use sliding-window attention",
    "cohere2": "three of every four layers use sliding-window attention",
    "gpt_oss": "it uses attention sinks and sliding-window layers",
    "mamba": "its layers are state-space recurrences: there is no attention over keys to mask",
    "mamba2": "its layers are state-space recurrences: there is no attention over keys to mask",
    "rwkv": "its layers are linear recurrences, not softmax attention over keys",
    "jamba": "it mixes state-space layers with attention",
    "falcon_h1": "it mixes state-space layers with attention",
    "zamba2": "it mixes state-space layers with attention",
    "bloom": "ALiBi position biases are not supported by the sentinel backend",
    "mpt": "ALiBi position biases are not supported by the sentinel backend",
}

SUPPORTED_MODEL_TYPES = frozenset(SERVED)


def refusal(model_type: str) -> str | None:
    """Why `model_type` cannot be served with sentinel compression; None when it can."""
    if model_type in SERVED:
        return None
    reason = REFUSED.get(model_type, "the sentinel contract has not been checked for it")
    return (f"model_type {model_type!r} is not supported: {reason}. Supported: {', '.join(sorted(SERVED))}")

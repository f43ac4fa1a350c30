"""The key and value each `<CR>` attends to as its `<CL>`, per attention layer, without caching `<CL>`.

`<CL>` attends to itself alone, so at every layer its output is its own value and its hidden state
depends on nothing but its position: the semantics page's "`<CL>` is free". How its key and value
depend on the position is the model's business, and two ways cover every family served:

- `RotatedConstants` (one rotary embedding, applied to every layer's keys, is the only use of
  position: Llama, Mistral, Qwen, Phi-3, Granite, Gemma): the value and the pre-RoPE key are model
  constants, computed once at load (a forward at position 0, where RoPE is the identity), and each
  step rotates the key to its `<CL>` positions with the model's own rotary embedding;
- `ThroughTheNetwork` (anything else: OPT's learned absolute positions, GPT-NeoX's partial rotation
  and SmolLM3's layers without RoPE as the Transformers modeling backend computes them): each step
  runs the step's `<CL>` tokens through the model at their positions, every attention layer
  replaced by attention over the one key, its own. That follows each layer's own position handling
  by construction and costs one extra query row per compaction. (A table of every position's key
  and value would cost layers x KV heads x head size x 2 x max_model_len of memory instead.)

Which one a model gets is measured, not assumed: at load, `<CL>` through the network at a few
positions (the last one included) must equal the rotated constants, else the engine uses
`ThroughTheNetwork`.
"""
from __future__ import annotations

import numpy as np
import torch

# Positions at which the rotated constants are checked against the network (plus max_model_len - 1).
PROBE_POSITIONS = (0, 1, 7, 300)


def attention_layers(model) -> list:
    from vllm.model_executor.layers.attention import Attention

    return [module for module in model.modules() if isinstance(module, Attention)]


def rotary_embeddings(model) -> list:
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    return [module for module in model.modules() if isinstance(module, RotaryEmbeddingBase)]


def _run_decoder(model, ids: torch.Tensor, positions: torch.Tensor) -> None:
    """The model's decoder stack on `ids` at `positions`, outside torch.compile (the compiled graph
    calls attention as an opaque op; the Python forward calls each layer's `forward`)."""
    from vllm.model_executor.models.transformers.base import Base

    inner = model.model
    if isinstance(model, Base):  # the Transformers modeling backend: a Hugging Face decoder inside
        type(inner).forward(inner, input_ids=ids[None], position_ids=positions[None], use_cache=False)
    else:
        type(inner).forward(inner, ids, positions, None)


@torch.no_grad()
def cl_through_network(model, vllm_config, cl_id: int, positions: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(layer names, keys, values), keys and values `[layers, len(positions), kv_heads, head_size]`:
    `<CL>` at each position through the network, every attention layer replaced by what attention
    over a single key is: that key's value, for every query head."""
    from vllm.forward_context import set_forward_context

    layers = attention_layers(model)
    recorded = {}

    def single_key_attention(attn):
        def forward(query, key, value, *args, **kwargs):
            kv_heads, dim = attn.num_kv_heads, attn.head_size
            recorded[attn.layer_name] = (key.reshape(-1, kv_heads, dim).clone(), value.reshape(-1, kv_heads, dim).clone())
            per_kv = attn.num_heads // kv_heads
            return value.reshape(-1, kv_heads, 1, dim).expand(-1, kv_heads, per_kv, dim).reshape(
                value.shape[0], attn.num_heads * dim).to(query.dtype)
        return forward

    for attn in layers:
        attn.forward = single_key_attention(attn)
    try:
        with set_forward_context(None, vllm_config):
            _run_decoder(model, torch.full(positions.shape, cl_id, dtype=torch.long, device=positions.device), positions)
    finally:
        for attn in layers:
            del attn.forward
    names = [attn.layer_name for attn in layers]
    return names, torch.stack([recorded[n][0] for n in names]), torch.stack([recorded[n][1] for n in names])


class RotatedConstants:
    """Per-layer constants: the value and the pre-RoPE key, rotated each step."""

    def __init__(self, names: list[str], keys: torch.Tensor, values: torch.Tensor, rope):
        self.names, self.keys, self.values, self.rope = names, keys, values, rope  # [layers, kv_heads, dim]

    def __call__(self, positions: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        count = positions.numel()
        if count == 0:
            rotated = self.keys.new_empty((0, *self.keys.shape))
        else:
            flat = self.keys.reshape(1, -1).repeat(count, 1)
            _, rotated = self.rope.forward_native(positions, flat.clone(), flat)
            rotated = rotated.view(count, *self.keys.shape)
        return ({name: rotated[:, i] for i, name in enumerate(self.names)},
                {name: self.values[i].expand(count, *self.values.shape[1:]) for i, name in enumerate(self.names)})


class ThroughTheNetwork:
    """Each step's `<CL>` tokens through the model at their positions."""

    def __init__(self, model, vllm_config, cl_id: int):
        self.model, self.vllm_config, self.cl_id = model, vllm_config, cl_id

    def __call__(self, positions: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if positions.numel() == 0:
            layers = attention_layers(self.model)
            empty = {a.layer_name: torch.empty((0, a.num_kv_heads, a.head_size), device=positions.device)
                     for a in layers}
            return empty, dict(empty)
        names, keys, values = cl_through_network(self.model, self.vllm_config, self.cl_id, positions)
        return ({name: keys[i] for i, name in enumerate(names)}, {name: values[i] for i, name in enumerate(names)})


def cl_key_values(model, vllm_config, cl_id: int, device) -> RotatedConstants | ThroughTheNetwork:
    """The cheapest exact source of `<CL>` keys and values for this model (see the module's docstring)."""
    if not attention_layers(model):
        raise NotImplementedError(f"the sentinel backend found no vLLM attention layers in {type(model).__name__}")
    max_len = vllm_config.model_config.max_model_len
    probe = torch.tensor(sorted({p for p in PROBE_POSITIONS if p < max_len} | {max_len - 1}), device=device)
    try:
        names, keys, values = cl_through_network(model, vllm_config, cl_id, probe)
    except IndexError as error:  # a learned position table (OPT) shorter than max_model_len
        raise ValueError(
            f"--attention-backend sentinel: max_model_len {max_len} exceeds the positions the model's position "
            f"embedding covers ({error}); lower --max-model-len to the model's max_position_embeddings") from error
    ropes = rotary_embeddings(model)
    if len({id(r) for r in ropes}) == 1:  # probe[0] is position 0, where RoPE is the identity
        constants = RotatedConstants(names, keys[:, 0], values[:, 0], ropes[0])
        rotated_keys, rotated_values = constants(probe)
        tolerance = 1e-4 if keys.dtype == torch.float32 else 2e-2
        scale = max(float(keys.abs().max()), 1.0)
        if all(torch.allclose(rotated_keys[n].float(), keys[i].float(), atol=tolerance * scale, rtol=0)
               and torch.allclose(rotated_values[n].float(), values[i].float(), atol=tolerance * scale, rtol=0)
               for i, n in enumerate(names)):
            return constants
    return ThroughTheNetwork(model, vllm_config, cl_id)


def as_positions(positions: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(device)

"""`SentinelAttentionBackend`: the platform's attention kernel, plus a masked path for closing spans.

Every request's chunk is either
- *plain* (no span closes in it): the cache already holds exactly what its tokens may see, and its
  tokens land on consecutive slots after it, so the wrapped kernel (CPU_ATTN) runs unchanged,
  with physical sequence lengths and slots;
- *masked* (a span closes): `<CL>`/`<CR>` are in the chunk and tokens after a `<CR>` must no
  longer see its span. Its cached prefix is read out of the paged cache, concatenated with the
  chunk's fresh K/V, and attended with the sentinel mask in torch (SDPA). Only then is the chunk's
  KV written, because a `<CR>` goes into the slot its span began in, which the `<CR>` itself
  (and the tokens before it) still read.

The wrapped kernel's in-block KV layout is its own business (CPU_ATTN stores keys transposed, and
differently per ISA), so `PagedKVReader` learns it once by writing a known pattern through the
kernel's own cache writer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, CPUAttentionMetadataBuilder)

from .kv_cache_manager import SentinelAttentionSpec

logger = init_logger("vllm.sentinel")


class SentinelAttentionBackend(CPUAttentionBackend):
    # Our forward writes the KV itself: after attention for chunks that close a span.
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the registry member `--attention-backend sentinel` maps to

    @staticmethod
    def get_impl_cls() -> type["SentinelAttentionImpl"]:
        return SentinelAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SentinelAttentionMetadataBuilder"]:
        return SentinelAttentionMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        return SentinelAttentionSpec(**{name: getattr(spec, name) for name in spec.__dataclass_fields__})


@dataclass
class MaskedChunk:
    start: int                   # first token row of the request in the batch
    end: int
    cached_slots: torch.Tensor   # [p(c)] cache slots of the request's physical prefix, in order
    visible: torch.Tensor        # [q, p(c) + q] bool, `ChunkPlan.visibility()`


@dataclass
class SentinelAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor              # [N] cache slot of every token, -1 where nothing is stored
    plain: CPUAttentionMetadata | None      # the wrapped kernel's metadata for the plain requests
    plain_rows: torch.Tensor | None         # their token rows, None when every request is plain
    masked: list[MaskedChunk]


class SentinelStepState:
    """The worker's current step plan, shared by its model runner (writer) and builders (readers)."""

    def __init__(self) -> None:
        self.plan = None


class SentinelAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    step: SentinelStepState | None = None  # set by the model runner when it creates the builders

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        plan = self.step.plan if self.step is not None else None
        masked_rows = plan.masked_rows if plan is not None else []
        if not masked_rows:  # dummy runs, and every step in which no span closes
            return SentinelAttentionMetadata(cm.num_actual_tokens, cm.slot_mapping,
                                             super().build(common_prefix_len, cm, fast_build), None, [])
        assert cm.num_reqs == len(plan.chunks), "the step plan and the batch disagree"

        query_start = plan.query_start
        block_table = cm.block_table_tensor
        masked = []
        for row in masked_rows:
            chunk = plan.chunks[row]
            physical = torch.arange(chunk.cached_len, dtype=torch.long, device=block_table.device)
            blocks = block_table[row].long()[physical // self.block_size]
            masked.append(MaskedChunk(int(query_start[row]), int(query_start[row + 1]),
                                      blocks * self.block_size + physical % self.block_size,
                                      chunk.visibility().to(block_table.device)))

        plain_reqs = [row for row in range(cm.num_reqs) if plan.chunks[row].is_plain]
        plain = plain_rows = None
        if plain_reqs:
            plain_rows = torch.cat([torch.arange(int(query_start[r]), int(query_start[r + 1])) for r in plain_reqs])
            plain = super().build(common_prefix_len, _subset(cm, plain_reqs, plain_rows), fast_build)
        return SentinelAttentionMetadata(cm.num_actual_tokens, cm.slot_mapping, plain, plain_rows, masked)


def _subset(cm, reqs: list[int], rows: torch.Tensor):
    """The common metadata of some requests of the batch, as if they were the whole batch."""
    index = torch.tensor(reqs, dtype=torch.long)
    sizes = cm.query_start_loc_cpu[1:][index] - cm.query_start_loc_cpu[:-1][index]
    query_start = torch.zeros(len(reqs) + 1, dtype=cm.query_start_loc.dtype)
    torch.cumsum(sizes, 0, out=query_start[1:])
    seq_lens = cm.seq_lens[index.to(cm.seq_lens.device)]
    device_rows = rows.to(cm.slot_mapping.device)
    return replace(
        cm,
        query_start_loc=query_start.to(cm.query_start_loc.device),
        query_start_loc_cpu=query_start,
        seq_lens=seq_lens,
        seq_lens_cpu_upper_bound=None if cm.seq_lens_cpu_upper_bound is None else cm.seq_lens_cpu_upper_bound[index],
        num_reqs=len(reqs),
        num_actual_tokens=int(rows.numel()),
        max_query_len=int(sizes.max()),
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=cm.block_table_tensor[index.to(cm.block_table_tensor.device)],
        slot_mapping=cm.slot_mapping[device_rows],
        positions=None if cm.positions is None else cm.positions[device_rows],
        is_prefilling=None if cm.is_prefilling is None else cm.is_prefilling[index],
        req_idx=None,
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )


class PagedKVReader:
    """Reads the keys and values of given slots out of a paged KV cache, whatever its in-block layout.

    The layout is learned once by writing a known pattern through the kernel's own cache writer
    into a one-block scratch cache: each written element's (slot offset, head, dim) is recovered
    from small integers (exact in every float dtype), digit by digit.
    """

    def __init__(self, write, block_shape: tuple[int, ...], dtype: torch.dtype, block_size: int,
                 num_kv_heads: int, head_size: int):
        self.block_size = block_size
        self.k_index = self._probe(write, block_shape, dtype, block_size, num_kv_heads, head_size, keys=True)
        self.v_index = self._probe(write, block_shape, dtype, block_size, num_kv_heads, head_size, keys=False)

    @staticmethod
    def _probe(write, block_shape, dtype, block_size, num_kv_heads, head_size, keys: bool) -> torch.Tensor:
        grid = torch.stack(torch.meshgrid(torch.arange(block_size), torch.arange(num_kv_heads),
                                          torch.arange(head_size), indexing="ij"))  # [3, bs, H, D]
        slots = torch.arange(block_size, dtype=torch.long)
        coordinates = []
        for coordinate in grid:
            digits = []
            for power in (1, 128, 128 * 128):
                scratch = torch.zeros((1, *block_shape), dtype=dtype)
                pattern = ((coordinate // power) % 128 + 1).to(dtype)
                zeros = torch.zeros_like(pattern)
                write(pattern if keys else zeros, zeros if keys else pattern, scratch, slots)
                digits.append(scratch.reshape(-1).to(torch.long) - 1)
            coordinates.append(digits[0] + 128 * digits[1] + 128 * 128 * digits[2])
        written = (torch.stack([c >= 0 for c in coordinates]).all(0)).nonzero().squeeze(1)
        offset, head, dim = (c[written] for c in coordinates)
        index = torch.full((block_size, num_kv_heads, head_size), -1, dtype=torch.long)
        index[offset, head, dim] = written
        if written.numel() != index.numel() or bool((index < 0).any()):
            raise RuntimeError("could not learn the attention kernel's KV cache layout: the pattern written "
                               "through its cache writer does not map one-to-one onto a block")
        return index

    def read(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `slots` as `[n, num_kv_heads, head_size]` each."""
        flat = kv_cache.view(kv_cache.shape[0], -1)
        blocks = (slots // self.block_size).unsqueeze(1).unsqueeze(2)
        offsets = slots % self.block_size
        keys = flat[blocks, self.k_index.to(slots.device)[offsets]]
        values = flat[blocks, self.v_index.to(slots.device)[offsets]]
        return keys, values


_readers: dict[tuple, PagedKVReader] = {}


class SentinelAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None, "a sliding window": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap), "attention sinks": sinks is not None,
            f"{attn_type} attention": attn_type != AttentionType.DECODER,
            "KV cache sharing between layers": kv_sharing_target_layer_name is not None,
            f"a {kv_cache_dtype} KV cache": kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"),
        }
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise NotImplementedError(
                f"--attention-backend sentinel does not support {', '.join(refused)}: sentinel models are "
                "decoder-only full-attention models (Llama family); serve this model with the default backend")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)

    def _reader(self, layer, kv_cache: torch.Tensor) -> PagedKVReader:
        block_shape = tuple(kv_cache.shape[1:])
        key = (block_shape, kv_cache.dtype, getattr(layer, "isa", None))
        if key not in _readers:
            def write(k, v, cache, slots):
                self.do_kv_cache_update(layer, k, v, cache, slots)
            _readers[key] = PagedKVReader(write, block_shape, kv_cache.dtype, block_shape[1],
                                          self.num_kv_heads, self.head_size)
        return _readers[key]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with the sentinel backend")
        if attn_metadata is None:  # profiling and warm-up runs
            return output
        meta: SentinelAttentionMetadata = attn_metadata
        n = meta.num_actual_tokens

        # Read masked requests' prefixes before this step overwrites any of their slots.
        if meta.masked:
            reader = self._reader(layer, kv_cache)
            prefixes = [reader.read(kv_cache, chunk.cached_slots) for chunk in meta.masked]
        self.do_kv_cache_update(layer, key[:n], value[:n], kv_cache, meta.slot_mapping[:n])

        if meta.plain is not None:
            if meta.plain_rows is None:
                super().forward(layer, query, key, value, kv_cache, meta.plain, output)
            else:
                rows = meta.plain_rows
                plain_out = torch.empty((rows.numel(), *output.shape[1:]), dtype=output.dtype, device=output.device)
                super().forward(layer, query[rows], key[rows], value[rows], kv_cache, meta.plain, plain_out)
                output[rows] = plain_out

        for chunk, (cached_k, cached_v) in zip(meta.masked, prefixes if meta.masked else []):
            q = query[chunk.start:chunk.end].transpose(0, 1)
            k = torch.cat([cached_k, key[chunk.start:chunk.end]]).transpose(0, 1)
            v = torch.cat([cached_v, value[chunk.start:chunk.end]]).transpose(0, 1)
            attended = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=chunk.visible,
                                                      scale=self.scale, enable_gqa=True)
            output[chunk.start:chunk.end] = attended.transpose(0, 1).to(output.dtype)
        return output

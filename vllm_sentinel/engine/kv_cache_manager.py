"""Block accounting for compacted KV: a request holds blocks for its physical length, not its tokens.

vLLM sizes a request's blocks from its logical token count. With compaction the KV a request
needs after n real tokens is p(n) slots (`KVLayout.physical_len`), which shrinks every time a
span closes. `SentinelAttentionManager` therefore

- sizes allocations by physical length: a step over real tokens [c, c + k) reads slots below
  p(c) and writes slots below p(c + k), so it needs cdiv(max(p(c), p(c + k)), block_size) blocks;
- trims the tail in `remove_skipped_blocks` (which the KV cache manager runs before every
  allocation, on the computed-token count): blocks past cdiv(p(c), block_size) are given back to
  the pool while the request runs.

Blocks are popped, not replaced by the null block as the sliding-window manager does: list
index i always holds physical slots [i * block_size, (i + 1) * block_size), so the next
allocation appends at the right index and the worker can mirror the trim from c alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from .layout import KVLayout, cdiv

UNCOMPRESSED = KVLayout(None)


@dataclass(frozen=True, kw_only=True)
class SentinelAttentionSpec(FullAttentionSpec):
    """Full attention whose blocks hold compacted KV. No extra fields on purpose:
    `FullAttentionSpec.merge` rebuilds specs from its own field list and would drop them."""


class SentinelAttentionManager(FullAttentionManager):
    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        # request id -> layout; the scheduler shares its own dict here (`attach`).
        self.layouts: dict[str, KVLayout] = {}
        self.num_blocks_freed = 0

    def attach(self, layouts: dict[str, KVLayout]) -> None:
        self.layouts = layouts

    def _layout(self, request_id: str) -> KVLayout:
        return self.layouts.get(request_id, UNCOMPRESSED)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks,
                                   total_computed_tokens: int, *args, **kwargs) -> int:
        layout = self._layout(request_id)
        blocks = self.req_to_blocks.get(request_id)
        if blocks:
            # Running (no prefix hits without prefix caching): this step reads below p(c) and
            # writes below p(c + k).
            slots = max(layout.physical_len(total_computed_tokens), layout.physical_len(num_tokens))
            return max(cdiv(slots, self.block_size) - len(blocks), 0)
        # Admission (or the full-sequence check): chunks to come may stop at any n' <= n.
        return super().get_num_blocks_to_allocate(request_id, layout.peak_physical_len(num_tokens),
                                                  new_computed_blocks, total_computed_tokens, *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        slots = self._layout(request_id).physical_len(num_tokens)
        return super().allocate_new_blocks(request_id, slots, slots)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        keep = cdiv(self._layout(request_id).physical_len(processed_computed_tokens), self.block_size)
        if len(blocks) > keep:
            freed = blocks[keep:]
            del blocks[keep:]
            self.block_pool.free_blocks(reversed(freed))
            self.num_blocks_freed += len(freed)


def kept_blocks(layout: KVLayout, num_computed_tokens: int, block_size: int) -> int:
    """How many of a running request's blocks survive the trim at `num_computed_tokens`.

    The worker calls this to mirror `SentinelAttentionManager.remove_skipped_blocks`.
    """
    return cdiv(layout.physical_len(num_computed_tokens), block_size)


def _register_spec() -> None:
    # The built-ins first: the registry registers them lazily, only while it is empty.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SentinelAttentionSpec, SentinelAttentionManager,
                                 uniform_type_base_spec=FullAttentionSpec)


# At import: the worker imports this module to build the spec, EngineCore to unpickle it, and both
# look the spec up in the registry right after.
_register_spec()

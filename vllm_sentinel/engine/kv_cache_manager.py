"""Block accounting for compacted KV: a request holds blocks for its physical length, not its tokens.

vLLM sizes a request's blocks from its logical token count. With compaction the KV a request
needs after n real tokens is p(n) slots (`KVLayout.physical_len`), which shrinks every time a
span closes. `SentinelAttentionManager` therefore

- sizes allocations by physical length: a step over real tokens [c, c + k) reads slots below
  p(c) and writes slots below `step_len(c, c + k)` (p(c + k), or, when it compacts, also its
  tokens up to the first closing after p(c), where the kernel attends them), so it needs
  cdiv(max(p(c), step_len), block_size) blocks;
- trims the tail in `remove_skipped_blocks` (which the KV cache manager runs before every
  allocation, on the computed-token count): blocks past cdiv(p(c), block_size) are given back to
  the pool while the request runs.

Blocks are popped, not replaced by the null block as the sliding-window manager does: list
index i always holds physical slots [i * block_size, (i + 1) * block_size), so the next
allocation appends at the right index and the worker can mirror the trim from c alone.

With prefix caching on, it also hashes, caches and finds *physical* blocks (prefix_cache.py):
a hit resumes a request at a real-token count whose physical length ends on the hit's last
block; final blocks are shared, tail blocks are copied on write.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from .layout import KVLayout, cdiv
from .prefix_cache import PhysicalBlockHashes, first_copied_block, longest_hit

UNCOMPRESSED = KVLayout(None)
# A compacting step snapshots its cached tail only if this share of the pool stays free after it:
# snapshots are for spare memory, never a cause of preemption.
SNAPSHOT_SPARE = 0.25
# Distinct real-token counts of partial entries a lookup probes (see `partial_states`).
PARTIAL_STATES = 1 << 12


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
        # Prefix caching (set by the scheduler when it is on): the hash function and, per request,
        # its physical hash chains, the real tokens of its hit, and the hit blocks to copy on write.
        self.hash_fn = None
        self.hashes: dict[str, PhysicalBlockHashes] = {}
        self.hit_tokens: dict[str, int] = {}
        self.pending_copies: dict[str, range] = {}
        self.step_start: dict[str, int] = {}  # computed tokens at the allocation in progress
        self.retiring: list[list] = []        # [tail block, its snapshot or None, hash], this step
        self.partial_entries: dict[str, object] = {}  # the block holding a request's partial-state hash
        self.last_cached: dict[str, int] = {}         # computed tokens at the last step's start
        # Real-token counts of the partial entries cached lately (most recent last), so a lookup
        # probes those counts only: a partial hash covers a prefix of unknown length.
        self.partial_states: OrderedDict[int, None] = OrderedDict()
        self._partial_sorted: list[int] | None = []

    def attach(self, layouts: dict[str, KVLayout]) -> None:
        self.layouts = layouts

    def _layout(self, request_id: str) -> KVLayout:
        return self.layouts.get(request_id, UNCOMPRESSED)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks,
                                   total_computed_tokens: int, *args, **kwargs) -> int:
        layout = self._layout(request_id)
        blocks = self.req_to_blocks.get(request_id)
        if blocks:
            # Running: this step reads below p(c) and writes below step_len(c, c + k).
            slots = max(layout.physical_len(total_computed_tokens), layout.step_len(total_computed_tokens, num_tokens))
            return max(cdiv(slots, self.block_size) - len(blocks), 0)
        # Admission (or the full-sequence check): chunks to come may stop at any n' <= n; a hit's
        # tail blocks each take a fresh block for their copy.
        copies = 0
        if new_computed_blocks:
            copies = len(new_computed_blocks) - first_copied_block(layout, total_computed_tokens, self.block_size)
        return copies + super().get_num_blocks_to_allocate(
            request_id, layout.peak_step_len(num_tokens), new_computed_blocks, total_computed_tokens,
            *args, **kwargs)

    def _has_partial_local_hit(self, new_computed_blocks, num_local_computed_tokens: int) -> bool:
        # vLLM's partial-block hit compares a token count with the block size; ours counts real
        # tokens, and a hit always ends on a whole physical block.
        return False

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks, num_local_computed_tokens: int,
                                  num_external_computed_tokens: int) -> None:
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)
        if new_computed_blocks:
            first_copy = first_copied_block(self._layout(request_id), num_local_computed_tokens, self.block_size)
            self.hit_tokens[request_id] = num_local_computed_tokens
            self.pending_copies[request_id] = range(first_copy, len(new_computed_blocks))
            self.num_cached_block[request_id] = first_copy  # the copies are cached once written

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        copied = []
        for index in self.pending_copies.pop(request_id, ()):
            # A hit's tail, at admission: vLLM's copy-on-write, run by the worker before the forward.
            [fresh] = self.block_pool.get_new_blocks(1)
            self._apply_cow(request_id, index, self.req_to_blocks[request_id][index], fresh)
            if self._record_new_block_ids:
                self.new_block_ids.append(fresh.block_id)
            copied.append(fresh)
        start = self.step_start.pop(request_id, None)
        layout = self._layout(request_id)
        if start is not None and self.hash_fn is not None:
            if layout.num_closed(num_tokens) > layout.num_closed(start):
                self._retire_tail(request_id, start)
        # A request with no blocks yet (admitted, or resumed) starts from its prefix hit, if any.
        slots = layout.step_len(start if start is not None else self.hit_tokens.get(request_id, 0), num_tokens)
        return copied + super().allocate_new_blocks(request_id, slots, slots)

    def _retire_tail(self, request_id: str, computed: int) -> None:
        """A step from `computed` that compacts rewrites the tail blocks. Their cached state (cached
        first: the next turn of a conversation resumes from such states) stays hittable while this
        step is scheduled, since a hit's copy runs before the forward; then it moves to a snapshot
        or leaves the cache (`take_snapshots`, `publish_retired_tails`)."""
        if request_id not in self.hashes:
            return
        self._cache_state(request_id, computed)
        hashes, blocks = self.hashes[request_id], self.req_to_blocks[request_id]
        first = hashes.first_tail_block(hashes.layout.num_closed(computed))
        tail = [(i, b) for i, b in enumerate(blocks[first:], first) if b.block_hash is not None]
        self.num_cached_block[request_id] = min(self.num_cached_block.get(request_id, 0), first)
        self.partial_entries.pop(request_id, None)
        if not tail:
            return
        state = dict(enumerate(hashes.state_hashes(computed)))
        partial = hashes.partial_hash(computed)
        if partial is not None:
            state[partial[0]] = partial[1]
        self.retiring += [[source, None, state[index]] for index, source in tail]

    def take_snapshots(self) -> list[KVCacheBlockCopy]:
        """Once the step is scheduled: copies of the retiring tail blocks into fresh blocks outside
        any request's table, if a quarter of the pool stays free after them. Taken after every
        allocation of the step, so a snapshot never costs a request its blocks."""
        pool = self.block_pool
        # A tail freed in this pass (its request preempted) may be someone else's block by now.
        alive = [entry for entry in self.retiring if entry[0].ref_cnt > 0 and entry[0].block_hash is not None]
        if not alive or pool.get_num_free_blocks() - len(alive) < SNAPSHOT_SPARE * pool.num_gpu_blocks:
            return []
        copies = []
        for entry, snapshot in zip(alive, pool.get_new_blocks(len(alive))):
            entry[0].ref_cnt += 1  # both ends held until `publish_retired_tails`
            entry[1] = snapshot
            copies.append(KVCacheBlockCopy(src_block_id=entry[0].block_id, dst_block_id=snapshot.block_id))
        return copies

    def publish_retired_tails(self) -> None:
        """After the step: the retired tail blocks hold the new state, their snapshots the old one."""
        for source, snapshot, block_hash in self.retiring:
            self.block_pool.evict_blocks({source.block_id})
            if snapshot is not None:
                self._cache([block_hash], [snapshot])
                self.block_pool.free_blocks([snapshot, source])
        self.retiring.clear()

    # -- prefix caching -------------------------------------------------------------------------
    def enable_physical_prefix_caching(self, hash_fn) -> None:
        self.hash_fn = hash_fn

    def _hashes(self, request) -> PhysicalBlockHashes:
        hashes = self.hashes.get(request.request_id)
        if hashes is None:
            salt = ((("cache_salt", request.cache_salt),) if request.cache_salt else ())
            if request.lora_request is not None:
                salt += (("lora", request.lora_request.lora_name),)
            hashes = PhysicalBlockHashes(self._layout(request.request_id), self.block_size, self.hash_fn,
                                         request.all_token_ids, salt)
            self.hashes[request.request_id] = hashes
        return hashes

    def find_physical_hit(self, request, max_tokens: int) -> tuple[int, list]:
        """(real tokens, blocks) of the longest cached state of this request's tokens."""
        group = [self.kv_cache_group_id]

        def lookup(block_hash):
            cached = self.block_pool.get_cached_block(block_hash, group)
            return cached[0] if cached else None

        if self._partial_sorted is None:
            self._partial_sorted = sorted(self.partial_states)
        return longest_hit(self._hashes(request), max_tokens, lookup, self._partial_sorted)

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        """Cache the full blocks of the state *before* this step: already written, so a copy made
        at a later step's start never reads a slot that a step is still writing."""
        if self.hash_fn is None or not self.kv_cache_spec.prefix_cacheable:
            return
        request_id = request.request_id
        hashes = self._hashes(request)
        written = request.num_computed_tokens
        # Skipped by the step that admits a hit (its copies are made at the step's start) and by a
        # step that compacts: `allocate_new_blocks` cached its state before moving the tail, and
        # the copies now in the table are rewritten by this very step.
        if written >= self.hit_tokens.get(request_id, 0) and \
                hashes.layout.num_closed(num_tokens) == hashes.layout.num_closed(written):
            # The partial entry is for states another request can resume from: where a prompt (or
            # a chunk stopped at a junction) ends, and where the request finishes (`cache_finished`).
            # Re-hashing it at every decode step would cost each step what stock never pays.
            self._cache_state(request_id, written, partial=written <= request.num_prompt_tokens)
        self.last_cached[request_id] = written
        self.num_cached_block.setdefault(request_id, 0)

    def cache_finished(self, request) -> None:
        """A finished request's final state (its last step has run): the next turn of a
        conversation resumes there. Not after a compacting last step, whose rewritten tail is
        being retired (`publish_retired_tails`)."""
        request_id = request.request_id
        start = self.last_cached.get(request_id)
        if self.hash_fn is None or start is None or request_id not in self.hashes:
            return
        layout, end = self._layout(request_id), request.num_computed_tokens
        if end > start and layout.num_closed(end) == layout.num_closed(start):
            self._cache_state(request_id, end)

    def _cache_state(self, request_id: str, computed: int, partial: bool = True) -> None:
        """Cache the state after `computed` tokens: its full blocks, and (`partial`) its partly
        filled last block (one such entry per request, the latest state's)."""
        hashes, blocks = self.hashes[request_id], self.req_to_blocks.get(request_id, [])
        cached = self.num_cached_block.get(request_id, 0)
        hashes.forget_tails_before(hashes.layout.num_closed(computed))
        full = min(hashes.num_full_blocks(computed), len(blocks))
        previous = self.partial_entries.get(request_id)
        if partial or (previous is not None and any(previous is block for block in blocks[cached:full])):
            self.partial_entries.pop(request_id, None)
            if previous is not None and previous.block_hash is not None:
                self.block_pool.evict_blocks({previous.block_id})
        if full > cached:
            self._cache(hashes.state_hashes(computed, first=cached)[: full - cached], blocks[cached:full])
            self.num_cached_block[request_id] = full
        if not partial:
            return
        partial = hashes.partial_hash(computed)
        if partial is not None and partial[0] < len(blocks) and blocks[partial[0]].block_hash is None:
            self._cache([partial[1]], [blocks[partial[0]]])
            self.partial_entries[request_id] = blocks[partial[0]]
            self._remember_partial_state(computed)

    def _remember_partial_state(self, computed: int) -> None:
        if computed in self.partial_states:
            self.partial_states.move_to_end(computed)
            return
        self.partial_states[computed] = None
        if len(self.partial_states) > PARTIAL_STATES:
            self.partial_states.popitem(last=False)  # an entry still cached there is no longer found
        self._partial_sorted = None

    def _cache(self, block_hashes: list, blocks: list) -> None:
        self.block_pool.cache_full_blocks(request=_Hashed(block_hashes), blocks=blocks, num_cached_blocks=0,
                                          num_full_blocks=len(blocks), block_size=self.block_size,
                                          kv_cache_group_id=self.kv_cache_group_id)

    def pop_blocks_for_free(self, request_id: str):
        for table in (self.hashes, self.hit_tokens, self.pending_copies, self.step_start, self.partial_entries,
                      self.last_cached):
            table.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        self.step_start[request_id] = processed_computed_tokens  # for this allocation's tail copy
        keep = cdiv(self._layout(request_id).physical_len(processed_computed_tokens), self.block_size)
        if len(blocks) > keep:
            freed = blocks[keep:]
            del blocks[keep:]
            self.block_pool.free_blocks(reversed(freed))
            self.num_blocks_freed += len(freed)


class _Hashed:
    """What `BlockPool.cache_full_blocks` reads of a request (its block hashes), for physical blocks."""

    def __init__(self, block_hashes):
        self.block_hashes = block_hashes


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

"""`SentinelScheduler`: vLLM's scheduler plus each request's KV layout and the sentinel counters.

Scheduling itself is untouched: real tokens only, so max_tokens, stop checks, usage and
max_model_len never see a sentinel. The scheduler
- decides each request's layout on arrival (its schedule, or none) and shares the table with the
  `SentinelAttentionManager`s, which size and trim blocks by physical length;
- counts the spans each step closes (the worker computes their <CL>/<CR> in that same step);
- reports the counters through `SchedulerStats` (see metrics.py);
- looks prefix-cache hits up over physical blocks (prefix_cache.py), so vLLM's hit accounting,
  metrics and copy-on-write carry them as they carry stock hits, and ends a prefill chunk at the
  *junction* where a request's prompt leaves those seen before, so that its state there is cached.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from .kv_cache_manager import SentinelAttentionManager
from .layout import KVLayout
from .metrics import SentinelStats
from .settings import EngineSettings

logger = init_logger("vllm.sentinel")

# Logical block hashes of recent prompts, kept to measure how much of a new prompt was seen before
# (at most this many, ~40 MB).
SEEN_BLOCKS = 1 << 18
# A waiting request waits a step for a running one computing the same prefix (to its junction)
# when that saves recomputing more than this many tokens.
JUNCTION_WAIT = 256


class SentinelScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.sentinel = EngineSettings.of(vllm_config)
        self.layouts: dict[str, KVLayout] = {}
        # Real tokens of each request whose spans are already counted: a request recomputed after
        # preemption closes the same spans again, and they must not count twice.
        self.counted_upto: dict[str, int] = {}
        self.sentinel_managers = [m for m in self.kv_cache_manager.coordinator.single_type_managers
                                  if isinstance(m, SentinelAttentionManager)]
        if not self.sentinel_managers:
            raise RuntimeError("the sentinel scheduler found no SentinelAttentionManager: the model's attention "
                               "layers did not get the sentinel KV cache spec")
        for manager in self.sentinel_managers:
            manager.attach(self.layouts)
        self.seen_blocks: OrderedDict = OrderedDict()
        self.shared_tokens: dict[str, int] = {}
        self.junctions: dict[str, tuple[int, int]] = {}
        if self.cache_config.enable_prefix_caching:
            self._enable_physical_prefix_caching()
            # vLLM's hook for ending a prefill chunk where a state must be cached (Mamba's "align"
            # mode); ours is `_mamba_block_aligned_split` below.
            self.need_mamba_block_aligned_split = True
        self.sentinel_stats = SentinelStats()
        logger.info("sentinel compression on: <CL>=%d <CR>=%d, default schedule %s",
                    self.sentinel.cl_token_id, self.sentinel.cr_token_id, self.sentinel.schedule)

    def _enable_physical_prefix_caching(self) -> None:
        from vllm.utils.hashing import get_hash_fn_by_name

        managers = self.kv_cache_manager.coordinator.single_type_managers
        pool = self.kv_cache_manager.block_pool
        if len(managers) != 1 or managers[0] is not self.sentinel_managers[0] \
                or pool.hash_block_size != managers[0].block_size:
            raise NotImplementedError(
                "sentinel prefix caching needs one KV cache group whose hash block size is its block size; "
                f"this model has {len(managers)} group(s). Start the server with --no-enable-prefix-caching")
        managers[0].enable_physical_prefix_caching(get_hash_fn_by_name(self.cache_config.prefix_caching_hash_algo))

    def _get_local_prefix_cache_hit(self, request):
        """vLLM's lookup chains logical tokens; a sentinel hit is a state over physical blocks.

        The third value is vLLM's shared-prefix boundary: here the junction where this request's
        prefill stops a chunk (see `_junction`)."""
        manager = self.kv_cache_manager
        if not manager.prefix_cache_lookup_enabled(request):
            return manager.empty_kv_cache_blocks, 0, 0, False
        num_tokens, blocks = self.sentinel_managers[0].find_physical_hit(request, request.num_tokens - 1)
        return manager.create_kv_cache_blocks((blocks,)), num_tokens, self._junction(request, num_tokens), False

    def _junction(self, request, hit: int) -> int:
        """Where a request's state should be cached for the requests after it: the end of the
        prefix it shares with prompts seen before (whole logical blocks), if past its hit.

        Why: the cache holds states at the ends of steps. Requests sharing a system prompt but not
        the question after it find the first one's state only where it ends on a final block; with
        a window (W > G) none does, the window's raw tokens being needed too. So the second request
        ends a prefill chunk at the junction, and every later one resumes there."""
        cached = self.junctions.get(request.request_id)
        if cached is not None and cached[0] == hit:
            return cached[1]
        shared = self.shared_tokens.get(request.request_id)
        if shared is None:
            shared = self._remember_prompt(request)
        junction = min(shared, request.num_tokens - 1)
        junction = junction if junction > hit else 0
        self.junctions[request.request_id] = (hit, junction)
        return junction

    def _junction_key(self, request, junction: int) -> tuple:
        blocks = junction // self.hash_block_size
        return (request.block_hashes[blocks - 1] if blocks else None, junction, self.layouts[request.request_id].key)

    def _wait_for_junctions(self) -> list:
        """Waiting requests that would recompute a prefix that an earlier request (running, or
        first in the queue) computes up to the same junction: they wait and resume from its state
        instead (stock vLLM shares such blocks within the step; a sentinel state is cached once
        written, so the second of two such requests would otherwise pay the full prefill too)."""
        owners = set()
        for request in self.running:
            hit, junction = self.junctions.get(request.request_id, (0, 0))
            if junction - hit > JUNCTION_WAIT and request.num_computed_tokens < junction:
                owners.add(self._junction_key(request, junction))
        held = []
        # Only those that could be admitted this step: a long queue is not looked up every step.
        for request in itertools.islice(self.waiting, self.max_num_running_reqs):
            if request.num_computed_tokens or not self.kv_cache_manager.prefix_cache_lookup_enabled(request):
                continue
            hit, _ = self.sentinel_managers[0].find_physical_hit(request, request.num_tokens - 1)
            junction = self._junction(request, hit)
            if junction - hit > JUNCTION_WAIT:
                key = self._junction_key(request, junction)
                if key in owners:
                    held.append(request)
                owners.add(key)
        return held

    def _remember_prompt(self, request) -> int:
        """Tokens of this prompt seen before (whole logical blocks); then remember its blocks."""
        seen, hashes = self.seen_blocks, request.block_hashes
        shared = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        for block_hash in hashes:
            seen[block_hash] = None
            seen.move_to_end(block_hash)
        while len(seen) > SEEN_BLOCKS:
            seen.popitem(last=False)
        self.shared_tokens[request.request_id] = shared * self.hash_block_size
        return self.shared_tokens[request.request_id]

    def _mamba_block_aligned_split(self, request, num_new_tokens: int, num_new_local_computed_tokens: int = 0,
                                   num_external_computed_tokens: int = 0) -> int:
        start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
        junction = request.shared_prefix_boundary
        return junction - start if start < junction < start + num_new_tokens else num_new_tokens

    def add_request(self, request) -> None:
        # The request was checked before it got here (patches/engine_core_validation.py), so this
        # cannot raise; streaming-input sessions, whose later chunks come through here, are refused.
        if request.request_id not in self.requests:
            self.layouts[request.request_id] = self.sentinel.request_layout(request.sampling_params,
                                                                            request.num_prompt_tokens)
        super().add_request(request)

    def _free_blocks(self, request) -> None:
        if self.cache_config.enable_prefix_caching:
            self.sentinel_managers[0].cache_finished(request)
        super()._free_blocks(request)
        for table in (self.layouts, self.counted_upto, self.shared_tokens, self.junctions):
            table.pop(request.request_id, None)

    def schedule(self, *args, **kwargs):
        held = self._wait_for_junctions() if self.cache_config.enable_prefix_caching else []
        if held:
            self.waiting.remove_requests(held)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            if held:
                self.waiting.prepend_requests(held)
        if self.cache_config.enable_prefix_caching:
            snapshots = self.sentinel_managers[0].take_snapshots()
            if snapshots:
                output.kv_cache_block_copies = [*(output.kv_cache_block_copies or ()), *snapshots]
        closed = 0
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            layout = self.layouts.get(req_id)
            if layout is not None and layout.compresses:
                end = self.requests[req_id].num_computed_tokens  # already advanced past this step
                counted = self.counted_upto.get(req_id, 0)
                if end > counted:
                    closed += layout.num_closed(end) - layout.num_closed(max(end - num_tokens, counted))
                    self.counted_upto[req_id] = end
        stats = self.sentinel_stats
        stats.spans_closed += closed
        stats.sentinel_tokens += closed
        stats.peak_running = max(stats.peak_running, len(self.running))
        return output

    def update_from_output(self, *args, **kwargs):
        outputs = super().update_from_output(*args, **kwargs)
        if self.cache_config.enable_prefix_caching:
            self.sentinel_managers[0].publish_retired_tails()  # the step's copies have run
        return outputs

    def current_sentinel_stats(self) -> SentinelStats:
        stats = self.sentinel_stats
        stats.blocks_freed = sum(m.num_blocks_freed for m in self.sentinel_managers)
        stats.logical_tokens = stats.physical_slots = 0
        for request in self.running:
            layout = self.layouts.get(request.request_id)
            if layout is not None:
                stats.logical_tokens += request.num_computed_tokens
                stats.physical_slots += layout.physical_len(request.num_computed_tokens)
        return stats

    def make_stats(self, *args, **kwargs):
        scheduler_stats = super().make_stats(*args, **kwargs)
        if scheduler_stats is not None:
            self.current_sentinel_stats().pack_into(scheduler_stats)
        return scheduler_stats

"""`SentinelScheduler`: vLLM's scheduler plus each request's KV layout and the sentinel counters.

Scheduling itself is untouched: real tokens only, so max_tokens, stop checks, usage and
max_model_len never see a sentinel. The scheduler
- decides each request's layout on arrival (its schedule, or none) and shares the table with the
  `SentinelAttentionManager`s, which size and trim blocks by physical length;
- counts the spans each step closes (the worker computes their <CL>/<CR> in that same step);
- reports the counters through `SchedulerStats` (see metrics.py);
- looks prefix-cache hits up over physical blocks (prefix_cache.py), so vLLM's hit accounting,
  metrics and copy-on-write carry them as they carry stock hits.
"""
from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from .kv_cache_manager import SentinelAttentionManager
from .layout import KVLayout
from .metrics import SentinelStats
from .settings import EngineSettings

logger = init_logger("vllm.sentinel")


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
        if self.cache_config.enable_prefix_caching:
            self._enable_physical_prefix_caching()
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
        """vLLM's lookup chains logical tokens; a sentinel hit is a state over physical blocks."""
        manager = self.kv_cache_manager
        if not manager.prefix_cache_lookup_enabled(request):
            return manager.empty_kv_cache_blocks, 0, 0, False
        num_tokens, blocks = self.sentinel_managers[0].find_physical_hit(request, request.num_tokens - 1)
        return manager.create_kv_cache_blocks((blocks,)), num_tokens, 0, False

    def add_request(self, request) -> None:
        # The request was checked before it got here (patches/engine_core_validation.py), so this
        # cannot raise; streaming-input sessions, whose later chunks come through here, are refused.
        if request.request_id not in self.requests:
            self.layouts[request.request_id] = self.sentinel.request_layout(request.sampling_params)
        super().add_request(request)

    def _free_blocks(self, request) -> None:
        super()._free_blocks(request)
        self.layouts.pop(request.request_id, None)
        self.counted_upto.pop(request.request_id, None)

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
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

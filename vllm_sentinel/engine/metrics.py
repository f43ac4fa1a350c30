"""Sentinel counters: counted in EngineCore, logged and exported by the front end.

vLLM's stats reach the front end as `SchedulerStats`, a dataclass that msgspec decodes by its
declared fields, so a subclass or an extra attribute would be dropped on the way. The counters
therefore ride in `SchedulerStats.running_lora_adapters` (a name -> int dict): the sentinel
backend refuses LoRA, so vLLM leaves that dict empty and never reads it, and the keys carry a
`sentinel:` prefix that no LoRA name check would accept.

`SentinelStatLogger` is the `vllm.stat_logger_plugins` entry point: next to vLLM's own periodic
log line it logs one for the sentinel counters, and it exports them as Prometheus metrics
(`vllm:sentinel_*`), which `vllm serve` serves on /metrics and `LLM.get_metrics()` returns.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

# Under vLLM's logger namespace, so our lines share its handler, format and VLLM_LOGGING_LEVEL.
logger = logging.getLogger("vllm.sentinel")
PREFIX = "sentinel:"


@dataclass
class SentinelStats:
    spans_closed: int = 0          # cumulative
    sentinel_tokens: int = 0       # cumulative: <CR>s computed (one per closed span; <CL> is a constant)
    blocks_freed: int = 0          # cumulative: blocks given back to the pool by compaction
    logical_tokens: int = 0        # now: real tokens whose KV the running requests represent
    physical_slots: int = 0        # now: KV slots the running requests actually hold
    peak_running: int = 0          # most requests running at once

    @property
    def compression_ratio(self) -> float:
        """Logical tokens per physical KV slot held right now (1.0 = no saving)."""
        return self.logical_tokens / self.physical_slots if self.physical_slots else 1.0

    def pack_into(self, scheduler_stats) -> None:
        scheduler_stats.running_lora_adapters.update({PREFIX + k: v for k, v in asdict(self).items()})

    @classmethod
    def unpack(cls, scheduler_stats) -> "SentinelStats | None":
        carried = getattr(scheduler_stats, "running_lora_adapters", None) or {}
        if PREFIX + "spans_closed" not in carried:
            return None
        return cls(**{f.name: int(carried.get(PREFIX + f.name, 0)) for f in fields(cls)})

    def log_line(self) -> str:
        return (f"Sentinel: {self.spans_closed} spans closed, {self.sentinel_tokens} sentinel tokens, "
                f"{self.blocks_freed} KV blocks freed by compaction, compression {self.compression_ratio:.2f}x "
                f"({self.logical_tokens} tokens in {self.physical_slots} KV slots)")


class _Prometheus:
    """The process's sentinel metrics, next to vLLM's (the `vllm:` prefix puts them in
    `LLM.get_metrics()` too). Created once: prometheus_client refuses duplicate names."""

    _instance: "_Prometheus | None" = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        labels = ["model_name", "engine"]
        self.spans_closed = Counter("vllm:sentinel_spans_closed", "Spans compressed into a <CR>.", labels)
        self.sentinel_tokens = Counter("vllm:sentinel_tokens", "Sentinel tokens (<CR>) computed; <CL> is a model constant.", labels)
        self.blocks_freed = Counter("vllm:sentinel_kv_blocks_freed", "KV blocks returned to the pool by compaction.",
                                    labels)
        self.compression_ratio = Gauge("vllm:sentinel_kv_compression_ratio",
                                       "Real tokens per KV slot held by running requests.", labels,
                                       multiprocess_mode="mostrecent")
        self.physical_slots = Gauge("vllm:sentinel_kv_slots_held", "KV slots held by running requests.", labels,
                                    multiprocess_mode="mostrecent")
        self.logical_tokens = Gauge("vllm:sentinel_kv_tokens_represented",
                                    "Real tokens whose KV the running requests represent.", labels,
                                    multiprocess_mode="mostrecent")
        self.collectors = [self.spans_closed, self.sentinel_tokens, self.blocks_freed, self.compression_ratio,
                           self.physical_slots, self.logical_tokens]

    def restart(self, labels: dict) -> None:
        """Counters of a new engine start at zero, as vLLM's own do (it recreates its collectors)."""
        for collector in self.collectors:
            try:
                collector.remove(*labels.values())
            except KeyError:
                pass

    @classmethod
    def get(cls) -> "_Prometheus":
        """The metrics, registered: vLLM's Prometheus logger unregisters every `vllm:` collector
        when an engine starts, so a second engine in the same process re-registers ours."""
        from prometheus_client import REGISTRY

        if cls._instance is None:
            cls._instance = cls()
        for collector in cls._instance.collectors:
            if collector not in REGISTRY._collector_to_names:
                REGISTRY.register(collector)
        return cls._instance


def _stat_logger_base():
    from vllm.v1.metrics.loggers import StatLoggerBase

    return StatLoggerBase


class SentinelStatLogger(_stat_logger_base()):
    """Logs and exports the sentinel counters of one engine; inert unless the sentinel backend runs."""

    def __init__(self, vllm_config, engine_index: int = 0):
        from .engine_config import settings_of

        self.active = settings_of(vllm_config) is not None
        self.engine_index = engine_index
        self.labels = {"model_name": vllm_config.model_config.served_model_name, "engine": str(engine_index)}
        self.last: SentinelStats | None = None
        self.logged: SentinelStats | None = None
        self.exported = SentinelStats()
        self.prometheus: _Prometheus | None = None  # on first record: after vLLM's logger has unregistered
        if self.active and _Prometheus._instance is not None:
            _Prometheus._instance.restart(self.labels)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if not self.active or scheduler_stats is None:
            return
        stats = SentinelStats.unpack(scheduler_stats)
        if stats is None:
            return
        if self.prometheus is None:
            self.prometheus = _Prometheus.get()
        prom, labels = self.prometheus, self.labels
        prom.spans_closed.labels(**labels).inc(stats.spans_closed - self.exported.spans_closed)
        prom.sentinel_tokens.labels(**labels).inc(stats.sentinel_tokens - self.exported.sentinel_tokens)
        prom.blocks_freed.labels(**labels).inc(stats.blocks_freed - self.exported.blocks_freed)
        prom.compression_ratio.labels(**labels).set(stats.compression_ratio)
        prom.physical_slots.labels(**labels).set(stats.physical_slots)
        prom.logical_tokens.labels(**labels).set(stats.logical_tokens)
        self.exported = stats
        self.last = stats

    def log(self):
        if self.active and self.last is not None and self.last != self.logged:
            logger.info("Engine %03d: %s", self.engine_index, self.last.log_line())
            self.logged = self.last

    def log_engine_initialized(self):
        if self.active:
            logger.info("Engine %03d: sentinel compression active", self.engine_index)

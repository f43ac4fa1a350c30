"""Every change vllm-sentinel makes to vLLM internals, one file per patched behaviour.

Installed as `vllm_sentinel.patches`. Each patch checks the vLLM version it was written for and
fails loudly on a mismatch rather than silently changing a different vLLM. `apply_all()` is the
one place they are applied from (the plugin entry point calls it in every vLLM process).
"""
from __future__ import annotations

from . import vllm_cpu_version

_applied = False


def apply_all() -> None:
    global _applied
    if _applied:
        return
    vllm_cpu_version.apply()
    _applied = True

"""Entry point `vllm.general_plugins: sentinel`: vLLM calls `register()` in every process it starts.

It must stay cheap and import-safe: it runs in the API server before the CLI parser is built,
in EngineCore and in every worker, for stock engines too. On a vLLM version the patches were not
written for it patches nothing and only refuses `--attention-backend sentinel` (patches/__init__.py).
"""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm_sentinel")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from .patches import apply_all

    if apply_all():
        logger.debug("vllm-sentinel plugin loaded")
    else:
        logger.debug("vllm-sentinel plugin inactive: unsupported vLLM version")
    _registered = True

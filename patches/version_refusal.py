"""On a vLLM these patches were not written for: leave vLLM alone, refuse only `--attention-backend sentinel`.

Why: the plugin loads in every vLLM process of the environment, stock ones included. Patching an
unknown vLLM could break `vllm serve MODEL` for users who never asked for sentinel, so on a
version mismatch nothing is patched. But `--attention-backend sentinel` must then fail with the
version message, not with "invalid backend" or, worse, run silently on the platform's default
attention. Two small, defensive touches do that, each skipped if this vLLM lacks what it uses:
the `SENTINEL` name is made to parse (as the registry's CUSTOM placeholder), and the platform's
config hook raises the version message when that backend is selected.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm_sentinel")


def apply(message: str) -> None:
    try:
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        AttentionBackendEnum._member_map_.setdefault("SENTINEL", AttentionBackendEnum.CUSTOM)
        platform = type(current_platform)
        original = platform.check_and_update_config
        if getattr(original, "_sentinel_refusal", False):
            return

        def check_and_update_config(cls, vllm_config) -> None:
            if getattr(vllm_config.attention_config, "backend", None) is AttentionBackendEnum.CUSTOM:
                raise RuntimeError(f"--attention-backend sentinel is not available: {message}")
            original(vllm_config)

        check_and_update_config._sentinel_refusal = True
        platform.check_and_update_config = classmethod(check_and_update_config)
    except Exception as error:  # an unknown vLLM: stay out of its way
        logger.warning("vllm-sentinel is inactive (%s); it could not install its refusal either: %s", message, error)

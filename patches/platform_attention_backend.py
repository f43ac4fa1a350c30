"""Let the platform's attention selector return the sentinel backend when it is selected.

Why: `CpuPlatform.get_attn_backend_cls` answers CPU_ATTN to any selection but MLA ones (it logs
"Cannot use CUSTOM backend on CPU."), so the selection never reached the registry override.
Only the CUSTOM-pointing-at-sentinel case is intercepted; everything else goes to the platform.
"""
from __future__ import annotations

from ._guard import require_installed_vllm


def apply(backend_path: str) -> None:
    require_installed_vllm("platform_attention_backend")
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    platform = type(current_platform)
    original = platform.get_attn_backend_cls
    if getattr(original, "_sentinel", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if (selected_backend is AttentionBackendEnum.CUSTOM
                and _ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM) == backend_path):
            if attn_selector_config.use_mla or attn_selector_config.use_sparse:
                raise NotImplementedError("--attention-backend sentinel supports standard multi-head / grouped-query "
                                          "attention, not MLA or sparse attention models")
            return backend_path
        return original(selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._sentinel = True
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)

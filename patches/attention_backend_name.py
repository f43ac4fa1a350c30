"""Accept `--attention-backend sentinel` (any case) and point it at the sentinel backend.

Why not `AttentionBackendEnum.register("SENTINEL", path)`: enum members pickle by value, and
EngineCore and the workers unpickle the VllmConfig *before* they load plugins, so a member added at
run time cannot be rebuilt there. The built-in `CUSTOM` placeholder (value None) always exists, so
we point it at our backend through the registry's override table and make `SENTINEL` an alias of
it: the config carries `CUSTOM` and every process resolves it after loading this plugin.
"""
from __future__ import annotations

from ._guard import require_installed_vllm

ALIAS = "SENTINEL"


def apply(backend_path: str) -> None:
    require_installed_vllm("attention_backend_name")
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum, register_backend

    claimed = _ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM)
    if claimed not in (None, backend_path):
        raise RuntimeError(f"another plugin registered the CUSTOM attention backend ({claimed}); "
                           "vllm-sentinel needs it for --attention-backend sentinel: uninstall one of them")
    register_backend(AttentionBackendEnum.CUSTOM, backend_path)
    AttentionBackendEnum._member_map_[ALIAS] = AttentionBackendEnum.CUSTOM

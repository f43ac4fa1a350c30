"""Check each request in EngineCore too, where a bad one fails alone instead of killing the engine.

Why: requests reach EngineCore without our front end (`LLMEngine.add_request` with a ready
`EngineCoreRequest`, other front ends, a vLLM front end without the plugin). A value that got
past the checks would raise inside the scheduler or the worker, and an exception there stops the
engine for every request. `EngineCore.preprocess_add_request` is vLLM's own per-request stage:
in the engine process an exception there becomes an error output for that request alone
(`_handle_request_preproc_error`), in-process it is raised to the caller of `add_request`.
"""
from __future__ import annotations

import functools

from ._guard import require_installed_vllm


def apply(settings_of) -> None:
    require_installed_vllm("engine_core_validation")
    from vllm.v1.engine.core import EngineCore

    original = EngineCore.preprocess_add_request
    if getattr(original, "_sentinel", False):
        return

    @functools.wraps(original)
    def preprocess_add_request(self, request):
        settings = settings_of(self.vllm_config)
        if settings is not None:
            settings.check_request(request.prompt_token_ids, request.sampling_params or request.pooling_params,
                                   resumable=bool(getattr(request, "resumable", False)))
        return original(self, request)

    preprocess_add_request._sentinel = True
    EngineCore.preprocess_add_request = preprocess_add_request

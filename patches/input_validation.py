"""Refuse, per request, prompts that hold a sentinel id and malformed sentinel options.

Why here: the input processor runs in the front end, where a validation error fails that one
request (HTTP 400 from `vllm serve`, an exception from `LLM.generate`) and the engine keeps
serving the others; EngineCore never sees the request.
"""
from __future__ import annotations

from ._guard import require_installed_vllm


def apply(settings_of) -> None:
    """`settings_of(vllm_config)` returns the engine's sentinel settings, or None when it is off."""
    require_installed_vllm("input_validation")
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original_inputs = InputProcessor._validate_model_inputs
    original_params = InputProcessor._validate_params
    if getattr(original_inputs, "_sentinel", False):
        return

    def _validate_model_inputs(self, encoder_input, decoder_input):
        original_inputs(self, encoder_input, decoder_input)
        settings = settings_of(self.vllm_config)
        if settings is None or decoder_input.get("type") == "embeds":
            return
        sentinels = set(settings.sentinel_ids)
        for index, token_id in enumerate(decoder_input["prompt_token_ids"]):
            if token_id in sentinels:
                name = "<CL>" if token_id == settings.cl_token_id else "<CR>"
                raise VLLMValidationError(
                    f"the prompt holds the sentinel token {name} (id {token_id}) at position {index}; sentinels "
                    f"are inserted by the engine and may not appear in prompts. Remove it (in text, the literal "
                    f"string {name} tokenizes to the sentinel: rephrase it)", parameter="prompt")

    def _validate_params(self, params, supported_tasks):
        result = original_params(self, params, supported_tasks)
        settings = settings_of(self.vllm_config)
        if settings is not None and isinstance(params, SamplingParams):
            try:
                settings.request_schedule(params.extra_args)
            except ValueError as err:
                raise VLLMValidationError(str(err), parameter="extra_args") from None
        return result

    _validate_model_inputs._sentinel = True
    InputProcessor._validate_model_inputs = _validate_model_inputs
    InputProcessor._validate_params = _validate_params

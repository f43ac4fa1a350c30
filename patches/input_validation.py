"""Refuse, per request and in the front end, what the sentinel engine cannot serve.

Why here: the input processor runs in the front end, where a validation error fails that one
request (HTTP 400 from `vllm serve`, an exception from `LLM.generate`) and the engine keeps
serving the others. The checks themselves are `EngineSettings.check_request`; EngineCore runs
them again (engine_core_validation.py) for requests that do not come through this front end.
"""
from __future__ import annotations

from ._guard import require_installed_vllm


def apply(settings_of) -> None:
    """`settings_of(vllm_config)` returns the engine's sentinel settings, or None when it is off."""
    require_installed_vllm("input_validation")
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original_process = InputProcessor.process_inputs
    original_inputs = InputProcessor._validate_model_inputs
    original_params = InputProcessor._validate_params
    if getattr(original_inputs, "_sentinel", False):
        return

    def process_inputs(self, request_id, prompt, params, *args, resumable: bool = False, **kwargs):
        if resumable and settings_of(self.vllm_config) is not None:
            raise VLLMValidationError(
                "streaming-input sessions (resumable requests) are not supported with --attention-backend "
                "sentinel; send each input as one request", parameter="resumable")
        request = original_process(self, request_id, prompt, params, *args, resumable=resumable, **kwargs)
        settings = settings_of(self.vllm_config)
        if settings is not None and request.prompt_token_ids is not None:
            # Marked regions are offsets into the prompt's tokens, known only once it is tokenized.
            try:
                settings.check_regions(request.prompt_token_ids, request.sampling_params)
            except ValueError as err:
                raise VLLMValidationError(str(err), parameter="extra_args") from None
        return request

    def _validate_model_inputs(self, encoder_input, decoder_input):
        settings = settings_of(self.vllm_config)
        # Ours first: vLLM's own vocabulary check would call a sentinel id merely out of vocabulary.
        if settings is not None and decoder_input.get("type") != "embeds":
            try:
                settings.check_prompt(decoder_input["prompt_token_ids"])
            except ValueError as err:
                raise VLLMValidationError(str(err), parameter="prompt") from None
        original_inputs(self, encoder_input, decoder_input)

    def _validate_params(self, params, supported_tasks):
        result = original_params(self, params, supported_tasks)
        settings = settings_of(self.vllm_config)
        if settings is not None:
            if not isinstance(params, SamplingParams):
                raise VLLMValidationError("the sentinel engine serves generation requests only")
            settings.plain_regions(params)
            try:
                settings.check_request(None, params)  # the prompt is checked above, once tokenized
            except ValueError as err:
                parameter = "allowed_token_ids" if "allowed_token_ids" in str(err) else "extra_args"
                raise VLLMValidationError(str(err), parameter=parameter) from None
        return result

    _validate_model_inputs._sentinel = True
    InputProcessor.process_inputs = process_inputs
    InputProcessor._validate_model_inputs = _validate_model_inputs
    InputProcessor._validate_params = _validate_params

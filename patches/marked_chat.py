"""Chat completions: messages marked `"sentinel": "compress"` become the request's marked regions.

Why here: only after the chat template has rendered the conversation and the renderer has
tokenized it is it known which tokens a message became, and `render_chat_request` is where both
are at hand, before the sampling parameters are built from `vllm_xargs`. The regions found
(vllm_sentinel/engine/marked_messages.py) go into the request's `vllm_xargs` as `sentinel_regions`,
so from there on a marked chat request is exactly a completions request with regions, checked and
served the same way. A mark that cannot be placed is a 400 naming the message.
"""
from __future__ import annotations

import functools

from ._guard import require_installed_vllm


def apply(settings_of) -> None:
    require_installed_vllm("marked_chat")
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    from ..engine.marked_messages import MarkedMessageError, is_marked, regions_of
    from ..engine.settings import FLAT_PREFIX

    original = OpenAIServingChat.render_chat_request
    if getattr(original, "_sentinel", False):
        return

    @functools.wraps(original)
    async def render_chat_request(self, request):
        result = await original(self, request)
        messages = request.messages
        if not isinstance(result, tuple) or not is_marked(messages):
            return result  # vLLM's own error response, or nothing marked
        if settings_of(self.engine_client.vllm_config) is None:
            return result  # a stock engine ignores the marks, as it ignores other sentinel options
        conversation, engine_inputs = result
        xargs = dict(request.vllm_xargs or {})
        if FLAT_PREFIX + "regions" in xargs:
            return self.create_error_response(
                "give marked regions either as messages marked \"sentinel\": \"compress\" or as "
                "vllm_xargs.sentinel_regions, not both")
        if len(engine_inputs) != 1:
            return self.create_error_response("marked messages need a request that renders to one prompt")
        components = self._extract_prompt_components(engine_inputs[0])
        if components.text is None or components.token_ids is None:
            return self.create_error_response("marked messages need a text chat prompt")
        try:
            regions = regions_of(messages, components.text, components.token_ids, self.renderer.tokenizer)
        except MarkedMessageError as error:
            return self.create_error_response(str(error))
        xargs[FLAT_PREFIX + "regions"] = [offset for region in regions for offset in region]
        request.vllm_xargs = xargs
        return conversation, engine_inputs

    render_chat_request._sentinel = True
    OpenAIServingChat.render_chat_request = render_chat_request

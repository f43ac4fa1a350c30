"""Serve the text `<CL>` / `<CR>` in a prompt as ordinary characters, never as the sentinel ids.

Why: a sentinel model's tokenizer holds `<CL>` and `<CR>` as added tokens (training inserts them
by id), and a fast tokenizer matches added tokens anywhere in the text. So a user prompt about a
vim mapping (`<CR>`), a regex or carriage returns would be turned into a sentinel id and refused,
or worse, reach the model as a span boundary. Nothing ever needs to turn text into a sentinel, so
the renderer of a sentinel engine (the front end's text -> ids, chat templates included) gets a copy
of the tokenizer without those two added tokens. The shared, cached tokenizer is left alone: a
stock engine for the same model in the same process keeps the original.
"""
from __future__ import annotations

import copy
import functools
import json

from ._guard import require_installed_vllm


def without_added_tokens(tokenizer, token_ids: tuple[int, ...]):
    """A copy of an HF fast tokenizer whose backend no longer matches the given added tokens in text.

    Returns the tokenizer unchanged when it is not a fast tokenizer or does not hold those tokens.
    vLLM hands out its tokenizers wrapped by `get_cached_tokenizer`, whose copies (the renderer
    deep-copies a pool of them) are rebuilt from the wrapped tokenizer: so the wrapped one is
    copied and changed, and wrapped anew."""
    from vllm.tokenizers.hf import get_cached_tokenizer

    rebuild, args = tokenizer.__reduce__()[:2]
    cached = rebuild is get_cached_tokenizer
    base = args[0] if cached else tokenizer
    backend = getattr(base, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return tokenizer
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    kept = [token for token in data.get("added_tokens", []) if token["id"] not in token_ids]
    if len(kept) == len(data.get("added_tokens", [])):
        return tokenizer
    data["added_tokens"] = kept
    stripped = copy.copy(base)
    stripped._tokenizer = Tokenizer.from_str(json.dumps(data))
    return get_cached_tokenizer(stripped) if cached else stripped


def apply(settings_of) -> None:
    require_installed_vllm("sentinel_text")
    from vllm.renderers.registry import RendererRegistry

    original = RendererRegistry.load_renderer
    if getattr(original, "_sentinel", False):
        return

    @functools.wraps(original)
    def load_renderer(self, renderer_mode, config, tokenizer):
        settings = settings_of(config)
        if settings is not None and tokenizer is not None:
            tokenizer = without_added_tokens(tokenizer, settings.sentinel_ids)
        return original(self, renderer_mode, config, tokenizer)

    load_renderer._sentinel = True
    RendererRegistry.load_renderer = load_renderer

"""Chat messages marked `"sentinel": "compress"` -> marked regions in the rendered prompt's tokens.

A chat user marks whole messages (the retrieved documents, an old history) and never counts
tokens. The chat template decides where each message's text lands in the rendered prompt, so the
regions are found after rendering: each marked message's text is located in the rendered text, in
message order, and its characters are mapped to tokens through the tokenizer's offsets. A token
that straddles the text's edge (a template's separator merged into it) stays raw: regions only
ever hold tokens wholly inside the marked text.

Used by `vllm serve`'s chat completions (patches/marked_chat.py) and offline by `marked_chat`.
"""
from __future__ import annotations

from typing import Any

MARK_KEY = "sentinel"
MARK_VALUES = ("compress", "raw")


class MarkedMessageError(ValueError):
    pass


def is_marked(messages) -> bool:
    return any(isinstance(m, dict) and MARK_KEY in m for m in messages)


def _texts(message: dict, index: int) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return [p["text"] for p in content]
    raise MarkedMessageError(f"message {index} is marked {MARK_KEY}=compress but its content is not text "
                             "(a string or text parts); only text can be compressed")


def marked_characters(messages, rendered: str) -> list[tuple[int, int]]:
    """[start, end) character ranges of every marked message's text in the rendered prompt."""
    ranges, cursor = [], 0
    for index, message in enumerate(messages):
        mark = message.get(MARK_KEY) if isinstance(message, dict) else None
        if mark is None:
            if isinstance(message, dict):
                for text in _texts_or_none(message):
                    found = rendered.find(text, cursor) if text else -1
                    cursor = found + len(text) if found >= 0 else cursor
            continue
        if mark not in MARK_VALUES:
            raise MarkedMessageError(f"message {index} has {MARK_KEY}={mark!r}: the allowed marks are "
                                     f"{', '.join(repr(v) for v in MARK_VALUES)}")
        texts = _texts(message, index)
        for text in texts:
            found = rendered.find(text, cursor) if text else cursor
            if found < 0:
                raise MarkedMessageError(
                    f"message {index}'s text is not in the prompt the chat template rendered, so its tokens "
                    "cannot be found; mark messages whose content the template copies verbatim")
            if mark == "compress" and text:
                ranges.append((found, found + len(text)))
            cursor = found + len(text)
    return ranges


def _texts_or_none(message: dict) -> list[str]:
    try:
        return _texts(message, -1)
    except MarkedMessageError:
        return []


def token_regions(char_ranges, offsets, shift: int = 0) -> list[list[int]]:
    """Token [a, b) ranges holding exactly the tokens wholly inside each character range
    (`offsets`: each token's (start, end) characters; `shift`: tokens before those offsets start)."""
    regions = []
    for start, end in char_ranges:
        inside = [i for i, (s, e) in enumerate(offsets) if s >= start and e <= end and e > s]
        if inside:
            regions.append([inside[0] + shift, inside[-1] + 1 + shift])
    merged: list[list[int]] = []
    for a, b in regions:  # adjacent marked messages become one region
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def regions_of(messages, rendered: str, prompt_token_ids, tokenizer) -> list[list[int]]:
    """The marked regions, in offsets of `prompt_token_ids`, that `rendered` was tokenized into."""
    char_ranges = marked_characters(messages, rendered)
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    prompt = list(prompt_token_ids)
    shift = len(prompt) - len(ids)  # special tokens the renderer added in front (a BOS)
    if shift < 0 or prompt[shift:] != ids:
        raise MarkedMessageError("the rendered chat prompt does not tokenize back to the prompt's tokens, so marked "
                                 "messages cannot be placed; send regions as token offsets instead")
    return token_regions(char_ranges, offsets, shift)


def marked_chat(tokenizer, messages, **template_kwargs) -> tuple[list[int], list[list[int]]]:
    """(prompt token ids, regions) for a conversation whose marked messages are to be compressed,
    offline: `LLM.generate({"prompt_token_ids": ids}, SamplingParams(extra_args={"sentinel":
    {"regions": regions}}))`."""
    rendered = tokenizer.apply_chat_template(strip_marks(messages), tokenize=False, add_generation_prompt=True, **template_kwargs)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return ids, regions_of(messages, rendered, ids, tokenizer)


def strip_marks(messages) -> list[Any]:
    return [{k: v for k, v in m.items() if k != MARK_KEY} if isinstance(m, dict) else m for m in messages]

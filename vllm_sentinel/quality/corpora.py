"""Evaluation windows from two corpora, every window inside one document.

- `docs`: the held-out documents of the training corpus (python3.11-doc's reStructuredText);
- `stdlib`: the running interpreter's own standard library `.py` sources (no tests, no
  site-packages): text the model never trained on, where code repeats distant identifiers.
Documents are taken in a fixed order and windows round-robin over them (the first window of every
long-enough document, then the second, ...), so the selection is the same on every machine.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

from ..training.corpus import Document, encode_documents, load_documents, split_documents

CORPORA = ("docs", "stdlib")
TEST_DIRS = {"test", "tests", "idle_test", "site-packages"}


def _stable_order(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The stdlib's `.py` files, tests and site-packages excluded, in a stable hashed order
    (spread over the library rather than alphabetical)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not (set(p.relative_to(root).parts[:-1]) & TEST_DIRS) and not p.name.startswith("test_")]
    return sorted(files, key=lambda p: _stable_order(str(p.relative_to(root))))


def round_robin_windows(per_doc: list[list[int]], length: int, max_windows: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `length` tokens, each inside one document, round-robin over them."""
    chunks = [[doc[i: i + length] for i in range(0, len(doc) - length + 1, length)] for doc in per_doc]
    picked, depth = [], 0
    while len(picked) < max_windows and any(depth < len(c) for c in chunks):
        picked += [c[depth] for c in chunks if depth < len(c)]
        depth += 1
    if not picked:
        raise ValueError(f"no document holds {length} tokens; use a shorter --window")
    return [torch.tensor(w, dtype=torch.long) for w in picked[:max_windows]]


def docs_windows(corpus: str, tokenizer, length: int, max_windows: int,
                 max_documents: int | None = None) -> list[torch.Tensor]:
    _, heldout = split_documents(load_documents(corpus)[:max_documents])
    heldout = sorted(heldout, key=lambda d: d.name)
    return round_robin_windows(encode_documents(heldout, tokenizer), length, max_windows)


def stdlib_windows(tokenizer, length: int, max_windows: int, root: str | Path | None = None) -> list[torch.Tensor]:
    """One window per file (its first `length` tokens, taken once every chosen file had one)."""
    per_doc = []
    for path in stdlib_files(root):
        text = path.read_text(errors="replace")
        if len(text) < length:  # fewer characters than tokens needed: cannot hold a window
            continue
        [ids] = encode_documents([Document(path.name, text)], tokenizer)
        if len(ids) >= length:
            per_doc.append(ids)
        if len(per_doc) >= max_windows:
            break
    return round_robin_windows(per_doc, length, max_windows)


def long_document_streams(corpus: str, tokenizer, min_tokens: int,
                          max_documents: int | None = None) -> tuple[list[int], list[int]]:
    """Train and held-out streams of the documents with at least `min_tokens` tokens each (EOS-ended),
    so that windows of that length mostly lie inside one document."""
    train, heldout = split_documents(load_documents(corpus)[:max_documents])

    def stream(docs):
        encoded = encode_documents(docs, tokenizer)
        long = [ids for ids in encoded if len(ids) >= min_tokens]
        return [t for ids in (long or encoded) for t in ids]

    return stream(train), stream(heldout)

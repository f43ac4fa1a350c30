"""The default training corpus: the reStructuredText sources of Debian's `python3.11-doc`.

Real English prose that installs from a distribution package, so nothing is downloaded at run
time. Split by document, deterministically, so held-out text is never trained on.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
SUFFIXES = (".rst.txt", ".rst", ".txt")

# Directive-only lines (`.. index::`, `.. versionadded:: 3.2`, `.. _label:`) and their indented
# option lines carry markup, not prose; dropping them keeps the model learning language.
_DIRECTIVE = re.compile(r"^\s*\.\. [\w:-]+::.*$|^\s*\.\. _[^:]+:\s*$|^\s+:[\w-]+:.*$")
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root
    text: str


def clean(text: str) -> str:
    kept = [line.rstrip() for line in text.splitlines() if not _DIRECTIVE.match(line)]
    return _BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip()


def load_documents(path: str | Path = DEFAULT_CORPUS) -> list[Document]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {path} not found; install it with `apt-get install python3.11-doc` "
            "(install.sh does) or pass --corpus with a text file or a directory of documents")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    root = path.parent if path.is_file() else path
    docs = [Document(str(f.relative_to(root)), clean(f.read_text(errors="replace"))) for f in files]
    docs = [d for d in docs if d.text]
    if not docs:
        raise FileNotFoundError(f"corpus {path} holds no non-empty {'/'.join(SUFFIXES)} documents")
    return docs


def _heldout_score(name: str) -> float:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def split_documents(docs: list[Document], heldout_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by a stable hash of each document's name: independent of order and run."""
    heldout = [d for d in docs if _heldout_score(d.name) < heldout_fraction]
    if not heldout and len(docs) >= 2:
        heldout = [min(docs, key=lambda d: _heldout_score(d.name))]
    held = {d.name for d in heldout}
    return [d for d in docs if d.name not in held], heldout


def encode_documents(docs: list[Document], tokenizer) -> list[list[int]]:
    """Token ids per document, each ended by EOS so a window that crosses documents sees the seam."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    return [ids + eos for ids in encoded]


def corpus_streams(path: str | Path, tokenizer, max_documents: int | None = None) -> tuple[list[int], list[int]]:
    """The train and held-out token streams of a corpus (documents concatenated)."""
    docs = load_documents(path)[:max_documents]
    train, heldout = split_documents(docs)
    flat = lambda per_doc: [t for doc in per_doc for t in doc]  # noqa: E731
    return flat(encode_documents(train, tokenizer)), flat(encode_documents(heldout, tokenizer))

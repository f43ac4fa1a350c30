"""Prefix caching over physical blocks: which compacted blocks two requests may share, and their hashes.

vLLM hashes a request's *logical* tokens block by block. A sentinel request's block i holds
physical slots [i * B, (i + 1) * B) of its layout (layout.py), and what those slots hold depends on
the schedule and on how many spans are compacted. So the sentinel KV manager hashes physical
blocks itself, with vLLM's hash function and chaining:

- A *final* block lies wholly below `base(k)`: sink tokens, compacted `<CR>`s and gaps, which no
  later step rewrites. Its content is fixed by the schedule and the real tokens up to the last one
  it stands for, whatever the request does next, so its hash is
  H(previous block's hash, those real tokens, schedule).
- A *tail* block reaches into the raw region, whose slots the next compaction rewrites (the
  `<CR>`, and with a window the moves). Its content is fixed by the schedule, the real tokens and
  the compaction count k (the layout's *version*), so its hash also carries k. For a window
  W > G no state is made of final blocks alone (the window's raw tokens attended to spans that
  the final blocks keep only as `<CR>`s, so they cannot be recomputed from them); tail blocks are
  what lets such schedules hit at all.

A hit is a state: n real tokens whose physical length p(n) ends on a block boundary, every block
below it cached. The request resumes at n. Final blocks are shared by reference (nobody writes
them again); tail blocks are *copied on write* at admission, through vLLM's own copy-on-write
path (`SingleTypeKVCacheManager._apply_cow`, run by the worker before the step's forward), because
the hitting request's next compaction rewrites them. The owner of a cached tail block drops its
hash before a step that compacts (it is about to rewrite it) and caches only what earlier steps
have already written, so a copy never reads a slot that the same step writes.

The schedule (or "off") is part of every hash: requests with different schedules, or with
compression off, never share a block.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Callable

from vllm.v1.core.kv_cache_utils import BlockHash, hash_block_tokens

from .layout import KVLayout


class PhysicalBlockHashes:
    """The hash chains of one request's physical blocks: final blocks (one chain) and, per layout
    version k, the tail blocks that continue it. Memoised: a waiting request is looked up at every
    scheduling pass, and a running one hashes each block once per version."""

    def __init__(self, layout: KVLayout, block_size: int, hash_fn: Callable[[Any], bytes],
                 token_ids, salt: tuple = ()):
        self.layout = layout
        self.block_size = block_size
        self.hash_fn = hash_fn
        self.token_ids = token_ids  # the request's growing list of real tokens, read, never copied whole
        self.key = layout.key  # the schedule, or "off", and a request's marked regions: in every hash
        self.salt = salt
        self.final: list[BlockHash] = []
        self.tails: dict[int, list[BlockHash]] = {}

    def _hash(self, parent: BlockHash | None, start: int, end: int, extra: tuple) -> BlockHash:
        first = () if parent is not None else self.salt
        return hash_block_tokens(self.hash_fn, parent, self.token_ids[start:end], (*self.key, *extra, *first))

    def final_hash(self, i: int) -> BlockHash | None:
        """Hash of final block i, or None when the request does not have its tokens yet."""
        while len(self.final) <= i:
            j = len(self.final)
            end = self.layout.final_tokens((j + 1) * self.block_size)
            if end > len(self.token_ids):
                return None
            start = self.layout.final_tokens(j * self.block_size)
            self.final.append(self._hash(self.final[-1] if j else None, start, end, ()))
        return self.final[i]

    def first_tail_block(self, version: int) -> int:
        """Index of the first block that holds a raw slot in a state with `version` compactions."""
        if not self.layout.compresses:
            return 1 << 62
        return self.layout.base(version) // self.block_size

    def tail_hash(self, i: int, version: int) -> BlockHash | None:
        """Hash of block i (>= first_tail_block(version)) in a state with `version` compactions."""
        first = self.first_tail_block(version)
        chain = self.tails.setdefault(version, [])
        while len(chain) <= i - first:
            j = first + len(chain)
            end = self.layout.tokens_in_slots((j + 1) * self.block_size, version)
            if end > len(self.token_ids):
                return None
            parent = chain[-1] if chain else (self.final_hash(j - 1) if j else None)
            start = self.layout.tokens_in_slots(j * self.block_size, version)
            chain.append(self._hash(parent, start, end, (version,)))
        return chain[i - first]

    def partial_hash(self, n: int) -> tuple[int, BlockHash] | None:
        """(index, hash) of the partly filled last block of the state after `n` tokens, when that
        block is a tail block: cached too, so a hit can end exactly where a request stopped (the
        last turn of a conversation), the hitting request copying that block like the tail."""
        layout, size = self.layout, self.block_size
        p, version = layout.physical_len(n), layout.num_closed(n)
        if not layout.compresses or p % size == 0 or p <= layout.base(version) or n > len(self.token_ids):
            return None
        i = p // size
        parent = self.tail_hash(i - 1, version) if i > self.first_tail_block(version) else \
            (self.final_hash(i - 1) if i else None)
        if i and parent is None:
            return None
        return i, self._hash(parent, layout.tokens_in_slots(i * size, version), n, (version, "partial"))

    def num_full_blocks(self, n: int) -> int:
        return self.layout.physical_len(n) // self.block_size

    def state_hashes(self, n: int, first: int = 0) -> list[BlockHash]:
        """Hashes of the full blocks of the state after `n` real tokens, from block `first` on (a
        decode step asks for the blocks it has not cached yet, not the whole list again)."""
        layout = self.layout
        full = self.num_full_blocks(n)
        version = layout.num_closed(n)
        first_tail = min(self.first_tail_block(version), full)
        hashes = [self.final_hash(i) for i in range(first, first_tail)]
        hashes += [self.tail_hash(i, version) for i in range(max(first, first_tail), full)]
        return hashes

    def forget_tails_before(self, version: int) -> None:
        """A running request never asks again for the tails of versions it has left."""
        if self.tails and min(self.tails) < version:  # asked every step; a version is left every L + G tokens
            for old in [v for v in self.tails if v < version]:
                del self.tails[old]


def longest_hit(hashes: PhysicalBlockHashes, max_tokens: int, lookup, partial_states=None) -> tuple[int, list]:
    """The largest state n <= max_tokens whose blocks are all cached: (n, those blocks).

    `lookup(hash)` returns the cached block (or blocks) for a hash, or None. States are tried per
    version k, newest first: final blocks below base(k) (shared by every version), then k's tail
    blocks; a version whose states all end at or before the best hit so far is not tried.
    `partial_states`: sorted real-token counts at which partial entries were cached (None: probe
    every count, which hashes up to a block's worth of prefixes per version).
    """
    layout, size = hashes.layout, hashes.block_size
    final_hits = []
    while True:
        i = len(final_hits)
        h = hashes.final_hash(i)
        if h is None or layout.final_tokens((i + 1) * size) > max_tokens:
            break
        block = lookup(h)
        if block is None:
            break
        final_hits.append(block)
    best, blocks = 0, []
    # States made of final blocks only: n = final_tokens(h * B), if the layout ever stands there.
    for count in range(len(final_hits), 0, -1):
        n = layout.final_tokens(count * size)
        if layout.physical_len(n) == count * size and layout.final_len(n) == count * size:
            best, blocks = n, final_hits[:count]
            break
    if not layout.compresses:
        return best, blocks
    for version in range(layout.num_closed(max_tokens), -1, -1):
        last = layout.close_token(version)  # states of this version have n <= c_k
        if last <= best:
            break
        first = hashes.first_tail_block(version)
        if first > len(final_hits):
            continue
        earliest = layout.close_token(version - 1) + 1 if version else 0
        tail = []
        for i in range(first, 1 << 62):
            end = layout.tokens_in_slots((i + 1) * size, version)
            if end > min(max_tokens, last):
                break
            h = hashes.tail_hash(i, version)
            block = lookup(h) if h is not None else None
            if block is None:
                break
            tail.append(block)
            if end >= earliest and end > best:
                best, blocks = end, final_hits[:first] + tail
        # Then a state ending inside the next block, latest first.
        i = first + len(tail)
        top = min(max_tokens, last, layout.tokens_in_slots((i + 1) * size, version) - 1)
        low = max(layout.tokens_in_slots(i * size, version), earliest - 1, best)
        if partial_states is None:
            candidates = range(top, low, -1)
        else:
            candidates = reversed(partial_states[bisect_right(partial_states, low): bisect_right(partial_states, top)])
        for n in candidates:
            partial = hashes.partial_hash(n)
            block = lookup(partial[1]) if partial is not None else None
            if block is not None:
                best, blocks = n, final_hits[:first] + tail + [block]
                break
    return best, blocks


def first_copied_block(layout: KVLayout, n: int, block_size: int) -> int:
    """Blocks of a hit at state n from this index on are rewritten by the next compaction, so the
    hitting request gets its own copies (copy on write); those before are shared."""
    p = layout.physical_len(n)
    if not layout.compresses or p <= layout.base(layout.num_closed(n)):
        return p // block_size
    return layout.base(layout.num_closed(n)) // block_size

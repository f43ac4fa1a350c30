"""Recall documents: real prose with facts stated once and asked for later, at known distances.

A window of W recent tokens answers a fact older than W at chance, by construction; a learned
`<CR>` can carry it. So these documents measure what lies beyond the window (passkey retrieval,
multi-query associative recall), on the corpus's own prose, never a repeated filler sentence:
- `passkey`: "The pass key is 40917." once, somewhere in the prose; at the end the same words
  ask for it: "The pass key is" -> " 40917";
- `multi`: `facts` sentences "The code for WORD is DIGITS." spread through the prose (distinct
  words), then `queries` of them asked in shuffled order, each followed by its answer, so one
  document scores several distances.
Values are `digits` random decimal digits (4: exact-match chance 1e-4). Facts stand at word
boundaries of the prose (before a token that opens a word or a line) and never in its first
`SINK_CLEAR` tokens, which sink-keeping methods hold raw; their places are uniform over the rest, so
distances spread evenly from 0 to the document's length. Everything is drawn from a seeded
generator: the same seed gives the same documents on every machine.

A query's `distance` is how far back its fact begins: from the token that predicts the first
answer token to the fact's first token. A method whose query sees its last K tokens sees the whole
fact when distance < K, and none of it once distance - (fact length - 1) >= K.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("passkey", "multi")
SINK_CLEAR = 16
# Words for the multi-fact codes: common, short, one or two tokens each, none a Python keyword.
WORDS = ("apple", "river", "garden", "window", "candle", "mirror", "pencil", "basket", "ladder", "anchor",
         "bridge", "castle", "desert", "forest", "harbor", "island", "jungle", "kettle", "lantern", "meadow",
         "needle", "orchard", "palace", "rabbit", "saddle", "temple", "valley", "wagon", "violin", "tunnel",
         "statue", "rocket", "planet", "onion", "marble", "lemon", "helmet", "glove", "feather", "engine",
         "dragon", "cookie", "button", "blanket", "barrel", "tiger", "spider", "shadow", "pepper", "ocean",
         "monkey", "magnet", "hammer", "guitar", "falcon", "donkey", "cotton", "carpet", "bottle", "banana")


@dataclass(frozen=True)
class RecallConfig:
    length: int = 1024          # tokens per document (facts, prose and queries together)
    digits: int = 4             # digits per value: exact-match chance 10^-4
    facts: int = 8              # multi: facts stated
    queries: int = 4            # multi: facts asked (a random subset, shuffled)
    passkey_share: float = 0.25  # of recall documents drawn for training (a passkey document asks one query)


@dataclass(frozen=True)
class Query:
    kind: str
    fact_start: int    # the fact sentence's first token
    core_start: int    # its key's first token (" WORD" or " pass"): from here to the value is what must be kept
    fact_end: int      # one past its last token
    answer_start: int  # the answer's first token (its value, with the space before it)
    answer_end: int

    @property
    def distance(self) -> int:
        return self.answer_start - 1 - self.fact_start

    @property
    def fact_len(self) -> int:
        return self.fact_end - self.fact_start


@dataclass
class RecallDocument:
    ids: torch.Tensor            # [length]
    kind: str
    queries: list[Query] = field(default_factory=list)
    questions_start: int = 0     # where the queries begin: before it the prose with its facts (the "documents")


class RecallGenerator:
    """Recall documents over a prose token stream (train or held-out), for one tokenizer."""

    def __init__(self, prose_ids, tokenizer, cfg: RecallConfig = RecallConfig()):
        self.prose = torch.as_tensor(prose_ids, dtype=torch.long)
        self.tokenizer, self.cfg = tokenizer, cfg
        words = [token for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
        # Word boundaries of byte-level BPE: tokens that begin with a space (Ġ) or a newline (Ċ).
        self.opens_word = torch.tensor([bool(w) and w[0] in "ĠĊ" for w in words] + [False], dtype=torch.bool)
        if self.prose.numel() <= cfg.length:
            raise ValueError(f"the prose stream has {self.prose.numel()} tokens; recall documents of {cfg.length} "
                             "tokens need more")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _value(self, generator: torch.Generator) -> str:
        return "".join(str(d) for d in torch.randint(0, 10, (self.cfg.digits,), generator=generator).tolist())

    def _sentence(self, lead: str, key: str, value: str) -> tuple[list[int], int, list[int]]:
        """(tokens of " LEAD KEY is", where KEY begins in them, tokens of " VALUE.") for one fact.

        Encoded in word-aligned parts (byte-level BPE never merges across a space), so the answer's
        tokens are exactly those of " VALUE" and the key's are those of " KEY is"."""
        lead_ids = self._encode(f" {lead}")
        return lead_ids + self._encode(f" {key} is"), len(lead_ids), self._encode(f" {value}") + self._encode(".")

    def document(self, kind: str, generator: torch.Generator) -> RecallDocument:
        cfg = self.cfg
        if kind == "passkey":
            leads, keys = ["The"], ["pass key"]
            asked = [0]
        elif kind == "multi":
            order = torch.randperm(len(WORDS), generator=generator)[: cfg.facts].tolist()
            leads, keys = ["The code for"] * cfg.facts, [WORDS[i] for i in order]
            asked = torch.randperm(cfg.facts, generator=generator)[: cfg.queries].tolist()
        else:
            raise ValueError(f"unknown recall kind {kind!r}; choose one of {KINDS}")
        values = [self._value(generator) for _ in keys]
        sentences = [self._sentence(lead, k, v) for lead, k, v in zip(leads, keys, values)]
        answer_lens = [len(self._encode(f" {v}")) for v in values]  # the value's tokens, without the full stop
        fact_lens = [len(h) + len(t) for h, _, t in sentences]
        query_len = sum(fact_lens[i] for i in asked)
        prose_len = cfg.length - sum(fact_lens) - query_len
        if prose_len <= SINK_CLEAR + len(keys):
            raise ValueError(f"recall documents of {cfg.length} tokens cannot hold {len(keys)} facts and "
                             f"{len(asked)} queries; use longer documents or fewer facts")
        start = int(torch.randint(0, self.prose.numel() - prose_len, (1,), generator=generator))
        prose = self.prose[start: start + prose_len]
        # Places: word boundaries after the sink-clear prefix, drawn without replacement, in order.
        boundary = self.opens_word[prose.clamp(max=len(self.opens_word) - 1)].clone()
        boundary[:SINK_CLEAR] = False
        candidates = boundary.nonzero().squeeze(1)
        if candidates.numel() < len(keys):
            candidates = torch.arange(SINK_CLEAR, prose_len)
        places = candidates[torch.randperm(candidates.numel(), generator=generator)[: len(keys)]].sort().values.tolist()
        # Facts in the prose in a random order of keys (so which key comes first carries no information).
        fact_order = torch.randperm(len(keys), generator=generator).tolist()
        pieces, fact_start = [], {}
        cursor, offset = 0, 0
        for place, which in zip(places, fact_order):
            pieces.append(prose[cursor:place])
            offset += place - cursor
            head, _, tail = sentences[which]
            fact_start[which] = offset
            pieces.append(torch.tensor(head + tail))
            offset += len(head) + len(tail)
            cursor = place
        pieces.append(prose[cursor:])
        offset += prose_len - cursor
        queries, questions_start = [], offset
        for which in asked:
            head, key_at, tail = sentences[which]
            answer_start = offset + len(head)
            queries.append(Query(kind, fact_start[which], fact_start[which] + key_at,
                                 fact_start[which] + fact_lens[which], answer_start, answer_start + answer_lens[which]))
            pieces.append(torch.tensor(head + tail))
            offset += len(head) + len(tail)
        ids = torch.cat(pieces)
        assert ids.numel() == cfg.length
        return RecallDocument(ids, kind, queries, questions_start)

    def draw(self, generator: torch.Generator) -> RecallDocument:
        kind = "passkey" if float(torch.rand((), generator=generator)) < self.cfg.passkey_share else "multi"
        return self.document(kind, generator)

    def evaluation_set(self, count: int, seed: int) -> list[RecallDocument]:
        """`count` documents of each kind, the same for a given seed."""
        generator = torch.Generator().manual_seed(seed)
        return [self.document(kind, generator) for kind in KINDS for _ in range(count)]


def draw_windows(prose: torch.Tensor, length: int, count: int, generator: torch.Generator,
                 recall: RecallGenerator | None = None, share: float = 0.0) -> list[torch.Tensor]:
    """`count` training windows of `length` tokens: random windows of the prose stream, each one
    replaced by a recall document with probability `share`.

    With `share` 0 the generator is used exactly as plain window sampling uses it (one draw of the
    starts), so models trained without recall documents are unchanged by their existence."""
    starts = torch.randint(0, prose.numel() - length, (count,), generator=generator)
    windows = [prose[s: s + length] for s in starts.tolist()]
    if share > 0:
        if recall is None:
            raise ValueError("a recall share needs a RecallGenerator")
        if recall.cfg.length != length:
            raise ValueError(f"recall documents have {recall.cfg.length} tokens; training windows have {length}")
        replaced = (torch.rand(count, generator=generator) < share).tolist()
        windows = [recall.draw(generator).ids if r else w for w, r in zip(windows, replaced)]
    return windows

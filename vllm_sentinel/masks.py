"""The stream with sentinels, its positions, its attention mask and its training labels.

This module is the executable form of the semantics page (shared/design/sentinel-semantics.md).
Everything is vectorised over the stream: no Python loop over T x T.

For real ids `x_0..x_{n-1}` and complete spans `[start, end)`, the stream writes each span as
`<CL> x_start .. x_{end-1} <CR>`. Rules, for query q and key k (k <= q in stream order):
- real q sees real k unless k's span is closed (its <CR> stands before q), and sees every <CR>;
- <CL> sees only itself;
- <CR> sees its own <CL>, its span's tokens and itself.
Positions: real x_t -> t, <CL> -> start - 1 (0 when start = 0), <CR> -> end - 1.

With a recent window W > 0 only the real queries' rule changes: real x_t sees the real tokens of
a closed span ending at x_j raw while t - j <= W, and its <CR> once t - j > W (never both).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import as_spans

REAL, CL, CR = 0, 1, 2
IGNORE_INDEX = -100
NO_SPAN_END = torch.iinfo(torch.long).max  # `span_last` of tokens outside every span


@dataclass
class SentinelStream:
    input_ids: torch.Tensor     # [T] real ids with sentinel ids inserted
    position_ids: torch.Tensor  # [T] logical positions (sentinels do not shift real tokens)
    kinds: torch.Tensor         # [T] REAL / CL / CR
    real_index: torch.Tensor    # [T] index t of the real token, -1 for sentinels
    span_index: torch.Tensor    # [T] span the token belongs to (its <CL>/<CR> too), -1 outside spans
    close_pos: torch.Tensor     # [T] stream position of the closing <CR> of the token's span, T if none
    labels: torch.Tensor        # [T] next real token for real tokens, IGNORE_INDEX elsewhere
    mask: torch.Tensor          # [T, T] bool, True = query (row) may attend to key (column)

    @property
    def real_positions(self) -> torch.Tensor:
        """Stream positions of the real tokens, in real order."""
        return (self.kinds == REAL).nonzero().squeeze(1)

    def __len__(self) -> int:
        return self.input_ids.numel()


def build_stream(real_ids: list[int] | torch.Tensor, spans, cl_id: int, cr_id: int, window: int = 0) -> SentinelStream:
    """Insert `<CL>`/`<CR>` around each complete span and derive positions, mask and labels.

    `window` is the recent window W of the semantics page (0: the paper's rule)."""
    window = _check_window(window)
    real_ids = torch.as_tensor(real_ids, dtype=torch.long).reshape(-1)
    n = real_ids.numel()
    spans = as_spans(spans)
    if spans.numel() and int(spans[-1, 1]) > n:
        raise ValueError(f"span {spans[-1].tolist()} runs past the {n} real tokens")
    starts, ends = spans[:, 0].contiguous(), spans[:, 1].contiguous()
    num_spans = starts.numel()
    total = n + 2 * num_spans

    span_no = torch.arange(num_spans)
    cl_pos = starts + 2 * span_no
    cr_pos = ends + 2 * span_no + 1
    t = torch.arange(n)
    # Sentinels in front of x_t: the <CL> of every span starting at or before t, the <CR> of every span ending at or before t.
    real_pos = t + torch.searchsorted(starts, t, right=True) + torch.searchsorted(ends, t, right=True)

    input_ids = torch.empty(total, dtype=torch.long)
    kinds = torch.full((total,), REAL, dtype=torch.long)
    position_ids = torch.empty(total, dtype=torch.long)
    real_index = torch.full((total,), -1, dtype=torch.long)
    span_index = torch.full((total,), -1, dtype=torch.long)
    close_pos = torch.full((total,), total, dtype=torch.long)
    labels = torch.full((total,), IGNORE_INDEX, dtype=torch.long)

    input_ids[real_pos] = real_ids
    position_ids[real_pos] = t
    real_index[real_pos] = t
    labels[real_pos[:-1]] = real_ids[1:]

    own_span = torch.searchsorted(starts, t, right=True) - 1
    in_span = (own_span >= 0) & (t < ends[own_span.clamp(min=0)] if num_spans else torch.zeros(n, dtype=torch.bool))
    span_index[real_pos[in_span]] = own_span[in_span]
    close_pos[real_pos[in_span]] = cr_pos[own_span[in_span]]

    input_ids[cl_pos], input_ids[cr_pos] = cl_id, cr_id
    kinds[cl_pos], kinds[cr_pos] = CL, CR
    position_ids[cl_pos] = (starts - 1).clamp(min=0)
    position_ids[cr_pos] = ends - 1
    span_index[cl_pos], span_index[cr_pos] = span_no, span_no
    close_pos[cl_pos], close_pos[cr_pos] = cr_pos, cr_pos

    if window:
        # Real index of each span's last token, for its tokens, its <CL> and its <CR>.
        span_last = torch.full((total,), NO_SPAN_END, dtype=torch.long)
        has_span = span_index >= 0
        span_last[has_span] = (ends - 1)[span_index[has_span]]
        mask = attention_mask(kinds, span_index, close_pos, window=window, real_index=real_index,
                              span_last=span_last)
    else:
        mask = attention_mask(kinds, span_index, close_pos)
    return SentinelStream(input_ids, position_ids, kinds, real_index, span_index, close_pos, labels, mask)


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an integer >= 0, got {window!r}")
    return window


def attention_mask(kinds: torch.Tensor, span_index: torch.Tensor, close_pos: torch.Tensor,
                   first_query: int = 0, *, window: int = 0, real_index: torch.Tensor | None = None,
                   span_last: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """`[T - first_query, T]` bool visibility of the semantics page, from per-token kind, span and
    close position; rows are the queries from `first_query` on (the engine asks only for a chunk's
    rows against its cached prefix), columns the `keys` given (default: all T; the engine evaluates
    only the keys a piece can see).

    With `window` W > 0 two more per-token tensors are needed: `real_index` (t of a real token x_t;
    anything for sentinels) and `span_last` (real index j of the last token of the token's span,
    for its real tokens and its `<CR>`; `NO_SPAN_END` or any value >= every real index outside
    spans). A real query x_t then sees a closed span's real tokens while t - j <= W and its `<CR>`
    once t - j > W; `close_pos` is not used for real queries. W = 0 gives the paper's mask, and is
    computed exactly as before (so `real_index`/`span_last` are not needed)."""
    window = _check_window(window)
    total = kinds.numel()
    query = torch.arange(first_query, total).unsqueeze(1)
    key = (torch.arange(total) if keys is None else keys).unsqueeze(0)
    causal = key <= query
    if window:
        if real_index is None or span_last is None:
            raise ValueError("attention_mask with window > 0 needs real_index and span_last")
        # x_t sees x_k raw iff t <= j + W, and the <CR> of the span ending at x_j iff t > j + W.
        # (Inside a still-open span t <= j, so its own tokens stay visible and its <CR> is not yet.)
        t = real_index[first_query:].unsqueeze(1)
        last = span_last.unsqueeze(0)
        in_window = t <= last.clamp(max=NO_SPAN_END - window) + window
        real_sees = ((kinds[key] == REAL) & in_window) | ((kinds[key] == CR) & ~in_window)
    else:
        real_sees = (kinds[key] == CR) | ((kinds[key] == REAL) & (close_pos[key] > query))
    cr_sees = (span_index[key] == span_index[query]) & (span_index[query] >= 0)
    rule = torch.where(kinds[query] == REAL, real_sees, torch.where(kinds[query] == CL, key == query, cr_sees))
    return causal & rule


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool visibility -> 0 / most-negative float, the 4-D form that eager and SDPA attention add."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(mask, zero, torch.finfo(dtype).min)


# -- the paper's baselines at a matched KV budget --------------------------------------------------
# Both run on the plain real-token sequence (no sentinels). Each real query sees exactly as many
# keys as it would under sentinel compression with the same spans: the comparison isolates *what*
# is kept, not how much.

def sentinel_kv_budget(num_tokens: int, spans, window: int = 0) -> torch.Tensor:
    """`[n]` number of keys each real token attends to under sentinel compression (with recent
    window `window`)."""
    stream = build_stream(torch.zeros(num_tokens, dtype=torch.long), spans, 0, 0, window=window)
    real = stream.real_positions
    return stream.mask[real].sum(dim=1)


def local_attention_mask(num_tokens: int, spans, window: int = 0) -> torch.Tensor:
    """`[n, n]` bool: each token sees the most recent `budget` tokens (itself included)."""
    budget = sentinel_kv_budget(num_tokens, spans, window)
    query = torch.arange(num_tokens).unsqueeze(1)
    key = torch.arange(num_tokens).unsqueeze(0)
    return (key <= query) & (key > query - budget.unsqueeze(1))


def scattered_attention_mask(num_tokens: int, spans, generator: torch.Generator | None = None,
                             window: int = 0) -> torch.Tensor:
    """`[n, n]` bool: once a span closes, one random token of it stays visible instead of a <CR>.

    The kept token of each span is drawn once, so the keep mask is shared by all queries: eviction
    at random rather than into a learned summary. With a recent window W the span stays whole for
    the W real tokens after its end, as it does under sentinel compression.
    """
    spans = as_spans(spans)
    stream = build_stream(torch.zeros(num_tokens, dtype=torch.long), spans, 0, 0, window=window)
    real = stream.real_positions
    visible = stream.mask[real][:, real]  # what sentinel attention leaves of the real tokens
    if spans.numel():
        lengths = spans[:, 1] - spans[:, 0]
        keep = spans[:, 0] + (torch.rand(lengths.numel(), generator=generator) * lengths).long()
        closed_at = spans[:, 1] + window  # real tokens at or after `end + W` see the span as compressed
        query = torch.arange(num_tokens).unsqueeze(1)
        visible[:, keep] |= query >= closed_at.unsqueeze(0)
    return visible


def sink_window_attention_mask(num_tokens: int, spans, window: int = 0, sink: int | None = None) -> torch.Tensor:
    """`[n, n]` bool, StreamingLLM's rule at the sentinel KV budget: each token sees the first `sink`
    tokens (default: where the first span starts, the sentinel schedule's sink) and the most recent
    `budget - sink` (itself included), `budget` being its key count under sentinel compression."""
    spans = as_spans(spans)
    if sink is None:
        sink = int(spans[0, 0]) if spans.numel() else 0
    budget = sentinel_kv_budget(num_tokens, spans, window).unsqueeze(1)
    query = torch.arange(num_tokens).unsqueeze(1)
    key = torch.arange(num_tokens).unsqueeze(0)
    kept_sink = torch.clamp(budget, max=sink)  # never more sink keys than the budget itself
    return (key <= query) & ((key < kept_sink) | (key > query - (budget - kept_sink)))

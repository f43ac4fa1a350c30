"""The mask, positions and labels against the semantics page, and the span sources."""
import pytest
import torch

from conftest import SCHEDULES
from vllm_sentinel.config import ScheduleConfig
from vllm_sentinel.masks import (CL, CR, IGNORE_INDEX, REAL, build_stream, local_attention_mask,
                                 scattered_attention_mask, sentinel_kv_budget)
from vllm_sentinel.schedule import JitteredSpans, RandomSpans, ScheduledSpans, as_spans

# The toy table of shared/design/sentinel-semantics.md, verbatim: x1..x10, spans x3..x5 and x8..x9.
TOY_TABLE = """
1 . . . . . . . . . . . . .
1 1 . . . . . . . . . . . .
. . 1 . . . . . . . . . . .
1 1 . 1 . . . . . . . . . .
1 1 . 1 1 . . . . . . . . .
1 1 . 1 1 1 . . . . . . . .
. . 1 1 1 1 1 . . . . . . .
1 1 . . . . 1 1 . . . . . .
1 1 . . . . 1 1 1 . . . . .
. . . . . . . . . 1 . . . .
1 1 . . . . 1 1 1 . 1 . . .
1 1 . . . . 1 1 1 . 1 1 . .
. . . . . . . . . 1 1 1 1 .
1 1 . . . . 1 1 1 . . . 1 1
"""
TOY_POSITIONS = [0, 1, 1, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9]
CL_ID, CR_ID = 98, 99


@pytest.fixture
def toy():
    return build_stream(list(range(1, 11)), [(2, 5), (7, 9)], CL_ID, CR_ID)


def test_mask_equals_the_toy_table_entry_by_entry(toy):
    expected = torch.tensor([[c == "1" for c in row.split()] for row in TOY_TABLE.strip().splitlines()])
    assert toy.mask.shape == expected.shape == (14, 14)
    mismatches = (toy.mask != expected).nonzero().tolist()
    assert mismatches == []


def test_stream_positions_and_labels(toy):
    assert toy.input_ids.tolist() == [1, 2, CL_ID, 3, 4, 5, CR_ID, 6, 7, CL_ID, 8, 9, CR_ID, 10]
    assert toy.position_ids.tolist() == TOY_POSITIONS
    # Real tokens predict the next *real* token across sentinels (x2 -> x3, x5 -> x6); sentinels and
    # the last token are never targets.
    assert toy.labels.tolist() == [2, 3, IGNORE_INDEX, 4, 5, 6, IGNORE_INDEX, 7, 8, IGNORE_INDEX,
                                   9, 10, IGNORE_INDEX, IGNORE_INDEX]
    assert toy.kinds.tolist().count(CL) == toy.kinds.tolist().count(CR) == 2


def naive_mask(kinds, span_index, close_pos):
    """The semantics page's rules, written as plainly as possible (O(T^2) Python)."""
    total = len(kinds)
    out = torch.zeros(total, total, dtype=torch.bool)
    for q in range(total):
        for k in range(q + 1):
            if kinds[q] == CL:
                out[q, k] = k == q
            elif kinds[q] == CR:
                out[q, k] = span_index[k] == span_index[q]
            else:
                out[q, k] = kinds[k] == CR or (kinds[k] == REAL and close_pos[k] > q)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_mask_matches_the_plain_rules(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 80, (1,), generator=g))
    spans = RandomSpans(0.5, 2, 9, sink=int(torch.randint(0, 4, (1,), generator=g)), seed=seed).spans(n)
    s = build_stream(torch.randint(0, 50, (n,), generator=g), spans, CL_ID, CR_ID)
    assert torch.equal(s.mask, naive_mask(s.kinds.tolist(), s.span_index.tolist(), s.close_pos.tolist()))
    # Positions: real x_t at t; <CL> at start - 1 (0 for a span at 0); <CR> at the span's last token.
    for (start, end), cl, cr in zip(spans.tolist(), (s.kinds == CL).nonzero().flatten(), (s.kinds == CR).nonzero().flatten()):
        assert s.position_ids[cl] == max(start - 1, 0) and s.position_ids[cr] == end - 1
    assert s.position_ids[s.real_positions].tolist() == list(range(n))


def test_thousands_of_tokens_are_vectorised():
    schedule = ScheduleConfig(4, 16, 0)
    n = 4000
    s = build_stream(torch.zeros(n, dtype=torch.long), ScheduledSpans(schedule).spans(n), CL_ID, CR_ID)
    budget = s.mask[s.real_positions].sum(dim=1)
    # The last real token sees the sink, one <CR> per closed span and the open span.
    assert int(budget[-1]) <= schedule.ideal_kv_slots(n) + 1
    assert len(s) == n + 2 * ScheduledSpans(schedule).num_closed(n)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_scheduled_spans_follow_the_rule(schedule):
    rule = ScheduledSpans(ScheduleConfig(*schedule))
    sink, span, gap = schedule
    spans = rule.spans(300).tolist()
    assert spans[0] == [sink, sink + span]
    assert all(b[0] - a[1] == gap for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] <= 300 < spans[-1][1] + gap + span
    closers = [t for t in range(300) if rule.closing_span_start(t) is not None]
    assert closers == [end - 1 for _, end in spans]


def test_random_spans_reach_the_target_ratio():
    for ratio in (0.5, 0.75, 0.9):
        spans = RandomSpans(ratio, seed=1).spans(200_000)
        lengths = spans[:, 1] - spans[:, 0]
        assert int(lengths.min()) >= 2 and int(lengths.max()) <= 25
        achieved = float((lengths - 1).sum()) / 200_000
        assert achieved == pytest.approx(ratio, abs=0.03)
    with pytest.raises(ValueError, match="out of reach"):
        RandomSpans(0.99)


def test_jittered_spans_vary_around_the_schedule_and_are_valid():
    source = JitteredSpans(ScheduleConfig(4, 16, 2), jitter=0.25, seed=3)
    draws = [source.spans(500) for _ in range(5)]
    lengths = torch.cat([d[:, 1] - d[:, 0] for d in draws])
    assert int(lengths.min()) >= 12 and int(lengths.max()) <= 20 and len(set(lengths.tolist())) > 3
    for d in draws:
        as_spans(d)  # sorted, non-overlapping
    again = JitteredSpans(ScheduleConfig(4, 16, 2), jitter=0.25, seed=3)
    assert all(torch.equal(d, again.spans(500)) for d in draws)  # reproducible from the seed


def test_overlapping_spans_are_refused():
    with pytest.raises(ValueError, match="must not overlap"):
        build_stream(list(range(10)), [(0, 4), (3, 6)], CL_ID, CR_ID)
    with pytest.raises(ValueError, match="runs past"):
        build_stream(list(range(5)), [(2, 7)], CL_ID, CR_ID)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_baselines_match_the_sentinel_kv_budget(schedule):
    n = 200
    spans = ScheduledSpans(ScheduleConfig(*schedule)).spans(n)
    budget = sentinel_kv_budget(n, spans)
    local = local_attention_mask(n, spans)
    scattered = scattered_attention_mask(n, spans, torch.Generator().manual_seed(0))
    for mask in (local, scattered):
        assert torch.equal(mask.sum(dim=1), budget)
        assert not torch.triu(mask, diagonal=1).any()
        assert mask.diagonal().all()
    # Local attention is a contiguous recent window; scattered keeps one token of each closed span.
    assert all(local[q, q - int(budget[q]) + 1: q + 1].all() for q in range(n))
    if len(spans):
        start, end = spans[0].tolist()
        assert int(scattered[n - 1, start:end].sum()) == 1


# -- the recent window W ----------------------------------------------------------------------------
# The same toy stream (x1..x10; spans x3..x5 ending at real index 4, x8..x9 ending at 8), with W = 1:
# x6 still sees x3..x5 raw (6 - 5 = 1 <= W), x7 on sees <CR>; x10 sees x8, x9 raw, not their <CR>.
TOY_TABLE_W1 = """
1 . . . . . . . . . . . . .
1 1 . . . . . . . . . . . .
. . 1 . . . . . . . . . . .
1 1 . 1 . . . . . . . . . .
1 1 . 1 1 . . . . . . . . .
1 1 . 1 1 1 . . . . . . . .
. . 1 1 1 1 1 . . . . . . .
1 1 . 1 1 1 . 1 . . . . . .
1 1 . . . . 1 1 1 . . . . .
. . . . . . . . . 1 . . . .
1 1 . . . . 1 1 1 . 1 . . .
1 1 . . . . 1 1 1 . 1 1 . .
. . . . . . . . . 1 1 1 1 .
1 1 . . . . 1 1 1 . 1 1 . 1
"""
# W = 2: x7 sees x3..x5 raw too; x8 on sees their <CR>.
TOY_TABLE_W2 = """
1 . . . . . . . . . . . . .
1 1 . . . . . . . . . . . .
. . 1 . . . . . . . . . . .
1 1 . 1 . . . . . . . . . .
1 1 . 1 1 . . . . . . . . .
1 1 . 1 1 1 . . . . . . . .
. . 1 1 1 1 1 . . . . . . .
1 1 . 1 1 1 . 1 . . . . . .
1 1 . 1 1 1 . 1 1 . . . . .
. . . . . . . . . 1 . . . .
1 1 . . . . 1 1 1 . 1 . . .
1 1 . . . . 1 1 1 . 1 1 . .
. . . . . . . . . 1 1 1 1 .
1 1 . . . . 1 1 1 . 1 1 . 1
"""
# W = 5: x10 (real index 9, 9 - 4 = 5) still sees the first span raw: no real token sees a <CR>.
TOY_TABLE_W5 = """
1 . . . . . . . . . . . . .
1 1 . . . . . . . . . . . .
. . 1 . . . . . . . . . . .
1 1 . 1 . . . . . . . . . .
1 1 . 1 1 . . . . . . . . .
1 1 . 1 1 1 . . . . . . . .
. . 1 1 1 1 1 . . . . . . .
1 1 . 1 1 1 . 1 . . . . . .
1 1 . 1 1 1 . 1 1 . . . . .
. . . . . . . . . 1 . . . .
1 1 . 1 1 1 . 1 1 . 1 . . .
1 1 . 1 1 1 . 1 1 . 1 1 . .
. . . . . . . . . 1 1 1 1 .
1 1 . 1 1 1 . 1 1 . 1 1 . 1
"""


def table(text: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row.split()] for row in text.strip().splitlines()])


@pytest.mark.parametrize("window, expected", [(0, TOY_TABLE), (1, TOY_TABLE_W1), (2, TOY_TABLE_W2),
                                              (5, TOY_TABLE_W5), (50, TOY_TABLE_W5)])
def test_windowed_mask_equals_the_toy_tables_entry_by_entry(toy, window, expected):
    s = build_stream(list(range(1, 11)), [(2, 5), (7, 9)], CL_ID, CR_ID, window=window)
    assert (s.mask != table(expected)).nonzero().tolist() == []
    # Only visibility changes: ids, positions, labels and the per-token bookkeeping are the same.
    for name in ("input_ids", "position_ids", "kinds", "real_index", "span_index", "close_pos", "labels"):
        assert torch.equal(getattr(s, name), getattr(toy, name)), name


def paper_attention_mask(kinds, span_index, close_pos):
    """A frozen copy of the vectorised W = 0 mask as it was before the window existed."""
    total = kinds.numel()
    query = torch.arange(total).unsqueeze(1)
    key = torch.arange(total).unsqueeze(0)
    causal = key <= query
    real_sees = (kinds[key] == CR) | ((kinds[key] == REAL) & (close_pos[key] > query))
    cr_sees = (span_index[key] == span_index[query]) & (span_index[query] >= 0)
    rule = torch.where(kinds[query] == REAL, real_sees, torch.where(kinds[query] == CL, key == query, cr_sees))
    return causal & rule


def naive_windowed_mask(kinds, real_index, span_of, spans, window):
    """The "Recent window" rules of the semantics page, as plainly as possible (O(T^2) Python)."""
    total = len(kinds)
    out = torch.zeros(total, total, dtype=torch.bool)
    for q in range(total):
        for k in range(q + 1):
            if kinds[q] == CL:
                out[q, k] = k == q
            elif kinds[q] == CR:
                out[q, k] = span_of[k] == span_of[q]
            elif kinds[k] == CL:
                out[q, k] = False
            elif span_of[k] < 0:
                out[q, k] = True  # a real token outside every span (causal)
            else:
                last = spans[span_of[k]][1] - 1  # j: the span's last real token
                t = real_index[q]
                raw = t <= last + window         # inside the span itself, or within W after it
                out[q, k] = raw if kinds[k] == REAL else not raw
    return out


@pytest.mark.parametrize("seed", range(6))
def test_windowed_mask_matches_the_plain_rules_and_w0_is_unchanged(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 70, (1,), generator=g))
    spans = RandomSpans(0.5, 2, 9, sink=int(torch.randint(0, 4, (1,), generator=g)), seed=seed).spans(n)
    ids = torch.randint(0, 50, (n,), generator=g)
    paper = build_stream(ids, spans, CL_ID, CR_ID)
    assert torch.equal(paper.mask, paper_attention_mask(paper.kinds, paper.span_index, paper.close_pos))
    assert torch.equal(build_stream(ids, spans, CL_ID, CR_ID, window=0).mask, paper.mask)
    for window in (0, 1, 2, 3, 7, 13, 100):
        s = build_stream(ids, spans, CL_ID, CR_ID, window=window)
        expected = naive_windowed_mask(s.kinds.tolist(), s.real_index.tolist(), s.span_index.tolist(),
                                       spans.tolist(), window)
        assert torch.equal(s.mask, expected), window
        # A real token never sees both a span's raw tokens and its <CR>, and sees every earlier
        # closed span exactly one way.
        real = s.real_positions
        for m, cr in enumerate((s.kinds == CR).nonzero().flatten().tolist()):
            span_real = ((s.span_index == m) & (s.kinds == REAL)).nonzero().flatten()
            after = real[real > cr]
            raw = s.mask[after][:, span_real]
            assert (raw.all(dim=1) ^ s.mask[after, cr]).all()
            assert (raw.all(dim=1) | ~raw.any(dim=1)).all()


def test_window_zero_is_bit_identical_on_long_scheduled_streams():
    for schedule in SCHEDULES:
        n = 700
        spans = ScheduledSpans(ScheduleConfig(*schedule)).spans(n)
        s = build_stream(torch.zeros(n, dtype=torch.long), spans, CL_ID, CR_ID, window=0)
        assert torch.equal(s.mask, paper_attention_mask(s.kinds, s.span_index, s.close_pos))


def test_bad_windows_are_refused():
    for window in (-1, True, 1.5):
        with pytest.raises(ValueError, match="window"):
            build_stream(list(range(10)), [(2, 5)], CL_ID, CR_ID, window=window)


@pytest.mark.parametrize("window", [1, 7, 32])
def test_windowed_kv_budget_stays_near_the_ideal(window):
    schedule = ScheduleConfig(4, 16, 0, window)
    n = 4000
    spans = ScheduledSpans(schedule).spans(n)
    s = build_stream(torch.zeros(n, dtype=torch.long), spans, CL_ID, CR_ID, window=window)
    budget = s.mask[s.real_positions].sum(dim=1)
    assert torch.equal(budget, sentinel_kv_budget(n, spans, window))
    assert int(budget[-1]) <= schedule.ideal_kv_slots(n) + 1
    # More recent tokens kept raw than without the window, by at most W + one span's worth.
    paper = sentinel_kv_budget(n, spans)
    assert (budget >= paper).all() and int((budget - paper).max()) <= window + 16


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("window", [1, 5, 40])
def test_baselines_match_the_windowed_kv_budget(schedule, window):
    n = 200
    spans = ScheduledSpans(ScheduleConfig(*schedule)).spans(n)
    budget = sentinel_kv_budget(n, spans, window)
    local = local_attention_mask(n, spans, window)
    scattered = scattered_attention_mask(n, spans, torch.Generator().manual_seed(0), window)
    for mask in (local, scattered):
        assert torch.equal(mask.sum(dim=1), budget)
        assert not torch.triu(mask, diagonal=1).any()
        assert mask.diagonal().all()
    if len(spans):
        start, end = spans[0].tolist()
        # Within W after the span all of it is visible; after that one kept token.
        if end - 1 + window < n:
            assert int(scattered[end - 1 + window, start:end].sum()) == end - start
        if end + window < n:
            assert int(scattered[end + window, start:end].sum()) == 1


def test_jittered_window_varies_and_w0_spans_are_unchanged():
    plain = JitteredSpans(ScheduleConfig(4, 16, 2), jitter=0.25, seed=3)
    windowed = JitteredSpans(ScheduleConfig(4, 16, 2, 20), jitter=0.25, seed=3)
    zero = JitteredSpans(ScheduleConfig(4, 16, 2), jitter=0.25, seed=3)
    windows = []
    for _ in range(30):
        spans, w = windowed.draw(500)
        spans0, w0 = zero.draw(500)
        assert torch.equal(spans, plain.spans(500)) and torch.equal(spans0, spans)  # the window draws last
        assert w0 == 0
        windows.append(w)
    assert min(windows) >= 15 and max(windows) <= 25 and len(set(windows)) > 3
    tiny = JitteredSpans(ScheduleConfig(4, 16, 2, 1), jitter=0.5, seed=0)
    assert {tiny.draw(100)[1] for _ in range(30)} <= {0, 1, 2}

"""The engine's physical KV layout and step plans, simulated against the semantics' dense stream.

No vLLM here: a dict stands in for the paged cache (slot -> stream index of the token whose KV
is stored there). Each chunk's plan must reproduce the stream, write only where the layout says,
and see exactly what the dense mask lets each token see.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import SCHEDULES
from vllm_sentinel.config import Regions, ScheduleConfig
from vllm_sentinel.engine.layout import KVLayout, cdiv
from vllm_sentinel.engine.plan import StepPlan, plan_chunk
from vllm_sentinel.masks import CL, CR, REAL, build_stream
from vllm_sentinel.schedule import ScheduledSpans

LAYOUTS = [ScheduleConfig(*s) for s in SCHEDULES] + [ScheduleConfig(0, 2, 0), ScheduleConfig(3, 5, 1)]



def assert_stable_prefix(chunk, seen):
    """The backend's split of the cached prefix: the stable part is seen whole by every real token
    and by no sentinel, and nothing this step writes or moves lies in it."""
    stable = chunk.stable_len
    real = torch.from_numpy(chunk.kinds == REAL)
    assert bool(seen[real, :stable].all()) and not bool(seen[~real, :stable].any())
    assert torch.equal(chunk.visibility(stable), seen[:, stable:])
    q = chunk.num_tokens  # one piece's rows at a time, as the backend asks, are the same rows
    a, b = q // 3, max(q // 3 + 1, 2 * q // 3)
    assert torch.equal(chunk.visibility(stable, rows=(a, b)), seen[a:b, stable: chunk.cached_len + b])
    if not chunk.is_plain:
        assert_folds_cover(chunk, seen[:, stable:])
    touched = np.concatenate([chunk.slots[chunk.slots >= 0], chunk.move_from, chunk.move_to])
    assert (touched >= stable).all()
    assert chunk.cached_len - stable <= chunk.layout.span + chunk.layout.window + chunk.layout.gap

def assert_folds_cover(chunk, seen):
    """The backend's folds of a compacting chunk's masked rows (`chunk_folds`: blocks of real rows
    against interval-selected keys, and each <CR> against its span, itself and its <CL>) attend
    every pair the dense visibility shows exactly once, and no other pair. Key-bank rows are
    numbered as the chunk's keys here (volatile tail, then its tokens); <CL>s from CL on."""
    from vllm_sentinel.engine.backend import BLOCK_ROWS, chunk_folds

    skip, cl = chunk.kernel_len, 10 ** 6
    cached = seen.shape[1] - chunk.num_tokens
    for block_rows in (3, BLOCK_ROWS):  # several blocks per chunk, and the engine's size
        assert_folds_cover_in_blocks(chunk, seen, chunk_folds(chunk, skip, 0, cached, 0, cl, block_rows), cl)


def assert_folds_cover_in_blocks(chunk, seen, folds, cl):
    skip = chunk.kernel_len
    count = torch.zeros(seen.shape, dtype=torch.long)
    for rows, keys, visible in zip(folds.rows, folds.keys, folds.visible):
        assert not visible[rows < 0].any() and not visible[:, keys < 0].any()
        for row, seen_keys in zip(rows[rows >= 0], visible[rows >= 0]):
            assert chunk.kinds[row] == REAL
            count[row, keys[seen_keys]] += 1
    crs = np.flatnonzero(chunk.kinds == CR)
    assert folds.cr_rows.tolist() == crs.tolist()
    assert folds.cr_keys[:, -1].tolist() == list(range(cl, cl + crs.size))  # each <CR>'s own <CL>
    for row, keys in zip(folds.cr_rows, folds.cr_keys[:, :-1]):
        count[row, keys] += 1
    count[:skip] = seen[:skip].long()  # the kernel's rows
    assert torch.equal(count, seen.long())


def stream_for(schedule: ScheduleConfig, n: int):
    return build_stream(torch.arange(n), ScheduledSpans(schedule).spans(n), cl_id=-1, cr_id=-2)


def stream_index(stream, chunk, i: int) -> int:
    """Stream position of the chunk's token i."""
    if chunk.kinds[i] == REAL:
        return int(stream.real_positions[chunk.real_index[i]])
    kind = CL if chunk.kinds[i] == CL else CR
    hits = ((stream.kinds == kind) & (stream.span_index == int(chunk.span_index[i]))).nonzero()
    return int(hits[0, 0])


def engine_order(stream) -> list[int]:
    """The stream as the engine computes it: without the <CL>s, which attend only to themselves and
    whose K/V are model constants the backend supplies to their <CR>."""
    return [pos for pos in range(len(stream)) if stream.kinds[pos] != CL]


def without_cl(stream, visible: set[int]) -> set[int]:
    return {pos for pos in visible if stream.kinds[pos] != CL}


def visible_next(stream, n: int) -> set[int]:
    """What real token n may attend to, itself excluded: what the cache must hold after n tokens."""
    query = int(stream.real_positions[n])
    return set(stream.mask[query].nonzero().squeeze(1).tolist()) - {query}


@pytest.mark.parametrize("schedule", LAYOUTS, ids=str)
def test_physical_len_is_the_next_tokens_visible_set(schedule):
    layout, n_max = KVLayout(schedule), 200
    stream = stream_for(schedule, n_max + 1)
    lengths = [layout.physical_len(n) for n in range(n_max + 1)]
    assert lengths == [len(visible_next(stream, n)) for n in range(n_max + 1)]
    # k(n) of an int takes plain arithmetic, of an array numpy: the two agree
    assert layout.num_closed(np.arange(n_max + 1)).tolist() == [layout.num_closed(n) for n in range(n_max + 1)]
    assert [layout.peak_physical_len(n) for n in range(n_max + 1)] == list(np.maximum.accumulate(lengths))
    steady = [schedule.sink + (n - schedule.sink) * (schedule.gap + 1) / (schedule.span + schedule.gap)
              + schedule.span for n in range(n_max + 1)]
    assert all(p <= s + 1 for p, s in zip(lengths, steady))  # the semantics page's steady-state size


def assert_kernel_rows_see_the_uncompacted_cache(layout, chunk, seen, block_size: int) -> None:
    """The chunk's tokens before its first <CR> see every cached slot and the chunk causally: what
    the wrapped kernel computes when they are stored after p(c) and the compaction waits. The
    step's allocation holds those slots, and the request's block bound covers it."""
    c, k, cached, first = chunk.computed, chunk.num_real, chunk.cached_len, chunk.kernel_len
    assert (chunk.kinds[:first] == REAL).all() and (first == chunk.num_tokens) == chunk.is_plain
    assert bool(seen[:first, :cached].all())
    assert torch.equal(seen[:first, cached: cached + first], torch.ones(first, first).tril().bool())
    assert not seen[:first, cached + first:].any()
    step = layout.step_len(c, c + k)
    assert step >= max(cached + first, layout.physical_len(c + k))
    if chunk.is_plain:
        assert step == layout.physical_len(c + k)
    assert cdiv(max(cached, step), block_size) <= layout.max_blocks(c + k, block_size)
    assert layout.peak_step_len(c + k) >= step


def simulate(schedule, n: int, chunk_sizes, block_size: int = 16):
    """Run the plans chunk by chunk over a fake cache and check every invariant on the way."""
    layout = KVLayout(schedule)
    stream = stream_for(schedule, n + 1)
    expected_order = engine_order(stream)
    cache: dict[int, int] = {}
    produced: list[int] = []
    c = 0
    for k in chunk_sizes:
        k = min(k, n - c)
        if k <= 0:
            break
        chunk = plan_chunk(layout, c, k)
        cached = layout.physical_len(c)
        assert chunk.cached_len == cached and sorted(cache) == list(range(cached))
        where = [stream_index(stream, chunk, i) for i in range(chunk.num_tokens)]
        assert where == expected_order[len(produced): len(produced) + chunk.num_tokens]
        produced += where
        assert chunk.positions.tolist() == stream.position_ids[where].tolist()
        assert chunk.kinds.tolist() == stream.kinds[where].tolist()

        seen = chunk.visibility()
        assert_stable_prefix(chunk, seen)
        assert_kernel_rows_see_the_uncompacted_cache(layout, chunk, seen, block_size)
        for i, query in enumerate(where):
            got = {cache[j] for j in np.flatnonzero(seen[i, :cached].numpy())}
            got |= {where[j] for j in np.flatnonzero(seen[i, cached:].numpy())}
            assert got == without_cl(stream, set(stream.mask[query].nonzero().squeeze(1).tolist())), (c, k, i)
        if chunk.is_plain:
            assert chunk.slots.tolist() == list(range(cached, cached + k))
            assert bool(seen[:, :cached].all()) and torch.equal(seen[:, cached:], torch.ones(k, k).tril().bool())

        after = layout.physical_len(c + k)
        written = chunk.slots[chunk.slots >= 0]
        assert len(set(written.tolist())) == written.size and (written < after).all()
        for i in np.flatnonzero(chunk.slots >= 0):
            cache[int(chunk.slots[i])] = where[i]
        cache = {slot: idx for slot, idx in cache.items() if slot < after}  # the tail blocks go back
        assert sorted(cache) == list(range(after))
        assert set(cache.values()) == visible_next(stream, c + k)
        held = cdiv(max(cached, after), block_size)
        assert held <= layout.max_blocks(c + k, block_size)
        c += k
    return produced


@pytest.mark.parametrize("schedule", LAYOUTS, ids=str)
def test_token_by_token_decoding(schedule):
    simulate(schedule, 90, [1] * 90)


@pytest.mark.parametrize("schedule", LAYOUTS, ids=str)
def test_random_chunks_reproduce_the_stream(schedule):
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 61, 333):
        sizes = rng.integers(1, 70, size=n).tolist()
        produced = simulate(schedule, n, sizes)
        assert len(produced) == len(engine_order(stream_for(schedule, n)))


@pytest.mark.parametrize("schedule", LAYOUTS, ids=str)
def test_whole_prompt_in_one_chunk(schedule):
    simulate(schedule, 400, [400])


def test_compression_off_is_the_identity():
    layout = KVLayout(None)
    chunk = plan_chunk(layout, 10, 5)
    assert chunk.is_plain and chunk.slots.tolist() == list(range(10, 15)) and chunk.positions.tolist() == list(range(10, 15))
    assert layout.physical_len(1000) == 1000 and layout.num_closed(1000) == 0


def test_step_plan_concatenates_chunks_and_points_logits_at_real_tokens():
    layouts = [KVLayout(ScheduleConfig(0, 4, 0)), KVLayout(ScheduleConfig(0, 4, 0)), KVLayout(None)]
    plan = StepPlan.build(layouts, [0, 3, 5], [8, 1, 2])
    assert plan.query_start.tolist() == [0, 10, 12, 14]
    # the last real token of a chunk that closes a span sits before its <CR> (<CL> is a constant)
    assert plan.logits_rows.tolist() == [8, 10, 13]
    assert plan.kinds[plan.real_rows].tolist() == [REAL] * 11 and plan.masked_rows == [0, 1]
    assert plan.num_sentinel_tokens == 3 and plan.cl_positions.tolist() == [0, 3, 0]


def assert_step_plan_is_its_chunk_plans(layouts, computed, num_real) -> None:
    """One step's plan (vectorised, or per chunk for marked requests) is its requests' chunk plans, joined."""
    plan = StepPlan.build(layouts, computed, num_real)
    chunks = [plan_chunk(layout, c, k) for layout, c, k in zip(layouts, computed, num_real)]
    assert plan.kinds.tolist() == np.concatenate([ch.kinds for ch in chunks]).tolist()
    assert plan.positions.tolist() == np.concatenate([ch.positions for ch in chunks]).tolist()
    assert plan.physical_slots.tolist() == np.concatenate([ch.slots for ch in chunks]).tolist()
    assert np.diff(plan.query_start).tolist() == [ch.num_tokens for ch in chunks]
    assert plan.cached_len.tolist() == [ch.cached_len for ch in chunks]
    assert plan.num_closings.tolist() == [ch.num_closings for ch in chunks]
    assert plan.cl_positions.tolist() == np.concatenate([ch.cl_positions for ch in chunks]).tolist()
    assert (plan.logits_rows - plan.query_start[:-1]).tolist() == [ch.last_real for ch in chunks]
    assert plan.kernel_len.tolist() == [ch.kernel_len for ch in chunks]
    assert [layout.num_tokens_with_sentinels(c, k) for layout, c, k in zip(layouts, computed, num_real)] == \
        [ch.num_tokens for ch in chunks]


def test_the_vectorised_step_plan_equals_the_chunk_plans_it_batches():
    rng = np.random.default_rng(1)
    for _ in range(30):
        layouts, computed, num_real = [], [], []
        for _ in range(rng.integers(1, 20)):
            layouts.append(KVLayout(None if rng.random() < 0.2 else LAYOUTS[rng.integers(len(LAYOUTS))]))
            computed.append(int(rng.integers(0, 300)))
            num_real.append(int(rng.choice([1, 1, 1, rng.integers(1, 200)])))
        assert_step_plan_is_its_chunk_plans(layouts, computed, num_real)


# -- the recent window (W > 0): lazy compaction and moves ------------------------------------------
# The reference here is the semantics page's rule itself, on token identities: ("R", t) for real
# token t, ("CL", m) and ("CR", m) for span m's sentinels. A real token t sees the real tokens before
# it except those of a span whose last token j has t - j > W, and the <CR> of exactly those spans.
WINDOWED = [SimpleNamespace(sink=s, span=l, gap=g, window=w)
            for s, l, g, w in [(4, 16, 0, 1), (4, 16, 0, 7), (2, 8, 3, 32), (0, 4, 0, 100), (1, 25, 5, 7),
                               (3, 5, 1, 13), (0, 2, 0, 1), (4, 16, 0, 0)]]


def spans_of(schedule, n: int, regions: Regions | None = None) -> list[tuple[int, int]]:
    """The spans wholly inside the first n tokens, by the semantics page's words (not the engine's
    arithmetic): the schedule's, or with marked regions, L-token spans G apart inside each region
    and (output "schedule") after the prompt."""
    if regions is None:
        pieces = [(schedule.sink, n)]
    else:
        pieces = [(a, min(b, n)) for a, b in regions.ranges]
        if regions.output == "schedule":
            pieces.append((regions.prompt_len, n))
    out = []
    for start, end in pieces:
        while start + schedule.span <= end:
            out.append((start, start + schedule.span))
            start += schedule.span + schedule.gap
    return out


def sees(schedule, token, regions: Regions | None = None) -> set:
    """What `token` may attend to (itself included), by the semantics page."""
    kind, i = token
    if kind == "CL":
        return {token}
    spans = spans_of(schedule, i + 1 if kind == "R" else 10 ** 4, regions)
    if kind == "CR":
        a, e = spans[i]
        return {("CL", i), token} | {("R", u) for u in range(a, e)}
    seen = {("R", u) for u in range(i + 1)}
    for m, (a, e) in enumerate(spans):
        if e - 1 < i and i - (e - 1) > schedule.window:
            seen -= {("R", u) for u in range(a, e)}
            seen.add(("CR", m))
    return seen


def lazy_order(schedule, n: int, regions: Regions | None = None) -> list:
    """The engine's order: span m's <CL>, <CR> right after real token j_m + W."""
    closing = {e - 1 + schedule.window: m
               for m, (_, e) in enumerate(spans_of(schedule, n + schedule.window, regions))}
    order = []
    for t in range(n):
        order.append(("R", t))
        if t in closing:
            order.append(("CR", closing[t]))
    return order


def simulate_window(schedule, n: int, chunk_sizes, block_size: int = 16, regions: Regions | None = None):
    layout = KVLayout(schedule, regions)
    expected = lazy_order(schedule, n, regions)
    cache: dict[int, tuple] = {}
    produced, c = [], 0
    for k in chunk_sizes:
        k = min(k, n - c)
        if k <= 0:
            break
        chunk = plan_chunk(layout, c, k)
        cached = layout.physical_len(c)
        assert chunk.cached_len == cached and sorted(cache) == list(range(cached))
        ids = [("R", int(chunk.real_index[i])) if chunk.kinds[i] == REAL else
               ("CL" if chunk.kinds[i] == CL else "CR", int(chunk.span_index[i])) for i in range(chunk.num_tokens)]
        assert ids == expected[len(produced): len(produced) + len(ids)]
        produced += ids
        seen = chunk.visibility()
        assert_stable_prefix(chunk, seen)
        assert_kernel_rows_see_the_uncompacted_cache(layout, chunk, seen, block_size)
        for i, token in enumerate(ids):
            got = {cache[j] for j in np.flatnonzero(seen[i, :cached].numpy())}
            got |= {ids[j] for j in np.flatnonzero(seen[i, cached:].numpy())}
            assert got == sees(schedule, token, regions) - {("CL", token[1])}, (schedule, c, k, token)
        # The step reads everything first, then writes the chunk's tokens and the moves.
        before = dict(cache)
        for i in np.flatnonzero(chunk.slots >= 0):
            cache[int(chunk.slots[i])] = ids[i]
        for old, new in zip(chunk.move_from.tolist(), chunk.move_to.tolist()):
            cache[new] = before[old]
        after = layout.physical_len(c + k)
        cache = {slot: token for slot, token in cache.items() if slot < after}
        assert sorted(cache) == list(range(after))
        assert set(cache.values()) == sees(schedule, ("R", c + k), regions) - {("R", c + k)}
        assert cdiv(max(cached, after), block_size) <= layout.max_blocks(c + k, block_size)
        assert layout.peak_physical_len(c + k) >= max(cached, after)
        c += k
    return produced


@pytest.mark.parametrize("schedule", WINDOWED, ids=str)
def test_windowed_token_by_token_decoding(schedule):
    simulate_window(schedule, 140, [1] * 140)


@pytest.mark.parametrize("schedule", WINDOWED, ids=str)
def test_windowed_random_chunks(schedule):
    rng = np.random.default_rng(2)
    for n in (1, 5, 77, 241):
        simulate_window(schedule, n, rng.integers(1, 90, size=n).tolist())
    simulate_window(schedule, 240, [240])


@pytest.mark.parametrize("schedule", WINDOWED, ids=str)
def test_windowed_physical_len_peaks_and_the_step_plan(schedule):
    layout = KVLayout(schedule)
    lengths = [layout.physical_len(n) for n in range(400)]
    assert [layout.peak_physical_len(n) for n in range(400)] == list(np.maximum.accumulate(lengths))
    rng = np.random.default_rng(3)
    layouts = [layout, KVLayout(None), KVLayout(ScheduleConfig(2, 8, 3))] * 3
    computed = rng.integers(0, 300, size=len(layouts)).tolist()
    num_real = rng.integers(1, 120, size=len(layouts)).tolist()
    assert_step_plan_is_its_chunk_plans(layouts, computed, num_real)


# Marked regions (semantics page, "Marked regions"): spans only inside a prompt's regions, and with
# output "schedule" after the prompt too. A prompt of 100 tokens, decoding on to 140.
PROMPT = 100
MARKINGS = [((), "prompt"), (((0, 100),), "prompt"), (((3, 40), (45, 46), (60, 100)), "prompt"),
            (((10, 11), (11, 30), (97, 100)), "schedule"), ((), "schedule"), (((5, 77),), "schedule")]


def marked(ranges, output) -> Regions:
    return Regions(tuple(ranges), PROMPT, output)


@pytest.mark.parametrize("marking", MARKINGS, ids=str)
@pytest.mark.parametrize("schedule", WINDOWED[:5] + [ScheduleConfig(3, 5, 1)], ids=str)
def test_marked_regions_token_by_token_and_in_random_chunks(schedule, marking):
    regions = marked(*marking)
    simulate_window(schedule, 140, [1] * 140, regions=regions)
    rng = np.random.default_rng(5)
    for n in (1, 60, 140):
        simulate_window(schedule, n, rng.integers(1, 90, size=n).tolist(), regions=regions)
    simulate_window(schedule, 140, [PROMPT, 40], regions=regions)


def test_marked_regions_give_the_semantics_pages_spans():
    schedule = ScheduleConfig(4, 8, 2)
    regions = Regions(((3, 25), (30, 37), (40, 60)), 70, "schedule")
    starts = [a for a, _ in spans_of(schedule, 95, regions)]
    assert starts == [3, 13, 40, 50, 70, 80]  # [23, 25) and [30, 37) are shorter than L: raw; no sink
    layout = KVLayout(schedule, regions)
    assert [layout.span_start(m) for m in range(6)] == starts
    every = [a for a, _ in spans_of(schedule, 200, regions)]  # span 6 [90, 98) is open at 95
    assert layout.span_of(np.arange(95)).tolist() == [
        next((m for m, a in enumerate(every) if a <= t < a + 8), -1) for t in range(95)]
    assert Regions((), 70).span_starts(schedule) == [] and KVLayout(schedule, Regions((), 70)).num_closed(500) == 0


def test_a_step_mixing_marked_schedule_only_and_uncompressed_requests_is_their_chunk_plans():
    rng = np.random.default_rng(6)
    layouts = [KVLayout(ScheduleConfig(2, 8, 3)), KVLayout(None),
               KVLayout(ScheduleConfig(0, 4, 1, 3), Regions(((2, 50), (80, 200)), 220, "schedule")),
               KVLayout(ScheduleConfig(4, 16, 0), Regions(((0, 64),), 100))] * 2
    computed = rng.integers(0, 250, size=len(layouts)).tolist()
    num_real = rng.integers(1, 120, size=len(layouts)).tolist()
    assert_step_plan_is_its_chunk_plans(layouts, computed, num_real)


@pytest.mark.parametrize("bad, problem", [
    ([[5, 3]], "out of range"), ([[0, 101]], "out of range"), ([[-1, 4]], "out of range"),
    ([[10, 20], [15, 30]], "must not overlap"), ([[30, 40], [10, 20]], "sorted"), ([[1, 2, 3]], "pair of integers"),
    ([[1.0, 2]], "pair of integers"), ([1, 2, 3], "even number"), ("0-10", "not a list")])
def test_bad_regions_are_refused_naming_the_problem(bad, problem):
    from vllm_sentinel.config import SentinelConfigError

    with pytest.raises(SentinelConfigError, match=problem):
        Regions.parse(bad, PROMPT)


def test_regions_parse_from_pairs_or_the_flat_list_http_carries():
    assert Regions.parse([[0, 10], [20, 30]], 40).ranges == Regions.parse([0, 10, 20, 30], 40).ranges == ((0, 10), (20, 30))
    assert Regions.parse([], 40).ranges == ()


def test_folds_merged_by_log_sum_exp_equal_one_softmax_over_all_keys():
    """The masked path's accumulator: keys folded in tiles, per group member masks, rows that see
    nothing in a tile, a row folded in two groups, padding rows on a spare row. The result is one
    softmax over each row's visible keys."""
    from vllm_sentinel.engine.backend import FoldMask, OnlineSoftmax

    torch.manual_seed(0)
    rows, kv_heads, per_kv, dim, keys = 7, 2, 3, 16, 48
    q = torch.randn(rows + 1, kv_heads, per_kv, dim)
    k, v = torch.randn(keys, kv_heads, dim), torch.randn(keys, kv_heads, dim)
    visible = torch.rand(rows, keys) < 0.5
    visible[:, 0] = True
    index = torch.tensor([[0, 1, 2, 3], [4, 5, 6, -1]])  # two members; -1 pads onto the spare row
    index = torch.where(index >= 0, index, rows)
    scale = 0.7
    state = OnlineSoftmax(q, scale)
    seen = torch.cat([visible, torch.ones(1, keys, dtype=torch.bool)])
    for first in range(0, 30, 8):  # keys [0, 30) in tiles, member 1 sees a shorter prefix of them
        tile = slice(first, min(first + 8, 30))
        length = torch.tensor([30, 12])
        member_mask = (torch.arange(tile.start, tile.stop) < length[:, None])[:, None, :] & seen[index][:, :, tile]
        state.fold(index, k[tile].expand(2, -1, -1, -1), v[tile].expand(2, -1, -1, -1), FoldMask(member_mask))
    state.fold(torch.tensor([[2, 5]]), k[30:40].unsqueeze(0), v[30:40].unsqueeze(0),
               FoldMask(seen[[2, 5]][:, 30:40].unsqueeze(0)))  # rows 2 and 5 also see keys [30, 40)
    # A mask shared by a member's rows ([G, 1, K], as stable-prefix tiles make): member 0 sees
    # keys [40, 45), member 1 none of this tile (a fold that must weigh nothing for its rows).
    shared = (torch.arange(40, 48) < torch.tensor([45, 40])[:, None])[:, None, :]
    state.fold(index, k[40:].expand(2, -1, -1, -1), v[40:].expand(2, -1, -1, -1), FoldMask(shared))
    expected_visible = visible.clone()
    expected_visible[:, 30:] = False
    expected_visible[[2, 5], 30:40] = visible[[2, 5], 30:40]
    expected_visible[:4, 40:45] = True
    expected_visible[4:, 12:30] = False
    scores = scale * torch.einsum("rhjd,khd->rhjk", q[:rows], k).masked_fill(~expected_visible[:, None, None, :], float("-inf"))
    expected = torch.einsum("rhjk,khd->rhjd", torch.softmax(scores, -1), v)
    assert torch.allclose(state.result()[:rows], expected, atol=1e-5)


def test_regions_parse_from_numpy_arrays_as_ray_data_hands_them_on():
    nested = np.array([np.array([0, 10]), np.array([20, 30])], dtype=object)
    assert Regions.parse(nested, 40).ranges == Regions.parse(np.array([[0, 10], [20, 30]]), 40).ranges == ((0, 10), (20, 30))
    assert Regions.parse(np.array([], dtype=np.int64), 40).ranges == ()


def test_compacting_decode_steps_need_no_plan():
    """`closing_decodes` (the backend's path for one-token chunks that compact, all requests of a
    step at once) gives what planning each chunk gives: the `<CR>`'s piece (row, keys, every key
    visible) and the moves, for every such step of periodic, windowed and marked layouts, batched
    together with different spans and offsets."""
    from vllm_sentinel.engine.backend import chunk_folds, closing_decodes

    layouts = [KVLayout(s) for s in LAYOUTS] + [KVLayout(ScheduleConfig(s.sink, s.span, s.gap, s.window))
                                                for s in WINDOWED]
    layouts += [KVLayout(ScheduleConfig(2, 8, 3, 5), marked(ranges, output)) for ranges, output in MARKINGS]
    cases = [(layout, c, plan_chunk(layout, c, 1)) for layout in layouts for c in range(300)]
    cases = [case for case in cases if not case[2].is_plain]
    assert len(cases) > 500 and len({layout.span for layout, _, _ in cases}) > 2
    n, fresh = len(cases), 40
    first_row, volatile, start, cl = 7 + 3 * np.arange(n), 11 + 50 * np.arange(n), 20 + 5 * np.arange(n), 99 + np.arange(n)
    pieces, owner, move_from, move_to = closing_decodes(
        np.array([layout.span for layout, _, _ in cases]), np.array([layout.window for layout, _, _ in cases]),
        np.array([layout.final_len(c) for layout, c, _ in cases]), np.array([chunk.cached_len for _, _, chunk in cases]),
        first_row, volatile, fresh, start, cl)
    got = {int(row): keys.tolist() for rows, keys in pieces for row, keys in zip(rows, keys)}
    assert len(got) == n
    for i, (layout, c, chunk) in enumerate(cases):
        want = chunk_folds(chunk, int(first_row[i]), int(volatile[i]), fresh, int(start[i]), int(cl[i]))
        assert chunk.kernel_len == 1 and want.sizes.size == 0 and want.cr_rows.tolist() == [first_row[i]]
        assert got[int(first_row[i])] == want.cr_keys[0].tolist(), (layout, c)
        assert move_from[owner == i].tolist() == chunk.move_from.tolist(), (layout, c)
        assert move_to[owner == i].tolist() == chunk.move_to.tolist(), (layout, c)

"""Prefix caching with compaction: requests resume from cached physical blocks, exact against the oracle.

A hit is a state of the layout (prefix_cache.py): final blocks shared, tail blocks copied on
write. Each test sends a request that fills the cache, then requests sharing its tokens, and checks
that they hit (vLLM's own accounting: `num_cached_tokens`, the prefix-cache counters) and that
their tokens and logprobs are still the dense oracle's. Engines share the module and run their
EngineCore in this process, so the pool is read directly.
"""
import random

import pytest
from vllm import SamplingParams

from engine_helpers import LOGPROB_TOLERANCE, Oracle, close, make_llm, schedule_args, scheduler_of
from vllm_sentinel.config import ScheduleConfig
from vllm_sentinel.engine.layout import KVLayout

BLOCK_SIZE = 32
# (sink, span, gap, window): no window, W > G (no state of final blocks only), W <= G, short spans.
SCHEDULES = [(4, 16, 0, 0), (2, 8, 3, 32), (4, 16, 0, 32), (3, 5, 4, 2), (0, 4, 0, 7)]


@pytest.fixture(scope="module")
def oracle(sentinel_model_dir):
    return Oracle(sentinel_model_dir)


@pytest.fixture(scope="module")
def engines(in_process_engines, sentinel_model_dir):
    common = dict(block_size=BLOCK_SIZE, max_num_seqs=16, disable_log_stats=False, enable_prefix_caching=True)
    made = {"whole": make_llm(sentinel_model_dir, max_num_batched_tokens=2048, **common),
            "chunked": make_llm(sentinel_model_dir, max_num_batched_tokens=64, **common),
            "small_pool": make_llm(sentinel_model_dir, max_num_batched_tokens=128, num_gpu_blocks_override=24,
                                   max_model_len=700, **common)}
    yield made
    for llm in made.values():
        close(llm)


def tokens(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(count)]


def params(schedule, max_tokens: int = 16, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=1,
                          extra_args=schedule_args(schedule), **kwargs)


def run(llm, prompts, schedule, **kwargs):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params(schedule, **kwargs), use_tqdm=False)


def hits(llm) -> tuple[int, int]:
    """vLLM's own prefix-cache counters: (queried tokens, hit tokens)."""
    metrics = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return metrics["vllm:prefix_cache_queries"], metrics["vllm:prefix_cache_hits"]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_lookups_probe_only_the_lengths_of_cached_partial_states(schedule):
    """A lookup told at which real-token counts partial entries were cached finds the same hit as
    one that hashes every prefix (the brute force), over many cached states and lookup limits."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import init_none_hash

    from vllm_sentinel.engine.prefix_cache import PhysicalBlockHashes, longest_hit

    init_none_hash(get_hash_fn_by_name("sha256"))
    layout, stream, rng = KVLayout(ScheduleConfig(*schedule)), tokens(700, seed=3), random.Random(4)
    owner = PhysicalBlockHashes(layout, BLOCK_SIZE, get_hash_fn_by_name("sha256"), stream)
    cached, states = {}, sorted(rng.sample(range(1, 650), 12))
    for n in states:
        cached.update({h: ("block", h) for h in owner.state_hashes(n)})
        partial = owner.partial_hash(n)
        if partial is not None:
            cached[partial[1]] = ("partial", n)
    found = []
    for max_tokens in [*states, *rng.sample(range(1, 700), 20)]:
        asker = PhysicalBlockHashes(layout, BLOCK_SIZE, get_hash_fn_by_name("sha256"), stream)
        brute = longest_hit(asker, max_tokens, cached.get)
        probed = longest_hit(asker, max_tokens, cached.get, states)
        assert probed == brute, (max_tokens, probed[0], brute[0])
        found.append(brute[0])
    assert max(found) > 0


def test_prefix_caching_is_on_by_default(engines, sentinel_model_dir):
    for llm in engines.values():
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is True


def shared_state(layout: KVLayout, shared: int) -> int:
    """Brute force: the most real tokens n <= shared whose state is whole blocks that no later step
    rewrites, i.e. what a request sharing `shared` tokens with an earlier one can always resume at."""
    return next(n for n in range(shared, -1, -1)
                if layout.physical_len(n) % BLOCK_SIZE == 0 and layout.physical_len(n) <= layout.final_len(n))


@pytest.mark.parametrize("schedule", SCHEDULES + [None, "off"], ids=str)
@pytest.mark.parametrize("engine", ["whole", "chunked"])
def test_a_shared_system_prompt_hits_and_matches_the_oracle(engines, oracle, schedule, engine):
    """Requests with the same 800-token system prompt and their own question. The second resumes
    from the first's final blocks (schedules with W <= G, whose states can be made of them) and
    stops a prefill chunk at its junction, the end of the shared prompt; every later one resumes
    there (to the token where the state has a raw tail, whose last block is copied on write, else
    at the last whole final block). All equal the oracle."""
    llm = engines[engine]
    sampling = params(None if schedule == "off" else schedule)
    if schedule == "off":
        sampling.extra_args = {"sentinel": {"enabled": False}}
    schedule_config = None if schedule == "off" else ScheduleConfig(*(schedule or (4, 16, 0, 0)))
    layout = KVLayout(schedule_config)
    system = tokens(800, seed=len(str(schedule)))
    first, second, *rest = [system + tokens(random.Random(i).randint(5, 60), seed=i) for i in range(5)]

    [out] = llm.generate([{"prompt_token_ids": first}], sampling, use_tqdm=False)
    assert out.num_cached_tokens == 0
    [out] = llm.generate([{"prompt_token_ids": second}], sampling, use_tqdm=False)
    assert shared_state(layout, len(system)) <= out.num_cached_tokens <= len(system)
    assert oracle.check(second, out, schedule_config) < LOGPROB_TOLERANCE
    outputs = llm.generate([{"prompt_token_ids": p} for p in rest], sampling, use_tqdm=False)
    final_only = layout.compresses and layout.physical_len(len(system)) <= layout.final_len(len(system))
    for prompt, output in zip(rest, outputs):
        assert output.num_cached_tokens == len(system) or \
            (final_only and shared_state(layout, len(system)) <= output.num_cached_tokens < len(system))
        assert oracle.check(prompt, output, schedule_config) < LOGPROB_TOLERANCE


@pytest.mark.parametrize("schedule", [(4, 16, 0, 32), (2, 8, 3, 32)], ids=str)
def test_requests_arriving_together_wait_for_the_one_computing_their_shared_prefix(engines, oracle, schedule):
    """Six requests sharing an 800-token system prompt, sent at once, with a window (no state of
    final blocks only): the first computes its whole prompt, the second the shared prefix up to
    its junction, and the other four wait a step and resume there instead of recomputing it."""
    llm = engines["whole"]
    system = tokens(800, seed=50 + schedule[2])
    batch = [system + tokens(20, seed=60 + i) for i in range(6)]
    outputs = run(llm, batch, schedule)
    assert sorted(out.num_cached_tokens for out in outputs) == [0, 0, 800, 800, 800, 800]
    for prompt, output in zip(batch, outputs):
        assert oracle.check(prompt, output, ScheduleConfig(*schedule)) < LOGPROB_TOLERANCE


def test_vllm_prefix_cache_metrics_count_the_hits(engines):
    """Read from vLLM's own counters (`vllm:prefix_cache_queries`, `vllm:prefix_cache_hits`).
    Prometheus keeps the collectors of the engine built last in the process: `small_pool`."""
    llm = engines["small_pool"]
    system = tokens(400, seed=40)
    prompts = [system + tokens(9, seed=41 + i) for i in range(3)]
    queried, hit = hits(llm)
    first = run(llm, prompts[:1], (3, 5, 4, 2), max_tokens=4)
    rest = run(llm, prompts[1:], (3, 5, 4, 2), max_tokens=4)
    queried_after, hit_after = hits(llm)
    assert all(out.num_cached_tokens > 300 for out in rest)
    assert hit_after - hit == sum(out.num_cached_tokens for out in first + rest)
    assert queried_after - queried == sum(len(p) for p in prompts)


def reachable_state(layout: KVLayout, last: int) -> int:
    """Brute force: the most real tokens n <= last whose state is whole blocks of the state after
    `last` tokens: the same version (compaction count), or final blocks only."""
    p_last, final_last = layout.physical_len(last), layout.final_len(last)
    return next(n for n in range(last, -1, -1) if layout.physical_len(n) % BLOCK_SIZE == 0 and (
        (layout.num_closed(n) == layout.num_closed(last) and layout.physical_len(n) <= p_last)
        or layout.physical_len(n) <= min(layout.final_len(n), final_last)))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_a_conversation_resumes_each_turn_from_the_last(engines, oracle, schedule):
    """Turn t + 1 is turn t's prompt, its answer and a new message: it resumes exactly where turn t
    finished (its final state is cached when it finishes), or, when turn t's last step compacted a
    span, from the state before that step (with a window too: kept as a snapshot)."""
    llm, layout, answer = engines["chunked"], KVLayout(ScheduleConfig(*schedule)), 30
    conversation, final, exact_turns = tokens(480, seed=7), 0, 0
    for turn in range(4):
        [out] = run(llm, [conversation], schedule, max_tokens=answer)
        assert oracle.check(conversation, out, ScheduleConfig(*schedule)) < LOGPROB_TOLERANCE
        if turn and layout.num_closed(final) == layout.num_closed(final - 1):
            assert out.num_cached_tokens == final, (out.num_cached_tokens, final)
            exact_turns += 1
        elif turn:
            assert out.num_cached_tokens >= reachable_state(layout, final - 1) and out.num_cached_tokens > 0, \
                (out.num_cached_tokens, reachable_state(layout, final - 1), final)
        final = len(conversation) + answer - 1  # the last sampled token is never run
        conversation = conversation + list(out.outputs[0].token_ids) + tokens(25, seed=100 + turn)
    assert exact_turns or not layout.compresses


def test_two_schedules_and_compression_off_never_share_a_block(engines):
    llm = engines["whole"]
    prompt = tokens(400, seed=11)
    [warm] = run(llm, [prompt], (4, 16, 0, 32))
    [same] = run(llm, [prompt], (4, 16, 0, 32))
    assert warm.num_cached_tokens == 0 and same.num_cached_tokens > 300
    for other in [(4, 16, 0, 0), (4, 8, 0, 32), (2, 16, 0, 32)]:
        [out] = run(llm, [prompt], other)
        assert out.num_cached_tokens == 0, other
    off = params(None)
    off.extra_args = {"sentinel": {"enabled": False}}
    [out] = llm.generate([{"prompt_token_ids": prompt}], off, use_tqdm=False)
    assert out.num_cached_tokens == 0


def test_hits_under_preemption_stay_exact_and_the_pool_drains_on_reset(engines, oracle):
    """24 blocks of 32 slots for 8 requests sharing 300 tokens: preempted, recomputed from the cache
    and from scratch; afterwards resetting the cache gives every block back."""
    llm = engines["small_pool"]
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    schedule = (3, 5, 4, 2)
    shared = tokens(300, seed=12)
    batch = [shared + tokens(10 + 7 * i, seed=20 + i) for i in range(8)]
    [_] = run(llm, batch[:1], schedule)
    for i, prompt in enumerate(batch):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params(schedule, max_tokens=300))
    outputs, preemptions, cached = {}, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
                cached += out.num_cached_tokens
        preemptions = max(preemptions, sum(r.num_preemptions for r in [*scheduler.running, *scheduler.waiting]))
    assert preemptions > 0 and cached > 0
    for i, prompt in enumerate(batch):
        assert oracle.check(prompt, outputs[str(i)], ScheduleConfig(*schedule)) < LOGPROB_TOLERANCE
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # cached blocks are free (evictable)
    assert llm.reset_prefix_cache() is not False
    assert len(pool.cached_block_hashes_by_block) == 0
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_cached_blocks_are_evicted_by_vllm_lru(engines):
    """A pool too small to keep every prompt's blocks: older entries are evicted, never leaked."""
    llm = engines["small_pool"]
    pool = scheduler_of(llm).kv_cache_manager.block_pool
    prompts = [tokens(600, seed=30 + i) for i in range(4)]
    run(llm, prompts, (4, 16, 0, 32), max_tokens=4)
    [again] = run(llm, prompts[:1], (4, 16, 0, 32), max_tokens=4)
    assert again.num_cached_tokens == 0  # evicted by the three prompts after it
    [latest] = run(llm, prompts[-1:], (4, 16, 0, 32), max_tokens=4)
    assert latest.num_cached_tokens > 0
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1

"""Compression frees real blocks in vLLM's own pool; preemption (recompute) changes nothing.

EngineCore runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the tests step the engine
and read the scheduler's block pool and each request's block list directly.
"""

import pytest
from vllm import SamplingParams

from conftest import ENGINE_MODEL_SCHEDULE
from engine_helpers import LOGPROB_TOLERANCE, close, make_llm, scheduler_of
from vllm_sentinel.config import ScheduleConfig
from vllm_sentinel.engine.layout import KVLayout

BLOCK_SIZE = 32
POOL_BLOCKS = 64           # 2048 KV slots
NUM_REQUESTS, PROMPT, GENERATE = 16, 64, 500
# Uncompressed, the batch needs 16 * cdiv(564, 32) = 288 blocks: 4.5x the pool.
POOL = dict(block_size=BLOCK_SIZE, max_model_len=600, max_num_batched_tokens=512, disable_log_stats=False)


@pytest.fixture(scope="module")
def engines(in_process_engines, sentinel_model_dir):
    made = {
        "sentinel": make_llm(sentinel_model_dir, num_gpu_blocks_override=POOL_BLOCKS, **POOL),
        "sentinel_small_pool": make_llm(sentinel_model_dir, num_gpu_blocks_override=20, **POOL),
        # Stock vLLM on the same pool; processed logprobs so that `allowed_token_ids` (no sentinels)
        # applies to them as the sentinel engine's logits mask does.
        "stock": make_llm(sentinel_model_dir, sentinel=False, num_gpu_blocks_override=POOL_BLOCKS,
                          logprobs_mode="processed_logprobs", **POOL),
    }
    yield made
    for llm in made.values():
        close(llm)


def run(llm, prompts, params, on_step=None):
    """Step the engine to completion; returns outputs by request id and each request's preemptions."""
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    outputs, preemptions, peak_running = {}, {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0]
        for request in [*scheduler.running, *scheduler.waiting]:
            preemptions[request.request_id] = request.num_preemptions
        peak_running = max(peak_running, len(scheduler.running))
        if on_step:
            on_step(scheduler)
    return outputs, sum(preemptions.values()), peak_running


def batch_prompts():
    return [[(7 * i + j) % 4000 + 5 for j in range(PROMPT)] for i in range(NUM_REQUESTS)]


GREEDY = SamplingParams(max_tokens=GENERATE, temperature=0, ignore_eos=True)


def test_held_blocks_stay_within_the_bound_and_the_pool_accounts_for_them(engines):
    llm = engines["sentinel"]
    scheduler = scheduler_of(llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    layout = KVLayout(ScheduleConfig(*ENGINE_MODEL_SCHEDULE))
    free_at_start = pool.get_num_free_blocks()
    seen = []

    def check(sched):
        held = 0
        for request in sched.running:
            blocks = len(manager.req_to_blocks[request.request_id])
            assert blocks <= layout.max_blocks(request.num_computed_tokens, BLOCK_SIZE)
            held += blocks
            seen.append((request.num_computed_tokens, blocks))
        assert pool.get_num_free_blocks() == free_at_start - held  # vLLM's own accounting

    freed_before = manager.num_blocks_freed
    run(llm, [list(range(5, 25))], SamplingParams(max_tokens=550, temperature=0, ignore_eos=True), check)
    assert max(n for n, _ in seen) >= 560 and max(b for _, b in seen) <= 3  # 570 tokens in at most 3 blocks
    assert manager.num_blocks_freed - freed_before > 0
    assert pool.get_num_free_blocks() == free_at_start


def test_a_batch_needing_4x_the_pool_runs_concurrently_while_stock_preempts(engines):
    sentinel_out, sentinel_preemptions, sentinel_peak = run(engines["sentinel"], batch_prompts(), GREEDY)
    _, stock_preemptions, _ = run(engines["stock"], batch_prompts(), GREEDY)
    assert len(sentinel_out) == NUM_REQUESTS
    assert sentinel_preemptions == 0 and sentinel_peak == NUM_REQUESTS
    assert stock_preemptions > 0
    stats = scheduler_of(engines["sentinel"]).current_sentinel_stats()
    assert stats.peak_running == NUM_REQUESTS and stats.blocks_freed > 0


def test_preemption_changes_no_output_and_counts_each_span_once(engines):
    reference, _, _ = run(engines["sentinel"], batch_prompts(), GREEDY)
    small = scheduler_of(engines["sentinel_small_pool"])
    closed_before = small.current_sentinel_stats().spans_closed
    preempted, preemptions, _ = run(engines["sentinel_small_pool"], batch_prompts(), GREEDY)
    assert preemptions > 0
    # A recomputed request closes its spans again; the counter must not count them twice.
    layout = KVLayout(ScheduleConfig(*ENGINE_MODEL_SCHEDULE))
    computed = PROMPT + GENERATE - 1  # the last sampled token is never computed
    assert small.current_sentinel_stats().spans_closed - closed_before == NUM_REQUESTS * layout.num_closed(computed)
    assert {k: list(v.token_ids) for k, v in preempted.items()} == {k: list(v.token_ids) for k, v in reference.items()}


def test_a_request_with_compression_off_is_served_as_stock_vllm_serves_it(engines):
    prompts = batch_prompts()[:4] + [list(range(40, 340))]
    no_sentinels = list(range(4096))
    off = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, logprobs=1,
                         extra_args={"sentinel": {"enabled": False}})
    stock = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, logprobs=1, allowed_token_ids=no_sentinels)
    got, _, _ = run(engines["sentinel"], prompts, off)
    expected, _, _ = run(engines["stock"], prompts, stock)
    for key, completion in got.items():
        assert list(completion.token_ids) == list(expected[key].token_ids)
        for step, token in enumerate(completion.token_ids):
            ours = completion.logprobs[step][token].logprob
            theirs = expected[key].logprobs[step][token].logprob
            assert abs(ours - theirs) < LOGPROB_TOLERANCE
    stats = scheduler_of(engines["sentinel"]).current_sentinel_stats()
    closed_before = stats.spans_closed
    run(engines["sentinel"], prompts, off)
    assert scheduler_of(engines["sentinel"]).current_sentinel_stats().spans_closed == closed_before

"""A recent window W in the engine: spans compacted when they leave the window, exact against the oracle.

The oracle is the dense masked forward with the windowed mask (semantics page, "Recent window").
Schedules cover W in {0, 1, 7, 32, 100}: smaller and larger than the span, and multiples of
nothing. Engines share the module; EngineCore runs in this process so that the pool is read directly.
"""
import random

import pytest
from vllm import SamplingParams

from engine_helpers import LOGPROB_TOLERANCE, Oracle, close, make_llm, schedule_args, scheduler_of
from vllm_sentinel.config import ScheduleConfig
from vllm_sentinel.engine.layout import KVLayout

# (sink, span, gap, window)
WINDOWED = [(4, 16, 0, 0), (4, 16, 0, 1), (4, 16, 0, 7), (2, 8, 3, 32), (0, 4, 0, 100), (1, 25, 5, 7),
            (3, 5, 1, 13)]
BLOCK_SIZE = 32


@pytest.fixture(scope="module")
def oracle(sentinel_model_dir):
    return Oracle(sentinel_model_dir)


@pytest.fixture(scope="module")
def engines(in_process_engines, sentinel_model_dir):
    common = dict(block_size=BLOCK_SIZE, max_num_seqs=16, disable_log_stats=False)
    made = {"chunked": make_llm(sentinel_model_dir, max_num_batched_tokens=64, **common),
            "whole": make_llm(sentinel_model_dir, max_num_batched_tokens=2048, **common),
            "small_pool": make_llm(sentinel_model_dir, max_num_batched_tokens=128, num_gpu_blocks_override=20,
                                   max_model_len=600, **common)}
    yield made
    for llm in made.values():
        close(llm)


def prompts(count: int, seed: int, longest: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, longest] + [rng.randint(2, longest) for _ in range(count - 2)]
    return [[rng.randrange(3, 4096) for _ in range(n)] for n in lengths]


def params(schedule, max_tokens: int = 24, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=1,
                          extra_args=schedule_args(schedule), **kwargs)


@pytest.mark.parametrize("engine", ["chunked", "whole"])
def test_a_batch_of_sixteen_with_windows_matches_the_oracle(engines, oracle, engine):
    batch = prompts(16, seed=1)
    schedules = [WINDOWED[i % len(WINDOWED)] for i in range(len(batch))]
    outputs = engines[engine].generate([{"prompt_token_ids": p} for p in batch],
                                       [params(s, prompt_logprobs=1) for s in schedules], use_tqdm=False)
    worst = max(oracle.check(p, out, ScheduleConfig(*s)) for p, out, s in zip(batch, outputs, schedules))
    assert worst < LOGPROB_TOLERANCE


@pytest.mark.parametrize("schedule", WINDOWED, ids=str)
def test_one_request_decoding_through_many_compactions_matches_the_oracle(engines, oracle, schedule):
    prompt = prompts(2, seed=sum(schedule), longest=90)[1]
    [out] = engines["chunked"].generate([{"prompt_token_ids": prompt}], params(schedule, max_tokens=150),
                                        use_tqdm=False)
    assert oracle.check(prompt, out, ScheduleConfig(*schedule)) < LOGPROB_TOLERANCE


def test_the_wrong_window_would_show(engines, oracle):
    """A negative control: the model's attention is sharp enough that W matters to the logprobs."""
    prompt = prompts(2, seed=3, longest=200)[1]
    [out] = engines["whole"].generate([{"prompt_token_ids": prompt}], params((4, 16, 0, 7)), use_tqdm=False)
    with pytest.raises(AssertionError):
        assert oracle.check(prompt, out, ScheduleConfig(4, 16, 0, 0)) < LOGPROB_TOLERANCE


def test_windowed_blocks_stay_within_the_bound_and_preemption_changes_nothing(engines):
    """20 blocks of 32 slots for 8 requests of up to 600 tokens: preempted and recomputed all along."""
    llm = engines["small_pool"]
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    schedule = (2, 8, 3, 32)
    layout = KVLayout(ScheduleConfig(*schedule))
    batch = prompts(8, seed=4, longest=100)
    for i, prompt in enumerate(batch):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params(schedule, max_tokens=400))
    outputs, preemptions = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        held = 0
        for request in scheduler.running:
            blocks = len(manager.req_to_blocks[request.request_id])
            assert blocks <= layout.max_blocks(request.num_computed_tokens, BLOCK_SIZE)
            held += blocks
        assert pool.get_num_free_blocks() == free_at_start - held  # read from vLLM's own pool
        preemptions = max(preemptions, sum(r.num_preemptions for r in [*scheduler.running, *scheduler.waiting]))
    assert preemptions > 0 and pool.get_num_free_blocks() == free_at_start
    reference = engines["whole"].generate([{"prompt_token_ids": p} for p in batch], params(schedule, max_tokens=400),
                                          use_tqdm=False)
    assert outputs == {str(i): list(out.outputs[0].token_ids) for i, out in enumerate(reference)}


def test_each_row_is_attended_once_and_tiny_tiles_change_nothing(engines, oracle, monkeypatch):
    """Each token row is attended exactly once: by the kernel (plain chunks, and a compacting
    chunk's tokens before its first <CR>) or by the masked path (the rest of that chunk); with the
    budgets at their minimum (one block per stable-prefix tile, one row block per group) the
    results are still the oracle's: tiling and grouping are bookkeeping, not approximations."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from vllm_sentinel.engine import backend

    monkeypatch.setattr(backend, "SCORE_BUDGET", 1)
    monkeypatch.setattr(backend, "KV_TILE_BUDGET", 1)
    kernel_calls, seen = [], []
    kernel_forward, sentinel_forward = CPUAttentionBackendImpl.forward, backend.SentinelAttentionImpl.forward

    def kernel(self, layer, query, key, value, kv_cache, meta, output, *args, **kwargs):
        kernel_calls.append(meta.num_actual_tokens)
        return kernel_forward(self, layer, query, key, value, kv_cache, meta, output, *args, **kwargs)

    def sentinel(self, layer, query, key, value, kv_cache, meta, output, *args, **kwargs):
        kernel_calls.clear()
        result = sentinel_forward(self, layer, query, key, value, kv_cache, meta, output, *args, **kwargs)
        if meta is not None:
            masked = set(meta.masked_rows.tolist())
            kernel = set(meta.kernel_rows.tolist()) if meta.kernel_rows is not None else set(range(meta.num_actual_tokens))
            compacting = set(meta.final_rows.tolist())
            seen.append((sum(kernel_calls), len(kernel), len(masked), meta.num_actual_tokens, bool(masked & kernel),
                         len(kernel & compacting)))
        return result

    monkeypatch.setattr(CPUAttentionBackendImpl, "forward", kernel)
    monkeypatch.setattr(backend.SentinelAttentionImpl, "forward", sentinel)
    batch = prompts(6, seed=5, longest=300)
    schedules = [WINDOWED[i % len(WINDOWED)] for i in range(len(batch))]
    outputs = engines["chunked"].generate([{"prompt_token_ids": p} for p in batch],
                                          [params(s, max_tokens=40) for s in schedules], use_tqdm=False)
    assert max(oracle.check(p, out, ScheduleConfig(*s)) for p, out, s in zip(batch, outputs, schedules)) \
        < LOGPROB_TOLERANCE
    assert all(calls == k and k + m == n and not overlap for calls, k, m, n, overlap, _ in seen)
    assert any(m and k > shared for _, k, m, _, _, shared in seen), "no step mixed plain and compacting chunks"
    assert any(shared for *_, shared in seen), "no compacting chunk had tokens before its <CR> on the kernel"


def test_a_llama_gets_its_cl_from_rotated_constants_not_a_forward_per_step(engines):
    """The cheap path is kept where it is exact (engine/cl_kv.py measures that at load); families where
    position enters otherwise are covered in test_engine_families.py."""
    from vllm_sentinel.engine.cl_kv import RotatedConstants

    runner = engines["whole"].llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    assert isinstance(runner._sentinel_cl, RotatedConstants)

"""Marked regions (semantics page, "Marked regions"): the engine compresses only what a request
marks, and equals the dense oracle over the spans those regions give, next to schedule-only and
uncompressed requests in the same batches, through chunked prefill, preemption and prefix hits.

Two engines shared by the module: a 64-token step budget (every long prompt in many chunks), and
whole prompts in a pool small enough that decoding preempts. Prefix caching is on in both.
"""
import random

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from conftest import ENGINE_MODEL_SCHEDULE
from engine_helpers import LOGPROB_TOLERANCE, Oracle, close, make_llm, scheduler_of
from vllm_sentinel.config import Regions, ScheduleConfig
from vllm_sentinel.engine.layout import KVLayout

DEFAULT = ScheduleConfig(*ENGINE_MODEL_SCHEDULE)


@pytest.fixture(scope="module")
def oracle(sentinel_model_dir):
    return Oracle(sentinel_model_dir)


@pytest.fixture(scope="module")
def engines(in_process_engines, sentinel_model_dir):
    common = dict(max_num_seqs=16, enable_prefix_caching=True)
    made = {"chunked": make_llm(sentinel_model_dir, max_num_batched_tokens=64, **common),
            "small_pool": make_llm(sentinel_model_dir, max_num_batched_tokens=2048, num_gpu_blocks_override=24, block_size=32,
                                   max_model_len=700, **common)}
    yield made
    for llm in made.values():
        close(llm)


def random_regions(rng: random.Random, n: int) -> list[list[int]]:
    cuts = sorted(rng.sample(range(n + 1), min(n + 1, 2 * rng.randint(0, 4))))
    return [[a, b] for a, b in zip(cuts[::2], cuts[1::2]) if a < b]


def requests(count: int, seed: int):
    """(prompt, extra_args, schedule, regions) of a mixed batch: marked requests (random regions,
    none, the whole prompt, generated tokens compressed too, another schedule), schedule-only and
    uncompressed ones."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = rng.choice([1, 3, 40, rng.randint(20, 400)])
        prompt = [rng.randrange(3, 4096) for _ in range(n)]
        kind = i % 7
        if kind == 5:
            out.append((prompt, None, DEFAULT, None))
            continue
        if kind == 6:
            out.append((prompt, {"sentinel": {"enabled": False}}, None, None))
            continue
        ranges = {0: random_regions(rng, n), 1: [], 2: [[0, n]], 3: random_regions(rng, n),
                  4: random_regions(rng, n)}[kind]
        options = {"regions": ranges}
        schedule = DEFAULT
        if kind == 3:
            options["output"] = "schedule"
        if kind == 4:
            options.update(span=5, gap=2, window=6, output="schedule")
            schedule = ScheduleConfig(DEFAULT.sink, 5, 2, 6)
        regions = Regions(tuple(map(tuple, ranges)), n, options.get("output", "prompt"))
        out.append((prompt, {"sentinel": options}, schedule, regions))
    return out


def params(extra_args, max_tokens: int = 24, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=1, extra_args=extra_args,
                          **kwargs)


@pytest.mark.parametrize("engine", ["chunked", "small_pool"])
def test_a_batch_mixing_marked_schedule_only_and_uncompressed_requests_matches_the_oracle(engines, oracle, engine):
    batch = requests(21, seed=1)
    outputs = engines[engine].generate([{"prompt_token_ids": p} for p, *_ in batch],
                                       [params(x, prompt_logprobs=1) for _, x, *_ in batch], use_tqdm=False)
    worst = max(oracle.check(p, out, schedule, regions) for (p, _, schedule, regions), out in zip(batch, outputs))
    assert worst < LOGPROB_TOLERANCE


def test_marked_requests_stay_exact_under_preemption(engines, oracle):
    llm = engines["small_pool"]
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    batch = [r for r in requests(30, seed=2) if r[3] is not None and len(r[0]) > 100][:8]
    for i, (prompt, extra, *_rest) in enumerate(batch):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params(extra, max_tokens=250))
    outputs, preemptions = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        preemptions = max(preemptions, sum(r.num_preemptions for r in [*scheduler.running, *scheduler.waiting]))
    assert preemptions > 0
    for i, (prompt, _, schedule, regions) in enumerate(batch):
        assert oracle.check(prompt, outputs[str(i)], schedule, regions) < LOGPROB_TOLERANCE


def test_prefix_hits_only_where_the_compression_agrees(engines, oracle):
    llm = engines["chunked"]
    rng = random.Random(3)
    prompt = [rng.randrange(3, 4096) for _ in range(300)]
    marked = {"sentinel": {"regions": [[10, 150], [200, 290]]}}
    [first] = llm.generate([{"prompt_token_ids": prompt}], params(marked), use_tqdm=False)
    [again] = llm.generate([{"prompt_token_ids": prompt}], params(marked), use_tqdm=False)
    regions = Regions(((10, 150), (200, 290)), 300)
    assert first.num_cached_tokens == 0 and again.num_cached_tokens > 100
    assert oracle.check(prompt, again, DEFAULT, regions) < LOGPROB_TOLERANCE
    for other in [{"sentinel": {"regions": [[10, 150], [201, 290]]}}, {"sentinel": {"regions": []}}, None]:
        [out] = llm.generate([{"prompt_token_ids": prompt}], params(other), use_tqdm=False)
        assert out.num_cached_tokens == 0, other


def test_the_same_marked_documents_under_different_questions_share_the_cache(engines, oracle):
    """Retrieval's shape: documents (marked) shared by several requests, each its own question. The
    documents' compacted blocks are computed once and hit by the rest, exactly."""
    llm = engines["small_pool"]  # blocks of 32: a few blocks of compacted documents are final
    rng = random.Random(5)
    documents = [rng.randrange(3, 4096) for _ in range(600)]
    prompts = [documents + [rng.randrange(3, 4096) for _ in range(12 + 5 * i)] for i in range(4)]
    marked = {"sentinel": {"regions": [[0, 280], [300, 600]]}}
    [first] = llm.generate([{"prompt_token_ids": prompts[0]}], params(marked), use_tqdm=False)
    # Without prompt_logprobs: vLLM never serves those from the cache.
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params(marked), use_tqdm=False)
    assert first.num_cached_tokens == 0 and all(out.num_cached_tokens >= 300 for out in rest)
    for prompt, out in zip(prompts[1:], rest):
        regions = Regions(((0, 280), (300, 600)), len(prompt))
        assert oracle.check(prompt, out, DEFAULT, regions) < LOGPROB_TOLERANCE


def test_marking_the_documents_holds_less_kv_than_marking_nothing(engines):
    """vLLM's own pool: a request whose whole prompt is marked holds fewer blocks at its end than
    the same request with nothing marked (which holds all of it)."""
    llm = engines["small_pool"]
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    prompt = [random.Random(4).randrange(3, 4096) for _ in range(400)]
    held = {}
    for name, ranges in (("marked", [[0, 360]]), ("unmarked", [])):
        engine.add_request(name, {"prompt_token_ids": prompt},
                           params({"sentinel": {"regions": ranges}}, max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
            for request_id in scheduler.requests:  # the one request (vLLM suffixes its id)
                held[name] = len(scheduler.kv_cache_manager.get_block_ids(request_id)[0])
    layout = KVLayout(DEFAULT, Regions(((0, 360),), 400))
    assert held["unmarked"] >= 400 // 32 and held["marked"] < held["unmarked"] / 2
    assert layout.physical_len(401) == 401 - 15 * 22  # 22 spans of 16 in [0, 352), each now one <CR>
    assert held["marked"] <= -(-layout.physical_len(401) // 32)


@pytest.mark.parametrize("regions, message", [
    ([[0, 9]], r"region 0 \[0, 9\) is out of range: regions need 0 <= start < end <= 8"),
    ([[4, 2]], "out of range"),
    ([[0, 4], [3, 6]], "must be sorted and must not overlap"),
    ([[0, 4, 6]], "is not a pair of integers"),
    ("all", "is not a list"),
])
def test_bad_regions_fail_the_request_alone_naming_the_problem(engines, regions, message):
    llm = engines["chunked"]
    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([{"prompt_token_ids": list(range(5, 13))}], params({"sentinel": {"regions": regions}}),
                     use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="give .*regions.* too"):
        llm.generate([{"prompt_token_ids": [5, 6]}], params({"sentinel": {"output": "schedule"}}), use_tqdm=False)
    [out] = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params(None, max_tokens=3), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3  # the engine serves on

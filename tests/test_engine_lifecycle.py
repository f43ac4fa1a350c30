"""No request can hurt the server: aborts, stops, n > 1, beam search, structured outputs, logprobs,
bf16, torch.compile and a prompt of max_model_len - 1, all with the sentinel engine.

EngineCore runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the tests step the engine
themselves, abort requests between and *during* steps, and read vLLM's block pool, the scheduler's
block lists and the worker's block table directly. Every step of every engine here is checked:
the worker's block table equals the scheduler's block lists (see `Tap`). fp32 unless named.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.sampling_params import BeamSearchParams, StructuredOutputsParams

from conftest import ENGINE_MODEL_SCHEDULE
from engine_helpers import Oracle, close, make_llm
from vllm_sentinel.config import ScheduleConfig
from vllm_sentinel.engine.kv_cache_manager import kept_blocks
from vllm_sentinel.engine.layout import KVLayout

TOL = 1e-4  # fp32 logprobs against the oracle, and compiled against eager
SCHEDULE = ScheduleConfig(*ENGINE_MODEL_SCHEDULE)  # sink 4, span 16, gap 0
LAYOUT = KVLayout(SCHEDULE)
# Per request, for the aborts: spans of 40 outgrow a 32-slot block and shrink back into one when
# they close, so every closing gives a block back (with spans of 16, a request shorter than ~200
# tokens never holds more than one block and a trim that leaked would go unseen).
LONG_SPAN = ScheduleConfig(4, 40, 0)
LONG_LAYOUT = KVLayout(LONG_SPAN)
MAX_MODEL_LEN = 512
# The chunked engine: a 64-token step budget cuts long prompts into chunks; 32-token blocks make
# span closings give blocks back, so a leak would show in the pool.
# Compact JSON (no free whitespace) is an engine option for xgrammar in vLLM 0.32, not a request's.
CHUNKED = dict(block_size=32, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64, max_num_seqs=8,
               max_logprobs=-1, structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
# Whole prompts in one chunk at the default block size (128).
WHOLE = dict(max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=MAX_MODEL_LEN, max_num_seqs=8)


def prompt_of(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(length)]  # 0, 1, 2: bos, eos, pad


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **{"ignore_eos": True, **kwargs})


def long_spans(max_tokens: int, **kwargs) -> SamplingParams:
    return greedy(max_tokens, extra_args={"sentinel": {"span": LONG_SPAN.span}}, **kwargs)


# -- engines, and a tap on every step ------------------------------------------------------------
def core_of(llm):
    return llm.llm_engine.engine_core.engine_core


def scheduler_of(llm):
    return core_of(llm).scheduler


def runner_of(llm):
    return core_of(llm).model_executor.driver_worker.worker.model_runner


def manager_of(llm):
    return scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers[0]


def pool_of(llm):
    return scheduler_of(llm).kv_cache_manager.block_pool


def usable_blocks(llm) -> int:
    return pool_of(llm).num_gpu_blocks - 1  # block 0 is vLLM's null block, never free


def assert_worker_mirrors_scheduler(llm, req_ids) -> None:
    """The worker's block table row of each request equals the scheduler's block list.

    Valid inside the worker's `execute_model` (after its `_update_states`) and after a whole step,
    not in between: the scheduler trims a request's tail (`remove_skipped_blocks`) when it
    schedules the next step, and the worker drops the same tail only when it receives that step
    (`_update_states` in model_runner.py). Between the two the lists differ by design.
    """
    runner, manager = runner_of(llm), manager_of(llm)
    table = runner.input_batch.block_table.block_tables[0]
    for req_id in req_ids:
        row = runner.input_batch.req_id_to_index[req_id]
        worker = table.block_table.np[row, : table.num_blocks_per_row[row]].tolist()
        scheduler = [block.block_id for block in manager.req_to_blocks[req_id]]
        assert worker == scheduler, f"request {req_id}: worker blocks {worker} != scheduler blocks {scheduler}"


class Tap:
    """Wraps the worker's `execute_model`: checks block tables in every step, records what each step
    scheduled, and runs a test's `during` hook while the step executes (for aborts in flight)."""

    def __init__(self, llm):
        self.llm = llm
        self.steps: list[dict[str, tuple[int, int]]] = []  # req_id -> (computed before, scheduled)
        self.during = None
        runner = runner_of(llm)
        original = runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            result = original(scheduler_output, *args, **kwargs)
            computed = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
            cached = scheduler_output.scheduled_cached_reqs
            computed.update(zip(cached.req_ids, cached.num_computed_tokens))
            step = {r: (computed[r], k) for r, k in scheduler_output.num_scheduled_tokens.items()}
            self.steps.append(step)
            assert_worker_mirrors_scheduler(llm, step)
            if self.during is not None:
                self.during(step)
            return result

        runner.execute_model = execute_model


ENGINES = []  # made so far, for `no_leftovers`


def _engine(model_dir, **kwargs):
    llm = make_llm(model_dir, **kwargs)
    ENGINES.append(llm)
    llm.tap = Tap(llm)
    assert pool_of(llm).get_num_free_blocks() == usable_blocks(llm)
    return llm


@pytest.fixture(scope="module")
def chunked(in_process_engines, sentinel_model_dir):
    llm = _engine(sentinel_model_dir, **CHUNKED)
    yield llm
    ENGINES.remove(llm)
    close(llm)


@pytest.fixture(scope="module")
def whole(in_process_engines, sentinel_model_dir):
    llm = _engine(sentinel_model_dir, **WHOLE)
    yield llm
    ENGINES.remove(llm)
    close(llm)


@pytest.fixture(scope="module")
def compiled(in_process_engines, sentinel_model_dir):
    llm = _engine(sentinel_model_dir, enforce_eager=False, **WHOLE)
    yield llm
    ENGINES.remove(llm)
    close(llm)


@pytest.fixture(scope="module")
def bf16(in_process_engines, sentinel_model_dir):
    llm = _engine(sentinel_model_dir, **{**CHUNKED, "dtype": "bfloat16"})
    yield llm
    ENGINES.remove(llm)
    close(llm)


@pytest.fixture(autouse=True)
def no_leftovers():
    """A failed test must not leave requests behind for the next one to trip over."""
    yield
    for llm in ENGINES:
        if llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.abort_request(list(llm.llm_engine.output_processor.external_req_ids))
        llm.tap.during = None


@pytest.fixture(scope="module")
def oracle(sentinel_model_dir):
    return Oracle(sentinel_model_dir)


@pytest.fixture
def same_internal_ids(monkeypatch):
    """Make vLLM use the caller's request id as the internal one (VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1,
    read after EngineCore cached the environment), so a reused id reaches the scheduler and the
    worker as the same key."""
    import vllm.envs as envs

    monkeypatch.setattr(envs, "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", True, raising=False)


# -- stepping ------------------------------------------------------------------------------------
def internal_id(llm, external: str) -> str:
    [req_id] = llm.llm_engine.output_processor.external_req_ids[external]
    return req_id


def step(llm) -> dict:
    """One engine step; returns finished outputs by request id. Running requests' block tables are
    compared after the step too (the tap compares them inside it)."""
    steps = len(llm.tap.steps)
    finished = {out.request_id: out for out in llm.llm_engine.step() if out.finished}
    if len(llm.tap.steps) > steps:  # the model ran: its requests that still run keep their blocks
        running = {request.request_id for request in scheduler_of(llm).running}
        assert_worker_mirrors_scheduler(llm, running & set(llm.tap.steps[-1]))
    return finished


def run_to_end(llm) -> dict:
    outputs = {}
    while llm.llm_engine.has_unfinished_requests():
        outputs.update(step(llm))
    return outputs


def flush(llm) -> None:
    """Step until the worker has been told of every finished request (EngineCore steps for that alone)."""
    for _ in range(4):
        if not scheduler_of(llm).has_requests():
            return
        step(llm)
    raise AssertionError("the scheduler still holds requests after the engine went idle")


def assert_idle(llm) -> None:
    """Nothing left anywhere: vLLM's pool is fully free, read from the pool itself."""
    flush(llm)
    assert pool_of(llm).get_num_free_blocks() == usable_blocks(llm)
    assert not manager_of(llm).req_to_blocks
    assert not scheduler_of(llm).layouts and not scheduler_of(llm).requests
    runner = runner_of(llm)
    assert not runner.requests and not runner.sentinel_layouts and runner.input_batch.num_reqs == 0


def generate_one(llm, prompt: list[int], params: SamplingParams):
    [out] = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return out


def assert_same_completion(got, expected, tol: float = TOL) -> None:
    assert list(got.token_ids) == list(expected.token_ids)
    for step_got, step_expected, token in zip(got.logprobs, expected.logprobs, got.token_ids):
        assert abs(step_got[token].logprob - step_expected[token].logprob) < tol


def sentinel_ids(oracle) -> set[int]:
    return set(oracle.config.sentinel_ids)


def closes_span(layout: KVLayout, computed: int, scheduled: int) -> bool:
    return layout.num_closed(computed + scheduled) > layout.num_closed(computed)


def untrimmed_tail(llm, external: str, layout: KVLayout) -> int:
    """Blocks a request holds past what its computed tokens need: the tail the next step trims."""
    req_id = internal_id(llm, external)
    held = len(manager_of(llm).req_to_blocks[req_id])
    computed = scheduler_of(llm).requests[req_id].num_computed_tokens
    return held - kept_blocks(layout, computed, CHUNKED["block_size"])


# -- aborts --------------------------------------------------------------------------------------
def test_abort_during_chunked_prefill_frees_every_block(chunked):
    engine, scheduler = chunked.llm_engine, scheduler_of(chunked)
    prompt = prompt_of(300, seed=1)
    engine.add_request("prefill", {"prompt_token_ids": prompt}, long_spans(8))
    step(chunked)
    [request] = scheduler.running
    assert 0 < request.num_computed_tokens < len(prompt)  # mid-prefill: 64 of 300
    assert pool_of(chunked).get_num_free_blocks() < usable_blocks(chunked)
    engine.abort_request(["prefill"])
    assert pool_of(chunked).get_num_free_blocks() == usable_blocks(chunked)  # at once, not at the next step
    assert not engine.has_unfinished_requests()
    assert_idle(chunked)


def test_abort_during_decode_frees_every_block(chunked):
    engine = chunked.llm_engine
    engine.add_request("decode", {"prompt_token_ids": prompt_of(40, seed=2)}, long_spans(100))
    request = scheduler_of(chunked).requests[internal_id(chunked, "decode")]
    freed = manager_of(chunked).num_blocks_freed
    # Past a span closing in decode (token 43: a block went back), into the next span's second block.
    while manager_of(chunked).num_blocks_freed == freed or len(manager_of(chunked).req_to_blocks[request.request_id]) < 2:
        assert request.num_output_tokens < 90, "no closing gave a block back"
        step(chunked)
    engine.abort_request(["decode"])
    assert_idle(chunked)


@pytest.mark.parametrize("when", ["while the closing step runs", "right after the closing step"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_abort_in_a_step_that_closes_a_span(chunked, when, phase):
    """An abort that arrives while the step closing a span runs (EngineCore processes it between the
    model's execution and `update_from_output`, as a client disconnect does), or right after it
    (the closed span's tail blocks not yet trimmed): every block goes back."""
    engine = chunked.llm_engine
    # prefill: a 150-token prompt in 64-token chunks, aborted at the second chunk (span 1 closes in it);
    # decode: a 30-token prompt, aborted at the decode step that computes token 43 (closes span 0).
    prompt = prompt_of(150 if phase == "prefill" else 30, seed=3)
    engine.add_request("closing", {"prompt_token_ids": prompt}, long_spans(60))
    req_id = internal_id(chunked, "closing")

    def is_target(computed: int, scheduled: int) -> bool:
        if phase == "prefill":
            return computed > 0 and computed + scheduled < len(prompt) and closes_span(LONG_LAYOUT, computed, scheduled)
        return computed >= len(prompt) and closes_span(LONG_LAYOUT, computed, scheduled)

    hit = []

    def during(step_tokens):
        if req_id in step_tokens and is_target(*step_tokens[req_id]) and not hit:
            hit.append(step_tokens[req_id])
            if when == "while the closing step runs":
                # What EngineCore's input thread does with an abort while the model runs.
                core_of(chunked).aborts_queue.put_nowait(engine.output_processor.abort_requests(["closing"], False))

    chunked.tap.during = during
    try:
        while not hit:
            step(chunked)
    finally:
        chunked.tap.during = None
    if when == "right after the closing step":
        assert scheduler_of(chunked).requests[req_id].num_computed_tokens == sum(hit[0])  # the span just closed
        if phase == "decode":
            assert untrimmed_tail(chunked, "closing", LONG_LAYOUT) == 1  # 44 slots held, 5 needed now
        engine.abort_request(["closing"])
    assert req_id not in scheduler_of(chunked).requests
    assert pool_of(chunked).get_num_free_blocks() == usable_blocks(chunked)
    assert not engine.has_unfinished_requests()
    assert_idle(chunked)


@pytest.mark.parametrize("reuse_internal_id", [True, False], ids=["same internal id", "same external id"])
def test_abort_then_resubmit_with_the_same_id(chunked, oracle, request, reuse_internal_id):
    """Aborted mid-decode right after a span closed (spans of 40, its tail not yet trimmed), then
    resubmitted at once with the same id, another prompt and the model's schedule: the scheduler and
    the worker see the id finish and arrive in the same step, and nothing of the old one may stick."""
    if reuse_internal_id:
        request.getfixturevalue("same_internal_ids")
    engine, scheduler = chunked.llm_engine, scheduler_of(chunked)
    first, second = prompt_of(90, seed=4), prompt_of(45, seed=5)
    params = greedy(40, logprobs=1)
    fresh = generate_one(chunked, second, params)
    assert_idle(chunked)

    engine.add_request("again", {"prompt_token_ids": first}, long_spans(40, logprobs=1))
    old_id = internal_id(chunked, "again")
    while True:
        step(chunked)
        computed = scheduler.requests[old_id].num_computed_tokens
        if computed > len(first) and LONG_LAYOUT.num_closed(computed) > LONG_LAYOUT.num_closed(computed - 1):
            break
    assert untrimmed_tail(chunked, "again", LONG_LAYOUT) > 0
    engine.abort_request(["again"])
    engine.add_request("again", {"prompt_token_ids": second}, params)
    assert (internal_id(chunked, "again") == old_id) == reuse_internal_id
    [out] = run_to_end(chunked).values()
    assert_same_completion(out.outputs[0], fresh.outputs[0])
    assert oracle.check(second, out, SCHEDULE) < TOL
    assert_idle(chunked)


# -- stops ---------------------------------------------------------------------------------------
STOP_PROMPT = prompt_of(24, seed=6)
STOP_MAX_TOKENS = 72  # sequence positions 24..95: span ends (last tokens) at 35, 51, 67, 83
# Where the stop token sits in the sequence, relative to the last token t of a span. On t: the
# request ends in the step that computes t - 1, so the span never closes. Right after (t + 1): the
# stop is sampled in the step that computes t, which closes the span (the masked path).
STOP_PLACES = {"mid-span": -8, "on the span's last token": 0, "right after the span closed": 1}


@pytest.fixture(scope="module")
def stop_reference(chunked):
    out = generate_one(chunked, STOP_PROMPT, greedy(STOP_MAX_TOKENS, logprobs=1))
    assert_idle(chunked)
    return out.outputs[0]


def stop_index(reference, place: str, usable) -> int:
    """An output index k, at `place` relative to some span's last token, whose token `usable(k)` takes."""
    for m in range(LAYOUT.num_closed(len(STOP_PROMPT) + STOP_MAX_TOKENS)):
        k = LAYOUT.span_last(m) + STOP_PLACES[place] - len(STOP_PROMPT)
        if 0 < k < STOP_MAX_TOKENS - 1 and usable(k):
            return k
    pytest.fail(f"no usable stop {place} in the reference output")


@pytest.mark.parametrize("place", list(STOP_PLACES))
@pytest.mark.parametrize("how", ["stop_token_ids", "eos", "stop string"])
def test_a_stop_lands_where_the_reference_says(chunked, stop_reference, oracle, monkeypatch, same_internal_ids,
                                              how, place):
    ref_ids = list(stop_reference.token_ids)
    tokenizer = chunked.get_tokenizer()
    renderer = chunked.llm_engine.input_processor.renderer
    tokenizer_eos = renderer.get_eos_token_id
    eos = tokenizer.eos_token_id

    def first_time(k):  # the token at k stops the request there and not earlier
        return ref_ids[k] not in ref_ids[:k] and eos not in ref_ids[: k + 1]

    stop_reason = None
    if how == "stop string":
        def stop_text(k):
            before, after = tokenizer.decode(ref_ids[:k]), tokenizer.decode(ref_ids[: k + 1])
            if eos in ref_ids[: k + 1] or not after.startswith(before) or not after[len(before):].strip() \
                    or "\ufffd" in after[len(before):]:
                return None  # token k adds no clean text
            for size in range(1, len(after) + 1):  # the shortest suffix that first occurs as the suffix
                if after.index(after[-size:]) == len(after) - size and after[-size:].strip():
                    return after[-size:]
            return None

        k = stop_index(stop_reference, place, lambda k: stop_text(k) is not None)
        stop_reason = stop_text(k)
        params = greedy(STOP_MAX_TOKENS, logprobs=1, stop=[stop_reason])
        expected_text = tokenizer.decode(ref_ids[: k + 1])[: -len(stop_reason)]
    else:
        k = stop_index(stop_reference, place, first_time)
        if how == "eos":
            # The model's own EOS (id 1) comes where a random model puts it; make the token the
            # reference emits at k the EOS for this request, as the tokenizer's EOS reaches it.
            monkeypatch.setattr(renderer, "get_eos_token_id", lambda: ref_ids[k])
            params = greedy(STOP_MAX_TOKENS, logprobs=1, ignore_eos=False)
        else:
            stop_reason = ref_ids[k]
            params = greedy(STOP_MAX_TOKENS, logprobs=1, stop_token_ids=[ref_ids[k]])
        # The detokenizer holds back a trailing incomplete UTF-8 character (byte-level BPE), and a
        # stop token ends the request before anything completes it.
        expected_text = tokenizer.decode(ref_ids[:k]).rstrip("\ufffd")
    position = len(STOP_PROMPT) + k
    assert LAYOUT.span_of(np.array([position - STOP_PLACES[place]]))[0] >= 0  # the place is what it says

    out = generate_one(chunked, STOP_PROMPT, params).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_reason
    assert list(out.token_ids) == ref_ids[: k + 1]
    assert out.text == expected_text
    for step_out, step_ref, token in zip(out.logprobs, stop_reference.logprobs, out.token_ids):
        assert abs(step_out[token].logprob - step_ref[token].logprob) < TOL
    assert_idle(chunked)

    # The same request id serves the next request: stop it again, then reuse the id at once.
    chunked.llm_engine.add_request("stopped", {"prompt_token_ids": STOP_PROMPT}, params)
    finished = run_to_end(chunked)
    assert list(finished["stopped"].outputs[0].token_ids) == ref_ids[: k + 1]
    monkeypatch.setattr(renderer, "get_eos_token_id", tokenizer_eos)  # the tokenizer's EOS for the next request
    next_prompt = prompt_of(33, seed=7)
    chunked.llm_engine.add_request("stopped", {"prompt_token_ids": next_prompt}, greedy(30, logprobs=1))
    [out] = run_to_end(chunked).values()
    assert len(out.outputs[0].token_ids) == 30
    assert oracle.check(next_prompt, out, SCHEDULE) < TOL
    assert_idle(chunked)


# -- n > 1, beam search, structured outputs ------------------------------------------------------
def test_n3_greedy_gives_three_copies_of_n1(chunked):
    """vLLM 0.32 refuses n > 1 at temperature 0 ("n must be 1 when using greedy sampling"); top_k=1
    samples greedily at any temperature."""
    prompt = prompt_of(40, seed=8)
    one = generate_one(chunked, prompt, greedy(40, logprobs=1)).outputs[0]
    three = generate_one(chunked, prompt, SamplingParams(n=3, temperature=1.0, top_k=1, max_tokens=40,
                                                         ignore_eos=True, logprobs=1)).outputs
    assert len(three) == 3
    for completion in three:
        assert_same_completion(completion, one)
    assert_idle(chunked)


def test_n3_seeded_sampling_equals_each_seed_alone_and_the_oracle(chunked, oracle):
    """vLLM gives child i of a seeded request the seed `seed + i`. Each child equals that request
    run alone, and the logprobs of the sampled tokens (raw logprobs: before temperature) equal the
    oracle's over the sampled sequence."""
    prompt = prompt_of(40, seed=9)
    params = dict(max_tokens=40, temperature=1.5, ignore_eos=True, logprobs=1)
    children = generate_one(chunked, prompt, SamplingParams(n=3, seed=1234, **params)).outputs
    assert len({tuple(c.token_ids) for c in children}) > 1  # it did sample
    for i, child in enumerate(sorted(children, key=lambda c: c.index)):
        alone = generate_one(chunked, prompt, SamplingParams(seed=1234 + i, **params)).outputs[0]
        assert_same_completion(child, alone)
        reference = oracle.logprobs(prompt + list(child.token_ids), SCHEDULE)
        for step_index, token in enumerate(child.token_ids):
            expected = float(reference[len(prompt) - 1 + step_index, token])
            assert abs(child.logprobs[step_index][token].logprob - expected) < TOL
    assert_idle(chunked)


def oracle_beam_search(oracle, prompt: list[int], width: int, steps: int, eos: int):
    """vLLM's offline beam search (2 * width candidates per beam, scored by cumulative logprob over
    the length), on the oracle's logprobs."""
    beams = [(list(prompt), 0.0)]

    def score(beam):
        tokens, cumulative = beam
        return cumulative / max(len(tokens) - (tokens[-1] == eos), 1)

    for _ in range(steps):
        candidates = []
        for tokens, cumulative in beams:
            last = oracle.logprobs(tokens, SCHEDULE)[-1]
            values, ids = last.topk(2 * width)
            candidates += [(tokens + [int(t)], cumulative + float(v)) for v, t in zip(values, ids)]
        beams = sorted(candidates, key=score, reverse=True)[:width]
    return beams


def test_beam_search_matches_the_oracle(chunked, oracle):
    """Each beam step is a fresh request over the beam's whole sequence (spans close in its
    prefill), so the beams and their scores follow from the oracle's logprobs."""
    prompt, width, steps = prompt_of(30, seed=10), 3, 8
    [result] = chunked.beam_search([{"prompt_token_ids": prompt}],
                                   BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True))
    expected = oracle_beam_search(oracle, prompt, width, steps, chunked.get_tokenizer().eos_token_id)
    sentinels = sentinel_ids(oracle)
    assert len(result.sequences) == width
    for beam, (tokens, cumulative) in zip(result.sequences, expected):
        assert beam.tokens == tokens
        assert not sentinels & set(beam.tokens)
        assert np.isfinite(beam.cum_logprob) and abs(beam.cum_logprob - cumulative) < TOL * steps
        assert all(not sentinels & set(top) for top in beam.logprobs)
    assert_idle(chunked)


def test_structured_output_parses_and_matches_the_schema(chunked):
    """xgrammar (vLLM's default structured-output backend) runs on CPU. Compact JSON so that the
    random model cannot wander off into whitespace; the prompt and output cross span closings."""
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "color", "size"],
              "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                             "size": {"type": "integer", "minimum": 0, "maximum": 99}}}
    params = SamplingParams(max_tokens=60, temperature=0, structured_outputs=StructuredOutputsParams(json=schema))
    # Prompts whose text ends on a whole character: after a prompt ending in an incomplete UTF-8
    # sequence, stock vLLM 0.32's incremental detokenizer puts the whole prompt's text in front of
    # the output's (seen with the stock backend too; not the engine's business).
    tokenizer = chunked.get_tokenizer()
    prompts = []
    for n in (18, 40, 130):
        seed = n
        while tokenizer.decode(prompt_of(n, seed)).endswith("\ufffd"):
            seed += 1000
        prompts.append(prompt_of(n, seed))
    outputs = chunked.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        value = json.loads(completion.text)
        assert set(value) == {"ok", "color", "size"}
        assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue")
        assert isinstance(value["size"], int) and 0 <= value["size"] <= 99
        assert len(out.prompt_token_ids) + len(completion.token_ids) > LAYOUT.span_last(0) + 1  # a span closed
    assert_idle(chunked)


# -- logprobs ------------------------------------------------------------------------------------
def test_prompt_logprobs_and_logprobs_together_match_the_oracle(chunked, oracle):
    """Every returned entry, not only the chosen token's: a 150-token prompt in 64-token chunks, so
    spans close inside prompt chunks, and 40 generated tokens."""
    prompt = prompt_of(150, seed=12)
    out = generate_one(chunked, prompt, greedy(40, logprobs=5, prompt_logprobs=5))
    completion = out.outputs[0]
    reference = oracle.logprobs(prompt + list(completion.token_ids), SCHEDULE)
    assert out.prompt_logprobs[0] is None
    rows = [(index - 1, top) for index, top in enumerate(out.prompt_logprobs) if index] + \
           [(len(prompt) - 1 + i, top) for i, top in enumerate(completion.logprobs)]
    assert len(rows) == len(prompt) - 1 + 40
    for row, top in rows:
        assert not sentinel_ids(oracle) & set(top)
        best = set(reference[row].topk(5).indices.tolist())
        assert best <= set(top) and len(top) <= 6  # the top 5, plus the actual token when it is not among them
        for token, logprob in top.items():
            assert abs(logprob.logprob - float(reference[row, token])) < TOL
            if token in best:
                assert logprob.rank == int((reference[row] > reference[row, token]).sum()) + 1
    assert oracle.check(prompt, out, SCHEDULE) < TOL
    assert_idle(chunked)


def test_full_vocabulary_logprobs_hold_no_sentinel(chunked, oracle):
    """`logprobs=-1` / `prompt_logprobs=-1` (the engine allows them: max_logprobs=-1) return every
    real token, each equal to the oracle, and no sentinel: sentinels are not part of the vocabulary
    a client sees, and their -inf entries would break clients that sum or exponentiate the dict."""
    prompt = prompt_of(24, seed=13)
    out = generate_one(chunked, prompt, greedy(4, logprobs=-1, prompt_logprobs=-1, detokenize=False))
    completion = out.outputs[0]
    reference = oracle.logprobs(prompt + list(completion.token_ids), SCHEDULE)
    vocab = reference.shape[1]
    rows = [(index - 1, top) for index, top in enumerate(out.prompt_logprobs) if index] + \
           [(len(prompt) - 1 + i, top) for i, top in enumerate(completion.logprobs)]
    for row, top in rows:
        assert not sentinel_ids(oracle) & set(top), "a sentinel id in a full-vocabulary logprob dict"
        assert set(top) == set(range(vocab)) - sentinel_ids(oracle)
        tokens = torch.tensor(list(top))
        got = torch.tensor([top[t].logprob for t in top.keys()])
        assert torch.isfinite(got).all()
        assert (got - reference[row, tokens]).abs().max() < TOL
    assert_idle(chunked)


# -- bf16, torch.compile -------------------------------------------------------------------------
# bf16 keeps 8 bits of mantissa: every activation carries a relative error of ~2^-9 and the logits
# of this sharp model (|logit| up to ~50) absolute errors of tenths, largest on the improbable
# prompt tokens. An oracle in bf16 would not help: its rounding differs from the engine's (other
# kernels, other summation orders), so two bf16 runs differ by as much as either differs from fp32.
# The sound reference is the exact one, the fp32 oracle, teacher-forced on the engine's *own* tokens
# (a near-tie that flips a greedy token in bf16 does not derail the comparison afterwards), and the
# sound tolerance is stock vLLM's own bf16 error on the same tokens: the same engine serving the same
# prompts with compression off (CPU_ATTN, as stock vLLM serves them) against the fp32 dense pass.
# - the sentinel engine's worst logprob error is within BF16_SLACK x stock's (plus a small floor);
# - each greedy token is the oracle's argmax or within a near-tie of it;
# - the check can fail: the same logprobs against the oracle with no compression (the wrong
#   semantics) miss by far more than the tolerance.
BF16_SLACK = 2.0


def bf16_errors(llm, oracle, prompts, schedule, **extra):
    """Worst |engine - fp32 oracle| over prompt and generated logprobs; worst greedy-token deficit."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           greedy(40, logprobs=1, prompt_logprobs=1, **extra), use_tqdm=False)
    worst, wrong, deficit = 0.0, 0.0, 0.0
    for prompt, out in zip(prompts, outputs):
        tokens = list(out.outputs[0].token_ids)
        reference = oracle.logprobs(prompt + tokens, schedule)
        uncompressed = oracle.logprobs(prompt + tokens, None)
        got = [(index - 1, prompt[index], out.prompt_logprobs[index][prompt[index]].logprob)
               for index in range(1, len(prompt))]
        got += [(len(prompt) - 1 + i, t, out.outputs[0].logprobs[i][t].logprob) for i, t in enumerate(tokens)]
        for row, token, logprob in got:
            worst = max(worst, abs(logprob - float(reference[row, token])))
            wrong = max(wrong, abs(logprob - float(uncompressed[row, token])))
        for i, token in enumerate(tokens):
            row = reference[len(prompt) - 1 + i]
            deficit = max(deficit, float(row.max() - row[token]))
    return worst, wrong, deficit


def test_bf16_matches_the_fp32_oracle_as_closely_as_stock_bf16_does(bf16, oracle):
    prompts = [prompt_of(n, seed=14 + n) for n in (24, 150)]
    stock, _, stock_deficit = bf16_errors(bf16, oracle, prompts, None, extra_args={"sentinel": {"enabled": False}})
    tolerance = BF16_SLACK * stock + 0.05
    worst, wrong, deficit = bf16_errors(bf16, oracle, prompts, SCHEDULE)
    assert worst < tolerance, f"bf16 sentinel error {worst:.3f} vs stock bf16 {stock:.3f}"
    assert deficit < tolerance  # greedy tokens: the argmax, or a near-tie within rounding
    assert wrong > 10 * tolerance, "the bf16 tolerance cannot tell a broken mask from rounding"
    assert_idle(bf16)


COMPILE_PROMPTS = [prompt_of(n, seed=20 + n) for n in (3, 24, 150, 400)]


def test_compiled_equals_eager_and_the_oracle(compiled, whole, oracle):
    from vllm.config import CompilationMode

    assert compiled.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    assert whole.llm_engine.vllm_config.compilation_config.mode == CompilationMode.NONE
    params = greedy(24, logprobs=1, prompt_logprobs=1)
    batch = [{"prompt_token_ids": p} for p in COMPILE_PROMPTS]
    got = compiled.generate(batch, params, use_tqdm=False)
    expected = whole.generate(batch, params, use_tqdm=False)
    for prompt, ours, theirs in zip(COMPILE_PROMPTS, got, expected):
        assert_same_completion(ours.outputs[0], theirs.outputs[0])
        for index in range(1, len(prompt)):
            token = prompt[index]
            assert abs(ours.prompt_logprobs[index][token].logprob - theirs.prompt_logprobs[index][token].logprob) < TOL
        assert oracle.check(prompt, ours, SCHEDULE) < TOL
    assert_idle(compiled)
    assert_idle(whole)


# -- a prompt of max_model_len - 1 ---------------------------------------------------------------
@pytest.mark.parametrize("engine", ["whole", "compiled"])
def test_a_prompt_of_max_model_len_minus_one_in_one_chunk(request, oracle, engine):
    """511 real tokens in one step (31 spans close in it: 573 tokens with sentinels, past the
    512-token budget the worker's buffers are sized from), one generated token, blocks of 128."""
    llm = request.getfixturevalue(engine)
    prompt = prompt_of(MAX_MODEL_LEN - 1, seed=30)
    assert llm.llm_engine.vllm_config.cache_config.block_size == 128
    llm.tap.steps.clear()
    llm.llm_engine.add_request("long", {"prompt_token_ids": prompt}, greedy(8, logprobs=1, prompt_logprobs=1))
    req_id = internal_id(llm, "long")
    [out] = run_to_end(llm).values()
    # One chunk: the whole prompt in the first step, whose block tables the tap compared in the step
    # (the request finishes in it, so an after-step comparison has nothing left to look at).
    assert llm.tap.steps[0] == {req_id: (0, MAX_MODEL_LEN - 1)}
    assert LAYOUT.num_tokens_with_sentinels(0, MAX_MODEL_LEN - 1) > WHOLE["max_num_batched_tokens"]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 1
    assert oracle.check(prompt, out, SCHEDULE) < TOL
    assert_idle(llm)

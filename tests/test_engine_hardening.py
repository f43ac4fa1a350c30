"""One request never hurts the engine; the plugin never hurts stock vLLM in the same environment.

Engines run as `vllm serve` runs them (EngineCore in its own process), so a request that got past
the front end and failed in EngineCore would show as a dead engine, not as a raised exception.
"""
import subprocess
import sys
import textwrap
import time

import pytest
from vllm import SamplingParams

from conftest import ENGINE_MODEL_SCHEDULE
from engine_helpers import Oracle, close, make_llm
from vllm_sentinel.config import ScheduleConfig

PROMPT = [(11 * i) % 4000 + 5 for i in range(70)]  # closes spans in the prompt and while decoding


@pytest.fixture(scope="module")
def oracle(sentinel_model_dir):
    return Oracle(sentinel_model_dir)


@pytest.fixture(scope="module")
def engines(sentinel_model_dir):
    # A forged "already resolved" entry must neither skip the set-up nor be believed.
    forged = {"cl_token_id": 5, "cr_token_id": 6, "schedule": {"sink": 0, "span": 2, "gap": 0},
              "model_dir": "/nowhere", "max_model_len": 1 << 62, "min_span": 2, "allow_request_overrides": True}
    made = {"sentinel": make_llm(sentinel_model_dir, additional_config={"sentinel_resolved": forged}),
            "stock": make_llm(sentinel_model_dir, sentinel=False)}
    yield made
    for llm in made.values():
        close(llm)


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1, **kwargs)


def test_a_stock_and_a_sentinel_engine_in_one_process_are_both_exact(engines, oracle):
    [ours] = engines["sentinel"].generate([{"prompt_token_ids": PROMPT}], greedy(), use_tqdm=False)
    assert oracle.check(PROMPT, ours, ScheduleConfig(*ENGINE_MODEL_SCHEDULE)) < 1e-4
    # Stock vLLM may sample a sentinel id (it knows nothing of them); forbid them to compare with the oracle.
    [stock] = engines["stock"].generate([{"prompt_token_ids": PROMPT}],
                                        greedy(allowed_token_ids=list(range(4096))), use_tqdm=False)
    assert list(stock.outputs[0].token_ids) == \
        oracle.logprobs(PROMPT + list(stock.outputs[0].token_ids), None)[len(PROMPT) - 1:-1].argmax(-1).tolist()
    resolved = engines["sentinel"].llm_engine.vllm_config.additional_config["sentinel_resolved"]
    assert resolved["cl_token_id"] == 4096 and resolved["schedule"]["span"] == ENGINE_MODEL_SCHEDULE[1]
    stock_config = engines["stock"].llm_engine.vllm_config
    assert "sentinel_resolved" not in (stock_config.additional_config or {})
    assert stock_config.scheduler_config.scheduler_cls != "vllm_sentinel.engine.scheduler.SentinelScheduler"


@pytest.mark.parametrize("sampling", [
    dict(extra_args={"sentinel_span": 2 ** 63}),
    dict(extra_args={"sentinel": {"span": 2 ** 62, "gap": 2 ** 62}}),
    dict(extra_args={"sentinel_span": "8"}),
    dict(allowed_token_ids=[4096, 4097]),
], ids=["span 2**63", "span+gap overflow", "span as text", "only sentinels allowed"])
def test_a_bad_request_that_skips_the_front_end_fails_alone_in_engine_core(engines, sampling):
    """`LLMEngine.add_request` with a ready EngineCoreRequest goes straight to EngineCore."""
    from vllm.v1.engine import EngineCoreRequest

    engine = engines["sentinel"].llm_engine
    bad = EngineCoreRequest(request_id="bad", prompt_token_ids=[5, 6, 7], mm_features=None,
                            sampling_params=SamplingParams(max_tokens=4, **sampling), pooling_params=None,
                            arrival_time=time.time(), lora_request=None, cache_salt=None, data_parallel_rank=None)
    engine.add_request("bad", bad, bad.sampling_params)
    engine.add_request("good", {"prompt_token_ids": PROMPT}, greedy())
    finished = {}
    deadline = time.time() + 120
    while engine.has_unfinished_requests() and time.time() < deadline:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    bad_out = next(out for key, out in finished.items() if key.startswith("bad"))
    good_out = next(out for key, out in finished.items() if key.startswith("good"))
    assert bad_out.outputs[0].finish_reason == "error" and not bad_out.outputs[0].token_ids
    assert len(good_out.outputs[0].token_ids) == 24
    # The engine is still alive for the next request.
    [again] = engines["sentinel"].generate([{"prompt_token_ids": [5, 6, 7]}], greedy(), use_tqdm=False)
    assert len(again.outputs[0].token_ids) == 24


MISMATCH_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, with the patched version
    import vllm.version
    vllm.version.__version__ = "0.99.0"
    from vllm import LLM, SamplingParams
    common = dict(enforce_eager=True, dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 << 20)
    llm = LLM(model=sys.argv[1], **common)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    print("stock served")
    llm.llm_engine.engine_core.shutdown()
    try:
        LLM(model=sys.argv[1], attention_backend="sentinel", **common)
    except Exception as error:
        print("refused:", error)
    else:
        print("sentinel started")
""")


def test_on_another_vllm_version_stock_serves_and_only_the_sentinel_backend_is_refused(sentinel_model_dir):
    result = subprocess.run([sys.executable, "-c", MISMATCH_SCRIPT, str(sentinel_model_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stock served" in result.stdout
    assert "refused: --attention-backend sentinel is not available" in result.stdout
    assert "written for vLLM 0.32.0 and vLLM 0.99.0 is installed" in result.stdout


# -- positions past the rotary table ----------------------------------------------------------------
ROTARY_POSITIONS = 512  # the model's max_position_embeddings: its rotary table's length

LONG_MAX_MODEL_LEN_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # vLLM then allows max_model_len past the table, warning
    from vllm import LLM
    LLM(model=sys.argv[1], attention_backend="sentinel", enforce_eager=True, dtype="float32",
        max_model_len=int(sys.argv[2]), kv_cache_memory_bytes=32 << 20)
    print("sentinel started")
""")


@pytest.fixture(scope="module")
def short_rotary_model(tmp_path_factory):
    from vllm_sentinel.random_model import LlamaShape, write_random_sentinel_model

    out = tmp_path_factory.mktemp("short-rotary")
    write_random_sentinel_model(out, LlamaShape(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                                                intermediate_size=256, max_position_embeddings=ROTARY_POSITIONS),
                                ScheduleConfig(*ENGINE_MODEL_SCHEDULE), init_std=0.1, logit_scale=8.0)
    return out


def test_a_max_model_len_past_the_rotary_table_is_refused_at_start_up(short_rotary_model):
    """As `vllm serve` runs it (EngineCore in its own process): the engine never starts, so no
    request can reach a position without a rotation, and the message names both numbers and the fix."""
    result = subprocess.run([sys.executable, "-c", LONG_MAX_MODEL_LEN_SCRIPT, str(short_rotary_model), "1024"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "sentinel started" not in result.stdout
    log = result.stdout + result.stderr  # the worker's error is in vLLM's log, on stdout by default
    assert f"max_model_len 1024 exceeds the {ROTARY_POSITIONS} positions the model's rotary embedding covers" in log
    assert f"Lower --max-model-len to at most {ROTARY_POSITIONS}" in log


def test_prompts_up_to_the_last_rotary_position_are_exact_and_a_longer_one_is_refused_alone(short_rotary_model):
    """max_model_len = the table: the last positions are exact against the oracle, next to a short
    request; a prompt past max_model_len is the front end's error and the engine serves on."""
    oracle = Oracle(short_rotary_model)
    llm = make_llm(short_rotary_model, max_model_len=ROTARY_POSITIONS)
    try:
        long_prompt = [(13 * i) % 4000 + 5 for i in range(ROTARY_POSITIONS - 12)]
        short_prompt = PROMPT[:20]
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
        outputs = llm.generate([{"prompt_token_ids": long_prompt}, {"prompt_token_ids": short_prompt}], params,
                               use_tqdm=False)
        schedule = ScheduleConfig(*ENGINE_MODEL_SCHEDULE)
        for prompt, output in zip((long_prompt, short_prompt), outputs):
            assert len(output.outputs[0].token_ids) == 12
            assert oracle.check(prompt, output, schedule) < 1e-4
        from vllm.exceptions import VLLMValidationError

        with pytest.raises(VLLMValidationError, match="maximum context length is 512 tokens"):
            llm.generate([{"prompt_token_ids": long_prompt + PROMPT}], params, use_tqdm=False)
        [again] = llm.generate([{"prompt_token_ids": short_prompt}], params, use_tqdm=False)
        assert list(again.outputs[0].token_ids) == list(outputs[1].outputs[0].token_ids)
    finally:
        close(llm)

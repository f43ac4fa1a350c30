"""The sentinel engine in vLLM equals the dense masked forward (the oracle), token for token.

Two engines shared by the module: one whose 64-token step budget cuts every long prompt into many
chunks, one that takes whole prompts and overrides the model's schedule server-wide. Requests
choose their schedule through `SamplingParams.extra_args`. fp32 on CPU.
"""
import random

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from conftest import ENGINE_MODEL_SCHEDULE, SCHEDULES
from engine_helpers import LOGPROB_TOLERANCE, Oracle, close, make_llm, schedule_args
from vllm_sentinel.config import ScheduleConfig

SERVER_OVERRIDE = (4, 8, 2)  # --additional-config '{"sentinel": {"span": 8, "gap": 2}}'
MAX_TOKENS = 20


def random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 600] + [rng.randint(1, 600) for _ in range(count - 3)]
    return [[rng.randrange(3, 4096) for _ in range(n)] for n in lengths]


PROMPTS = random_prompts(24)
# Each request's schedule: the four of the issue, and None (the engine's default) for every fifth.
REQUEST_SCHEDULES = [None if i % 5 == 4 else SCHEDULES[i % 4] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def oracle(sentinel_model_dir):
    return Oracle(sentinel_model_dir)


@pytest.fixture(scope="module")
def engines(sentinel_model_dir):
    chunked = make_llm(sentinel_model_dir, max_num_batched_tokens=64, max_num_seqs=16)
    whole = make_llm(sentinel_model_dir, max_num_batched_tokens=2048, max_num_seqs=16,
                     additional_config={"sentinel": {"span": SERVER_OVERRIDE[1], "gap": SERVER_OVERRIDE[2]}})
    yield {"chunked": (chunked, ENGINE_MODEL_SCHEDULE), "whole": (whole, SERVER_OVERRIDE)}
    close(chunked)
    close(whole)


def params(schedule, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=1,
                          extra_args=schedule_args(schedule), **kwargs)


def effective(schedule, engine_default) -> ScheduleConfig:
    return ScheduleConfig(*(schedule or engine_default))


@pytest.mark.parametrize("engine", ["chunked", "whole"])
def test_a_mixed_batch_matches_the_oracle(engines, oracle, engine):
    llm, default = engines[engine]
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           [params(s, prompt_logprobs=1) for s in REQUEST_SCHEDULES], use_tqdm=False)
    worst = max(oracle.check(p, out, effective(s, default))
                for p, s, out in zip(PROMPTS, REQUEST_SCHEDULES, outputs))
    assert worst < LOGPROB_TOLERANCE


def test_one_request_at_a_time_matches_the_oracle(engines, oracle):
    llm, default = engines["chunked"]
    for prompt, schedule in list(zip(PROMPTS, REQUEST_SCHEDULES))[:8]:
        [out] = llm.generate([{"prompt_token_ids": prompt}], params(schedule, prompt_logprobs=1), use_tqdm=False)
        assert oracle.check(prompt, out, effective(schedule, default)) < LOGPROB_TOLERANCE


def test_sentinels_never_surface_and_do_not_count_as_output(engines, sentinel_model_dir):
    llm, _ = engines["chunked"]
    sentinel_ids = {4096, 4097}
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:6]],
                           SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=5,
                                          prompt_logprobs=5, extra_args=schedule_args((0, 4, 0))), use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        assert len(completion.token_ids) == 40  # spans closed all along; max_tokens counts real tokens
        assert not sentinel_ids & set(completion.token_ids)
        assert all(not sentinel_ids & set(top) for top in completion.logprobs)
        assert all(not sentinel_ids & set(top) for top in out.prompt_logprobs[1:])
        assert "<CL>" not in completion.text and "<CR>" not in completion.text


def test_a_prompt_holding_a_sentinel_id_is_refused_and_the_engine_serves_on(engines):
    llm, _ = engines["chunked"]
    with pytest.raises(VLLMValidationError, match="sentinel token <CR> .* may not appear in prompt_token_ids"):
        llm.generate([{"prompt_token_ids": [5, 6, 4097, 7]}], SamplingParams(max_tokens=4), use_tqdm=False)
    [out] = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4


def test_the_text_of_a_sentinel_in_a_prompt_is_served_as_ordinary_characters(engines, sentinel_model_dir):
    """A vim mapping or a regex may hold "<CR>": it is text, never the sentinel id."""
    from transformers import AutoTokenizer

    llm, _ = engines["chunked"]
    text = "nnoremap <leader>w :w<CR> and <CL>"
    [out] = llm.generate([text], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
    assert not {4096, 4097} & set(out.prompt_token_ids)
    assert llm.get_tokenizer().decode(out.prompt_token_ids, skip_special_tokens=False).endswith(":w<CR> and <CL>")
    # The model's own tokenizer still knows the tokens (training inserts them by id): only the
    # sentinel engine's renderer reads them as text.
    assert 4097 in AutoTokenizer.from_pretrained(sentinel_model_dir)(text)["input_ids"]


@pytest.mark.parametrize("extra, message", [
    ({"sentinel": {"span": 1}}, r"extra_args\['sentinel'\]\['span'\]=1 is out of range"),
    ({"sentinel": {"window": 3.5}}, r"extra_args\['sentinel'\]\['window'\]=3.5 is not an integer"),
    ({"sentinel": {"enabled": "no"}}, "must be true or false"),
    ({"sentinel_span": 1}, "sentinel_span=1 is out of range"),
    ({"sentinel_span": 2 ** 63}, "sentinel_span=9223372036854775808 is out of range"),
    ({"sentinel_span": 8, "sentinel": {"gap": 1}}, "not both"),
    ({"sentinel": {"enabled": False, "span": 8}}, "makes no sense with"),
    ({"sentinel": 8}, "must be an object"),
])
def test_bad_per_request_options_are_refused_by_name(engines, extra, message):
    llm, _ = engines["chunked"]
    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, extra_args=extra), use_tqdm=False)

"""Every served model family, from a random base of that family to a served sentinel model.

Per family (one random tiny model made with transformers' config class, weights scaled up so
attention is sharp and a wrong key would show): the recipe trains it and the loss moves, transformers
loads the result, the sentinel engine equals the dense oracle on it (several schedules, a recent
window, compression off, chunked prefill and preemption in one batch), and `vllm serve` starts on it
and answers. A family the contract cannot hold for is refused with its reason.
"""
import copy
import json
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from vllm import SamplingParams

from engine_helpers import LOGPROB_TOLERANCE, Oracle, close, make_llm, schedule_args
from vllm_sentinel.config import ScheduleConfig
from vllm_sentinel.random_model import FAMILIES, LlamaShape, corpus_tokenizer, write_random_sentinel_model
from vllm_sentinel.training.corpus import DEFAULT_CORPUS, corpus_streams
from vllm_sentinel.training.recipe import TrainConfig, load_base, lora_targets, train

TRAINED_SCHEDULE = ScheduleConfig(4, 8, 0, 8)
# (prompt length, schedule, tokens to generate) per request: the model's schedule, others, a window,
# and compression off (None), whose long generations outgrow the pool together.
REQUESTS = [(1, (4, 8, 0, 8), 16), (37, (2, 5, 3, 0), 16), (260, (0, 4, 0, 6), 16), (300, (4, 16, 0, 0), 16),
            (60, None, 200), (70, None, 200)]


@pytest.fixture(scope="module")
def tokenizer():
    return corpus_tokenizer(4096)


@pytest.fixture(scope="module")
def streams(tokenizer):
    train_ids, heldout_ids = corpus_streams(str(DEFAULT_CORPUS / "tutorial"), tokenizer)
    return train_ids, heldout_ids


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory, tokenizer, streams):
    """(family, model dir, training log): a random base of the family through the recipe."""
    family = request.param
    base = tmp_path_factory.mktemp(f"{family}-base")
    write_random_sentinel_model(base, LlamaShape(max_position_embeddings=1024), init_std=0.1, logit_scale=8.0,
                                tokenizer=copy.deepcopy(tokenizer), family=family, sentinels=False)
    model, base_tokenizer = load_base(base)
    out = tmp_path_factory.mktemp(f"{family}-sentinel")
    config = TrainConfig(schedule=TRAINED_SCHEDULE, seq_len=64, batch_size=2, steps=6, warmup=1, eval_every=3,
                         eval_tokens=512, checkpoint_every=100)
    state = train(model, base_tokenizer, *streams, config, out)
    return family, out, state


def test_the_recipe_trains_every_family(trained):
    family, out, state = trained
    first, last = state["log"][0], state["log"][-1]
    assert last["heldout_ppl"] != first["heldout_ppl"] and last["train_loss"] != first["train_loss"]
    model, tokenizer = load_base(out)  # transformers loads the merged result
    assert model.config.model_type == family
    sentinel = json.loads((out / "sentinel_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids(["<CL>", "<CR>"]) == [sentinel["cl_token_id"], sentinel["cr_token_id"]]
    assert model.get_input_embeddings().weight.shape[0] >= sentinel["cr_token_id"] + 1
    # LoRA went on the family's own attention projections, fused or not
    leaves = {name.rsplit(".", 1)[-1] for name in lora_targets(model)}
    expected = {"phi3": {"qkv_proj", "o_proj"}, "gpt_neox": {"query_key_value", "dense"},
                "opt": {"q_proj", "k_proj", "v_proj", "out_proj"}}.get(family, {"q_proj", "k_proj", "v_proj", "o_proj"})
    assert leaves == expected


def test_the_engine_equals_the_oracle_for_every_family(trained):
    from vllm_sentinel.observe import run_workload

    family, out, _ = trained
    oracle = Oracle(out)  # before the engine: the Transformers backend decorates Hugging Face classes in-process
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 4000) for _ in range(n)] for n, _, _ in REQUESTS]
    schedules = [s for _, s, _ in REQUESTS]
    # 64 real tokens per step cut prompts into chunks; 14 blocks of 32 cannot hold both uncompressed requests.
    llm = make_llm(out, max_model_len=320, max_num_batched_tokens=64, max_num_seqs=8, block_size=32, num_gpu_blocks_override=14,
                   disable_log_stats=False)
    try:
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1,
                                 extra_args=({"sentinel": {"enabled": False}} if s is None else schedule_args(s)))
                  for _, s, n in REQUESTS]
        record = run_workload(llm, prompts, params)
    finally:
        close(llm)
    assert record.preemptions > 0
    worst = max(oracle.check(p, o, ScheduleConfig(*s) if s else None)
                for p, o, s in zip(prompts, record.outputs, schedules))
    assert worst < LOGPROB_TOLERANCE, family


def test_vllm_serve_starts_on_every_family_and_answers(trained, tmp_path):
    from vllm_sentinel.bench.serve import free_port, wait_until_healthy

    family, out, _ = trained
    port = free_port()
    log = tmp_path / "serve.log"
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(out), "--attention-backend", "sentinel",
               "--enforce-eager", "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes", "64M",
               "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(server, f"http://127.0.0.1:{port}/health", log)
        body = json.dumps({"model": str(out), "prompt": "To open a file,", "max_tokens": 24, "ignore_eos": True})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert answer["usage"]["completion_tokens"] == 24
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.parametrize("model_type, reason", [("gemma2", "sliding-window"), ("mamba", "state-space"),
                                                ("bloom", "ALiBi"), ("bert", "has not been checked")])
def test_a_family_the_contract_cannot_hold_for_is_refused_with_its_reason(model_type, reason):
    from vllm_sentinel.families import refusal

    message = refusal(model_type)
    assert reason in message and "Supported: " in message and "smollm3" in message

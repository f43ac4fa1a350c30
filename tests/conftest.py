import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_sentinel.config import ScheduleConfig, SentinelConfig


def pytest_configure(config):
    """Under pytest-xdist (README's test command runs `-n auto`), each worker's engines compute on
    cores of their own. vLLM binds a multiprocess engine's model threads to the first core it finds,
    so without this every worker's engines would share core 0 while the other cores wait."""
    from vllm_sentinel.batch import _thread_binding

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    try:  # the cores shared out as between tensor-parallel ranks
        shares = _thread_binding(int(os.environ["PYTEST_XDIST_WORKER_COUNT"])).split("|")
    except ValueError:  # more workers than cores: nothing to share out
        return
    mine = shares[int(worker.removeprefix("gw"))]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = mine
    torch.set_num_threads(len(mine.split(",")))  # the oracle's forwards and in-process engines too


# The schedules the issues name: (sink, span, gap).
SCHEDULES = [(0, 4, 0), (4, 16, 0), (2, 8, 3), (1, 25, 5)]


def tiny_llama(vocab_size: int = 130, seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def sentinel_config(schedule: tuple[int, int, int], vocab_size: int = 130) -> SentinelConfig:
    return SentinelConfig(cl_token_id=vocab_size - 2, cr_token_id=vocab_size - 1,
                          schedule=ScheduleConfig(*schedule))


@pytest.fixture(scope="session")
def random_llama() -> LlamaForCausalLM:
    return tiny_llama()


# -- engine tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def in_process_engines():
    """EngineCore in the test process, so tests can step the engine and read its scheduler and pool.

    (vLLM caches its environment once an in-process engine starts, so later modules may stay in
    process too; the engines behave the same either way.)"""
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    yield
    if previous is None:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


# A random Llama with the sentinel tokens, head size 64 (what vLLM's CPU attention takes) and sharp
# output distributions, so greedy tokens compared across implementations have clear winners.
ENGINE_MODEL_SCHEDULE = (4, 16, 0)


@pytest.fixture(scope="session")
def sentinel_model_dir(tmp_path_factory):
    from vllm_sentinel.random_model import LlamaShape, write_random_sentinel_model

    out = tmp_path_factory.mktemp("sentinel-model")
    write_random_sentinel_model(out, LlamaShape(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                                                intermediate_size=256),
                                ScheduleConfig(*ENGINE_MODEL_SCHEDULE), init_std=0.1, logit_scale=8.0)
    return out


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory):
    """A small Llama with a corpus tokenizer and no sentinel tokens: what users start from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_sentinel.random_model import corpus_tokenizer

    out = tmp_path_factory.mktemp("base")
    tokenizer = corpus_tokenizer(4096)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

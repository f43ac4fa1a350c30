import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_sentinel.config import ScheduleConfig, SentinelConfig

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

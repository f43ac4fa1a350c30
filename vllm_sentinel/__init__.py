"""vllm-sentinel: sentinel-token context compression (Ren, Jia & Zhu, EMNLP 2023) for vLLM.

Data flow: config -> schedule -> masks -> (training | engine) -> benchmarks.
Exports are lazy: vLLM imports this package in every process it starts (the plugin entry point),
and most of those processes never need transformers or peft.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "SentinelConfig": "config", "ScheduleConfig": "config", "SentinelConfigError": "config", "Regions": "config",
    "ScheduledSpans": "schedule", "MarkedSpans": "schedule", "JitteredSpans": "schedule", "RandomSpans": "schedule",
    "RandomRegions": "schedule", "marked_chat": "engine.marked_messages",
    "build_stream": "masks", "SentinelStream": "masks",
    "local_attention_mask": "masks", "scattered_attention_mask": "masks",
    "dense_logits": "oracle", "IncrementalSentinelLM": "oracle",
    "TrainConfig": "training.recipe", "train": "training.recipe",
    "perplexity": "training.evaluate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'vllm_sentinel' has no attribute {name!r}")

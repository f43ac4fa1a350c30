"""Shared by the engine tests: building engines the same way, and checking them against the oracle."""
from __future__ import annotations

import gc

import torch

from vllm_sentinel.config import Regions, ScheduleConfig, SentinelConfig
from vllm_sentinel.oracle import dense_logits, mask_sentinels
from vllm_sentinel.schedule import MarkedSpans, ScheduledSpans

ENGINE_DEFAULTS = dict(enforce_eager=True, dtype="float32", seed=0, max_model_len=1024,
                       kv_cache_memory_bytes=64 << 20)
LOGPROB_TOLERANCE = 1e-4  # fp32: the engine sits at the ~2e-6 noise floor of stock vLLM


def make_llm(model_dir, sentinel: bool = True, **overrides):
    from vllm import LLM

    kwargs = {**ENGINE_DEFAULTS, **overrides}
    if sentinel:
        kwargs["attention_backend"] = "sentinel"
    return LLM(model=str(model_dir), **kwargs)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def scheduler_of(llm):
    """The scheduler of an engine whose EngineCore runs in this process (`in_process_engines`)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def schedule_args(schedule: tuple[int, ...] | None) -> dict | None:
    """`SamplingParams.extra_args` choosing a schedule (None: the engine's default)."""
    if schedule is None:
        return None
    return {"sentinel": dict(zip(("sink", "span", "gap", "window"), schedule))}


class Oracle:
    """The dense masked forward of the semantics page, on transformers, for one model directory."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM

        self.config = SentinelConfig.load(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(self, token_ids: list[int], schedule: ScheduleConfig | None,
                 regions: Regions | None = None) -> torch.Tensor:
        """`[n, vocab]` log-probabilities after each token, sentinels masked as the engine masks them.

        The spans are those closed by the tokens the engine computed (all but the last): the
        schedule's, or those of the request's marked regions.
        """
        if schedule is None:
            spans = torch.zeros(0, 2, dtype=torch.long)
        else:
            rule = ScheduledSpans(schedule) if regions is None else MarkedSpans(schedule, regions)
            spans = rule.spans(len(token_ids) - 1)
        logits = dense_logits(self.model, token_ids, spans, self.config, window=schedule.window if schedule else 0)
        return torch.log_softmax(mask_sentinels(logits, self.config), dim=-1)

    def check(self, prompt: list[int], output, schedule: ScheduleConfig | None, regions: Regions | None = None) -> float:
        """Assert the engine's greedy tokens are the oracle's; return the worst logprob difference."""
        generated = list(output.outputs[0].token_ids)
        reference = self.logprobs(prompt + generated, schedule, regions)
        expected = reference[len(prompt) - 1: -1].argmax(-1).tolist()
        assert generated == expected, f"greedy tokens differ from the oracle (schedule {schedule}, prompt of {len(prompt)})"
        worst = 0.0
        for step, token in enumerate(generated):
            engine = output.outputs[0].logprobs[step][token].logprob
            worst = max(worst, abs(engine - float(reference[len(prompt) - 1 + step, token])))
        if output.prompt_logprobs is not None:
            assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
            for index in range(1, len(prompt)):
                engine = output.prompt_logprobs[index][prompt[index]].logprob
                worst = max(worst, abs(engine - float(reference[index - 1, prompt[index]])))
        return worst

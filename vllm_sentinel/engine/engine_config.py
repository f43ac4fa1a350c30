"""Turning a vLLM config into a sentinel engine: the one place `--attention-backend sentinel` acts.

Runs in the front end while vLLM finalises its config (the platform's `check_and_update_config`),
before the config is pickled to EngineCore and the workers; everything set here is plain data
and reaches every process.
"""
from __future__ import annotations

import os

from vllm.logger import init_logger

from .settings import KEY, RESOLVED_KEY, EngineSettings

logger = init_logger("vllm.sentinel")

BACKEND_PATH = "vllm_sentinel.engine.backend.SentinelAttentionBackend"
SCHEDULER_PATH = "vllm_sentinel.engine.scheduler.SentinelScheduler"
WORKER_PATHS = {"cpu": "vllm_sentinel.engine.worker.SentinelCPUWorker"}


def sentinel_selected(vllm_config) -> bool:
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    return (vllm_config.attention_config.backend is AttentionBackendEnum.CUSTOM
            and _ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM) == BACKEND_PATH)


def settings_of(vllm_config) -> EngineSettings | None:
    """The engine's resolved sentinel settings, None when the sentinel backend is not in use.

    Both conditions: a stock engine whose additional_config happens to hold our key stays stock."""
    data = (vllm_config.additional_config or {}).get(RESOLVED_KEY)
    if not isinstance(data, dict) or not sentinel_selected(vllm_config):
        return None
    return EngineSettings.from_json(data)


def refuse_incompatible(vllm_config) -> None:
    """Options the sentinel engine cannot honour, each refused with the way out."""
    from ..families import refusal

    model, cache, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    device = vllm_config.device_config.device_type
    problems = []
    if device not in WORKER_PATHS:
        problems.append(f"the {device} platform (this release runs the sentinel engine on CPU)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding (drop --speculative-config)")
    if parallel.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism (use --tensor-parallel-size instead)")
    if vllm_config.lora_config is not None:
        problems.append("LoRA adapters (merge the adapter into the model first)")
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV transfer connectors (drop --kv-transfer-config)")
    if model.enable_prompt_embeds:
        problems.append("prompt embeddings (drop --enable-prompt-embeds)")
    if model.runner_type != "generate":
        problems.append(f"the {model.runner_type} runner (pooling and embedding models; the sentinel engine "
                        "serves text generation)")
    if model.is_multimodal_model:
        problems.append("multimodal models")
    reason = refusal(model.hf_config.model_type)
    if reason is not None:
        problems.append(reason)
    window = getattr(model.hf_text_config, "sliding_window", None)
    if window and getattr(model.hf_text_config, "use_sliding_window", True):  # Qwen's and SmolLM3's switch
        problems.append(f"sliding-window attention over {window} tokens (every layer must see the whole context; "
                        "--disable-sliding-window serves it with full attention, max_model_len capped at the window)")
    if cache.cache_dtype != "auto":
        problems.append(f"--kv-cache-dtype {cache.cache_dtype} (use auto)")
    if parallel.worker_cls not in ("auto", *WORKER_PATHS.values()):
        problems.append(f"a custom --worker-cls ({parallel.worker_cls})")
    scheduler_cls = vllm_config.scheduler_config.scheduler_cls
    if scheduler_cls not in (None, SCHEDULER_PATH):
        problems.append(f"a custom --scheduler-cls ({scheduler_cls})")
    if problems:
        raise ValueError("--attention-backend sentinel cannot be combined with " + "; ".join(problems))


def configure(vllm_config) -> EngineSettings:
    """Resolve the model's sentinel contract and switch the engine to the sentinel classes."""
    model, scheduler = vllm_config.model_config, vllm_config.scheduler_config
    additional = vllm_config.additional_config
    if additional is None:
        additional = vllm_config.additional_config = {}
    # Resolved from the user's options every time, never taken from the config as already resolved:
    # skipping the set-up below because of what a user passed would run the stock scheduler and
    # worker on sentinel settings.
    tokenizer = None
    if not model.skip_tokenizer_init:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer, trust_remote_code=model.trust_remote_code)
    settings = EngineSettings.resolve(model.model, additional.get(KEY), model.get_vocab_size(),
                                      model.max_model_len, tokenizer)
    additional[RESOLVED_KEY] = settings.to_json()

    vllm_config.parallel_config.worker_cls = WORKER_PATHS[vllm_config.device_config.device_type]
    scheduler.scheduler_cls = SCHEDULER_PATH
    scheduler.async_scheduling = False  # the worker plans from the pre-step computed-token counts

    # The scheduler budgets real tokens; the worker adds a <CR> per compacted span. A step of
    # B real tokens over R requests compacts at most B / 2 + R spans (span >= 2), so reserve room.
    real_budget = scheduler.max_num_scheduled_tokens or scheduler.max_num_batched_tokens
    scheduler.max_num_scheduled_tokens = real_budget
    scheduler.max_num_batched_tokens = real_budget + real_budget // 2 + scheduler.max_num_seqs

    if vllm_config.use_v2_model_runner:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # inherited by EngineCore and the workers
    logger.info("sentinel: %s with <CL>=%d <CR>=%d, default schedule sink=%d span=%d gap=%d; "
                "%d real tokens per step (+ room for sentinels); requests may %s (min_span %d)",
                settings.model_dir, settings.cl_token_id, settings.cr_token_id, settings.schedule.sink,
                settings.schedule.span, settings.schedule.gap, real_budget,
                "choose their schedule" if settings.allow_request_overrides else "not choose their schedule",
                settings.min_span)
    return settings

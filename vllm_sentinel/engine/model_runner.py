"""The model runner: expands each step's real tokens into the sentinel stream, and masks sentinels.

The scheduler's `SchedulerOutput` speaks of real tokens only. The runner
- plans the step (`StepPlan`): a `<CR>` after every token after which a span is compacted,
  logical positions, physical slots;
- supplies each `<CR>` its `<CL>`'s key and value without caching `<CL>` (`cl_kv.py`: rotated model
  constants, or the step's `<CL>`s through the network where position enters otherwise);
- runs vLLM's `execute_model` on a copy of the output whose token counts include the sentinels,
  with its own `_prepare_inputs` filling ids, positions, physical sequence lengths and slots;
- samples from each request's last *real* token, and never a sentinel (their logits are -inf);
- mirrors the KV manager's block trim before new block ids are appended (both follow from the
  computed-token count alone, see kv_cache_manager.py);
- hands prompt logprobs the real tokens' hidden states only.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from ..masks import REAL
from .backend import SentinelAttentionMetadataBuilder, SentinelStepState
from .cl_kv import RotatedConstants, as_positions, cl_key_values, rotary_embeddings
from .kv_cache_manager import kept_blocks
from .layout import KVLayout
from .plan import StepPlan
from .settings import EngineSettings

logger = init_logger("vllm.sentinel")


def check_rotary_coverage(ropes, max_model_len: int, model: str) -> None:
    """Refuse an engine whose positions run past the rotary table, before it serves anything.

    vLLM lets `max_model_len` exceed the model's positions under VLLM_ALLOW_LONG_MAX_MODEL_LEN=1;
    its own CPU rotary kernel then reads past the end of `cos_sin_cache` (no rotation is defined
    there), and our `<CL>` rotation, which indexes the same table, raised and took EngineCore and
    every request with it. Neither can be exact against anything, so the engine does not start."""
    if not ropes:
        return  # no vLLM rotary table (learned positions: cl_kv.py probes the last position)
    covered = min(int(rope.cos_sin_cache.shape[0]) for rope in ropes)
    if max_model_len > covered:
        raise ValueError(
            f"--attention-backend sentinel: max_model_len {max_model_len} exceeds the {covered} positions the "
            f"model's rotary embedding covers (max_position_embeddings and rope_scaling in {model}/config.json); "
            f"positions past {covered} have no defined rotation. Lower --max-model-len to at most {covered}, or, if "
            "the model was trained for longer contexts, raise max_position_embeddings or set rope_scaling there")


class SentinelModelRunnerMixin:
    """The sentinel behaviour, for any `GPUModelRunner` subclass (the CPU one here)."""

    def _init_sentinel(self) -> None:
        self.sentinel = EngineSettings.of(self.vllm_config)
        self.sentinel_step = SentinelStepState()
        self.sentinel_layouts: dict[str, KVLayout] = {}
        self._sentinel_real: dict[str, int] = {}
        self._sentinel_plan: StepPlan | None = None
        self._sentinel_rng_states: dict[int, torch.Tensor] = {}  # batch row -> CPU generator state

    # -- setup ----------------------------------------------------------------------------------
    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        compute_logits = self.model.compute_logits
        sentinel_ids = list(self.sentinel.sentinel_ids)

        def compute_logits_without_sentinels(*logit_args, **logit_kwargs):
            # Sentinels are never targets: masking them here (not in a logits processor, which runs
            # after raw logprobs are taken) keeps them out of samples *and* returned logprobs.
            logits = compute_logits(*logit_args, **logit_kwargs)
            if logits is not None:
                logits[..., sentinel_ids] = float("-inf")
            return logits

        self.model.compute_logits = compute_logits_without_sentinels
        model_config = self.model_config
        check_rotary_coverage(rotary_embeddings(self.model), model_config.max_model_len, model_config.model)
        self._sentinel_cl = cl_key_values(self.model, self.vllm_config, self.sentinel.sentinel_ids[0], self.device)
        logger.info("sentinel: <CL> keys and values for %s: %s", type(self.model).__name__,
                    "rotated model constants" if isinstance(self._sentinel_cl, RotatedConstants)
                    else "the step's <CL>s through the network")

    def initialize_metadata_builders(self, kv_cache_config, kernel_block_sizes) -> None:
        super().initialize_metadata_builders(kv_cache_config, kernel_block_sizes)
        for groups in self.attn_groups:
            for attn_group in groups:
                for builder in attn_group.metadata_builders:
                    if isinstance(builder, SentinelAttentionMetadataBuilder):
                        builder.step = self.sentinel_step
        for table, group in zip(self.input_batch.block_table.block_tables, kv_cache_config.kv_cache_groups):
            if table.block_size != group.kv_cache_spec.block_size:
                raise NotImplementedError(
                    f"the sentinel backend needs kernel blocks equal to KV cache blocks; got kernel block size "
                    f"{table.block_size} for blocks of {group.kv_cache_spec.block_size}: set --block-size to a "
                    "size the attention kernel supports directly (a multiple of 32 on CPU)")

    # -- one step -------------------------------------------------------------------------------
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        for req_id in scheduler_output.finished_req_ids:
            self.sentinel_layouts.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            self.sentinel_layouts[new.req_id] = self.sentinel.request_layout(new.sampling_params,
                                                                             len(new.prompt_token_ids or ()))
        computed = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        self._sentinel_real = scheduler_output.num_scheduled_tokens
        expanded = {req_id: self.sentinel_layouts[req_id].num_tokens_with_sentinels(computed[req_id], num_real)
                    for req_id, num_real in self._sentinel_real.items()}
        total = sum(expanded.values())
        if total > self.max_num_tokens:
            raise RuntimeError(f"a step of {total} tokens with sentinels exceeds the worker's {self.max_num_tokens}; "
                               "the sentinel config hook should have reserved room for them")
        self._sentinel_plan = None
        try:
            return super().execute_model(
                replace(scheduler_output, num_scheduled_tokens=expanded, total_num_scheduled_tokens=total),
                intermediate_tensors)
        finally:
            self.sentinel_step.plan = None  # dummy runs between steps must see no plan

    def _update_states(self, scheduler_output):
        # The KV manager trimmed each running request to cdiv(p(c), block_size) blocks before
        # allocating; drop the same tail here so new block ids land at the right index.
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens):
            if req_id in cached.resumed_req_ids:
                continue  # a resumed request gets its whole block list anew
            state = self.requests[req_id]
            row = self.input_batch.req_id_to_index.get(req_id)
            for block_ids, table in zip(state.block_ids, self.input_batch.block_table.block_tables):
                keep = kept_blocks(self.sentinel_layouts[req_id], num_computed, table.block_size)
                del block_ids[keep:]
                if row is not None:
                    table.num_blocks_per_row[row] = min(table.num_blocks_per_row[row], keep)
        result = super()._update_states(scheduler_output)
        # logprobs=-1 / prompt_logprobs=-1 ask for every column of the logits, and vLLM would list
        # the sentinels too (at -inf). They are not tokens a client can see: cap every count at the
        # real vocabulary (sentinels rank last, so the top `limit` are exactly the real tokens).
        batch = self.input_batch
        limit = batch.vocab_size - len(self.sentinel.sentinel_ids)
        over = [req_id for req_id, count in self.num_prompt_logprobs.items() if count > limit]
        self.num_prompt_logprobs.update(dict.fromkeys(over, limit))
        over = [req_id for req_id, count in batch.num_logprobs.items() if count > limit]
        if over:
            batch.num_logprobs.update(dict.fromkeys(over, limit))
            batch.sampling_metadata = batch._make_sampling_metadata()  # built from the uncapped counts just now
        return result

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        batch = self.input_batch
        num_reqs = batch.num_reqs
        plan = StepPlan.build([self.sentinel_layouts[req_id] for req_id in batch.req_ids],
                              batch.num_computed_tokens_cpu[:num_reqs],
                              [self._sentinel_real[req_id] for req_id in batch.req_ids])
        assert np.array_equal(np.diff(plan.query_start), num_scheduled_tokens), "batch order changed under the plan"
        n = plan.num_tokens
        batch.block_table.commit_block_table(num_reqs)
        rows = np.repeat(np.arange(num_reqs), np.diff(plan.query_start))

        is_real = plan.kinds == REAL
        ids = np.full(n, self.sentinel.sentinel_ids[1], dtype=np.int32)
        ids[is_real] = batch.token_ids_cpu[rows[is_real], plan.positions[is_real]]
        self.input_ids.np[:n] = ids
        self.input_ids.copy_to_gpu(n)
        self.positions[:n].copy_(torch.from_numpy(plan.positions), non_blocking=True)

        self.query_start_loc.np[: num_reqs + 1] = plan.query_start
        self.query_start_loc.np[num_reqs + 1:].fill(n)
        self.query_start_loc.copy_to_gpu()

        # The kernel's sequence lengths: the cache and the tokens it attends, all of a plain chunk,
        # those before the first <CR> of one that compacts (stored after p(c) for the kernel).
        seq_lens = torch.from_numpy((plan.cached_len + plan.kernel_len).astype(np.int32))
        self.optimistic_seq_lens_cpu[:num_reqs] = seq_lens
        self.optimistic_seq_lens_cpu[num_reqs:].fill_(0)
        self.seq_lens[:num_reqs].copy_(seq_lens, non_blocking=True)
        self.seq_lens[num_reqs:].fill_(0)
        self.num_computed_tokens[:num_reqs].copy_(batch.num_computed_tokens_cpu_tensor[:num_reqs], non_blocking=True)

        # A partial prefill must not sample: decided on real tokens, not on the expanded count.
        num_tokens = np.array([self.requests[req_id].num_tokens for req_id in batch.req_ids])
        self.discard_request_mask.np[:num_reqs] = plan.computed + plan.num_real < num_tokens
        self.discard_request_mask.copy_to_gpu(num_reqs)
        # vLLM rewinds a seeded request's generator after a discarded sample (a partial prefill) by
        # its CUDA offset; a CPU generator has none ("CPU Generator does not use offset" killed the
        # step, and with it EngineCore). Keep their state here; `_bookkeeping_sync` puts it back.
        self._sentinel_rng_states = {}
        for index in np.flatnonzero(self.discard_request_mask.np[:num_reqs]).tolist():
            generator = batch.generators.get(index)
            if generator is not None and generator.device.type == "cpu":
                self._sentinel_rng_states[index] = generator.get_state()
        self.num_accepted_tokens.np.fill(1)
        self.num_accepted_tokens.gpu.fill_(1)

        physical = plan.physical_slots
        stored = physical >= 0
        kernel_end = plan.cached_len + plan.kernel_len  # slots the kernel's tokens take, see step_len
        for table in batch.block_table.block_tables:
            block_index = np.where(stored, physical // table.block_size, 0)
            if (block_index[stored] >= table.num_blocks_per_row[rows[stored]]).any() or \
                    ((kernel_end - 1) // table.block_size >= table.num_blocks_per_row[:num_reqs]).any():
                raise RuntimeError("a sentinel KV slot lies past the blocks the scheduler allocated; "
                                   "the worker and the KV manager disagree on the layout")
            slots = table.block_table.np[rows, block_index].astype(np.int64) * table.block_size
            table.slot_mapping.np[:n] = np.where(stored, slots + physical % table.block_size, -1)
            table.slot_mapping.copy_to_gpu(n)

        self.sentinel_step.cl_keys, self.sentinel_step.cl_values = self._sentinel_cl(
            as_positions(plan.cl_positions, self.device))
        self._sentinel_plan = self.sentinel_step.plan = plan
        logits_indices = torch.from_numpy(plan.logits_rows).to(self.device)
        return logits_indices, None, 1

    def _bookkeeping_sync(self, *args, **kwargs):
        # Rewind the CPU generators of discarded samples (see `_prepare_inputs`) and hide them from
        # vLLM's offset rewind, which CPU generators do not support.
        generators = self.input_batch.generators
        rewound = {index: generators.pop(index) for index in self._sentinel_rng_states}
        for index, generator in rewound.items():
            generator.set_state(self._sentinel_rng_states[index])
        self._sentinel_rng_states = {}
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            generators.update(rewound)

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        plan = self._sentinel_plan
        if not self.num_prompt_logprobs or plan is None:
            return super()._get_prompt_logprobs_dict(hidden_states, num_scheduled_tokens)
        # Prompt logprobs belong to real tokens: drop the sentinel rows and count real tokens only.
        num_reqs = self.input_batch.num_reqs
        expanded_start = self.query_start_loc.np[: num_reqs + 1].copy()
        real_start = np.zeros(num_reqs + 1, dtype=expanded_start.dtype)
        np.cumsum(plan.num_real, out=real_start[1:])
        self.query_start_loc.np[: num_reqs + 1] = real_start
        try:
            rows = torch.from_numpy(plan.real_rows).to(hidden_states.device)
            return super()._get_prompt_logprobs_dict(hidden_states[rows], self._sentinel_real)
        finally:
            self.query_start_loc.np[: num_reqs + 1] = expanded_start


class SentinelCPUModelRunner(SentinelModelRunnerMixin, CPUModelRunner):
    def __init__(self, vllm_config, device) -> None:
        super().__init__(vllm_config, device)
        self._init_sentinel()

"""Offline batch inference on Ray Data's vLLM processor: `vllm-sentinel batch`, or `run_batch` on a Dataset.

Each replica is a vLLM engine inside a Ray actor (`ray.data.llm.build_processor` with a
`vLLMEngineProcessorConfig`); the sentinel backend is just an engine argument there, and the plugin
loads in every engine process the way it does for `vllm serve`. Rows keep their own columns, a row
that fails carries its error instead of sinking the job, and the file job writes one output line
per input line, in input order.

On a Ray cluster (`ray start --head` here, `ray start --address HEAD:6379` elsewhere, then
`--address auto`), replicas spread over the nodes; each replica's engine may itself use vLLM's
tensor parallelism within its node.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

# Columns the processor adds or consumes; everything else in a row is the caller's and is kept.
_ENGINE_COLUMNS = {"prompt", "tokenized_prompt", "sampling_params", "prompt_token_ids"}
OUTPUT_COLUMNS = ("generated_text", "generated_token_ids", "num_prompt_tokens", "num_generated_tokens", "error")


@dataclass
class BatchConfig:
    model: str
    backend: str = "sentinel"          # "sentinel" or "stock" (vLLM's default attention)
    replicas: int = 1                  # engines working in parallel (Ray actors)
    tensor_parallel_size: int = 1      # vLLM tensor parallelism inside each replica
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    sentinel: dict | None = None       # per-request sentinel options for every row, e.g. {"span": 8}
    rows_per_call: int = 16            # rows a replica receives at a time
    engine_kwargs: dict = field(default_factory=dict)  # any other vLLM engine argument

    def __post_init__(self) -> None:
        if self.backend not in ("sentinel", "stock"):
            raise ValueError(f"backend must be 'sentinel' or 'stock', got {self.backend!r}")
        if self.replicas < 1 or self.tensor_parallel_size < 1:
            raise ValueError("replicas and tensor_parallel_size must be at least 1")
        if self.sentinel is not None and self.backend != "sentinel":
            raise ValueError("sentinel options need backend='sentinel'")

    def sampling_params(self) -> dict:
        params = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "ignore_eos": self.ignore_eos}
        if self.seed is not None:
            params["seed"] = self.seed
        if self.sentinel:
            params["extra_args"] = {"sentinel": dict(self.sentinel)}
        return params


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def processor(config: BatchConfig):
    """The Ray Data processor for `config`: call it on a Dataset of prompts (see `run_batch`)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine_kwargs = {"tensor_parallel_size": config.tensor_parallel_size, **config.engine_kwargs}
    if config.backend == "sentinel":
        engine_kwargs["attention_backend"] = "sentinel"
    runtime_env = None
    placement = None
    if not _on_gpu():
        # Ray Data reserves GPUs by default; an engine here needs CPUs only.
        placement = {"bundles": [{"CPU": 1}] * config.tensor_parallel_size}
        if config.tensor_parallel_size > 1:
            # vLLM's Ray executor does not run on CPU ("current platform cpu does not support ray"):
            # the replica's TP workers are processes of its own actor. vLLM cannot bind their
            # threads automatically on a one-NUMA-node machine, so share the cores out.
            engine_kwargs.setdefault("distributed_executor_backend", "mp")
            runtime_env = {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": _thread_binding(config.tensor_parallel_size)}}
    processor_config = vLLMEngineProcessorConfig(
        model_source=config.model,
        engine_kwargs=engine_kwargs,
        batch_size=config.rows_per_call,
        concurrency=(config.replicas, config.replicas),  # a fixed pool: exactly N engines
        chat_template_stage=False,
        tokenize_stage=False,     # vLLM tokenizes and detokenizes inside the engine
        detokenize_stage=False,
        should_continue_on_error=True,
        log_engine_metrics=False,  # True would pull in Ray Serve
        placement_group_config=placement,
        runtime_env=runtime_env,
    )
    # No postprocess: Ray Data sends failed rows around it, so results are shaped afterwards (run_batch).
    return build_processor(processor_config, preprocess=partial(_to_engine_row, config.sampling_params()))


def _thread_binding(parts: int) -> str:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    if len(cores) < parts:
        raise ValueError(f"tensor parallel size {parts} needs at least {parts} CPU cores; this machine has {len(cores)}")
    size = len(cores) // parts
    return "|".join(",".join(str(c) for c in cores[i * size:(i + 1) * size]) for i in range(parts))


def _to_engine_row(sampling_params: dict, row: dict) -> dict:
    token_ids = row.get("prompt_token_ids")
    regions = row.get("regions")
    if regions is not None:
        # This row's marked regions, checked by the engine (a bad one fails the row alone). Ray Data
        # hands them on as numpy arrays whatever this returns; the engine's parser takes those.
        options = {**sampling_params.get("extra_args", {}).get("sentinel", {}), "regions": regions}
        sampling_params = {**sampling_params, "extra_args": {"sentinel": options}}
    return {**row, "prompt": row.get("prompt") or "",
            "tokenized_prompt": None if token_ids is None else [int(t) for t in token_ids],
            "sampling_params": sampling_params}


def _from_engine_row(keep: tuple[str, ...], row: dict) -> dict:
    error = row.get("__inference_error__") or None
    return {**{name: row.get(name) for name in keep},
            "generated_text": None if error else row.get("generated_text"),
            "generated_token_ids": [] if error else [int(t) for t in row.get("generated_tokens") or []],
            "num_prompt_tokens": int(row.get("num_input_tokens") or 0),
            "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
            "error": error}


def run_batch(dataset, config: BatchConfig):
    """Generate for every row of a Ray Dataset with `prompt` (text) or `prompt_token_ids` columns,
    and optionally `regions`: per row, the marked regions to compress ([[start, end], ...] in the
    prompt's token offsets; None for the schedule alone, [] for no compression of the prompt).

    Returns a Dataset with the caller's other columns plus generated_text, generated_token_ids,
    num_prompt_tokens, num_generated_tokens and error (None unless the row failed).
    """
    keep = tuple(name for name in dataset.columns() if name not in _ENGINE_COLUMNS)
    if "regions" in keep and config.backend != "sentinel":
        raise ValueError("a regions column marks what the sentinel engine compresses; it needs backend='sentinel'")
    return processor(config)(dataset).map(partial(_from_engine_row, keep))


# -- the file job ---------------------------------------------------------------------------------------

def read_prompts(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(rows to run, rows already failed) from a JSONL file, one prompt per line.

    A line is `{"prompt": "..."}` or `{"prompt_token_ids": [...]}`, optionally with an "id"
    (else the line number is the id) and "regions" (marked regions, [[start, end], ...] in token
    offsets of the prompt). Blank lines are skipped; a malformed line becomes an error
    row so the caller can report it in place.
    """
    good, bad = [], []
    with open(path) as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise ValueError("a line must be a JSON object")
                prompt, token_ids = record.get("prompt"), record.get("prompt_token_ids")
                if (prompt is None) == (token_ids is None):
                    raise ValueError('give exactly one of "prompt" (text) or "prompt_token_ids" (a list of ints)')
                if prompt is not None and (not isinstance(prompt, str) or not prompt):
                    raise ValueError('"prompt" must be a non-empty string')
                if token_ids is not None and (not isinstance(token_ids, list) or not token_ids
                                              or not all(isinstance(t, int) and t >= 0 for t in token_ids)):
                    raise ValueError('"prompt_token_ids" must be a non-empty list of non-negative ints')
                regions = record.get("regions")
                if regions is not None and (not isinstance(regions, list) or not all(
                        isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in regions)):
                    raise ValueError('"regions" must be a list of [start, end] pairs of ints')
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                bad.append({"line": number, "id": json.dumps(number), "error": f"line {number}: {err}"})
                continue
            row = {"line": number, "id": json.dumps(record.get("id", number))}
            row["prompt"], row["prompt_token_ids"], row["regions"] = prompt, token_ids, regions
            good.append(row)
    return good, bad


def _output_line(row: dict) -> str:
    out = {"id": json.loads(row["id"]), "line": int(row["line"])}
    for name in OUTPUT_COLUMNS:
        out[name] = row.get(name)
    return json.dumps(out)


def batch_file(input_path: str | Path, output_path: str | Path, config: BatchConfig,
               address: str | None = None) -> dict:
    """Run the whole file through Ray; returns a summary (rows, failed rows)."""
    import ray

    good, bad = read_prompts(input_path)
    if not good and not bad:
        raise ValueError(f"{input_path} holds no prompts (one JSON object per line)")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # Logical CPUs for the engine actors plus the map stages: an engine's bundle is a
            # reservation, not a core it keeps busy.
            ray.init(num_cpus=max(os.cpu_count() or 1, config.replicas * config.tensor_parallel_size + 2),
                     include_dashboard=False, log_to_driver=False)
    results: list[dict] = list(bad)
    if not any(row["regions"] is not None for row in good):
        good = [{k: v for k, v in row.items() if k != "regions"} for row in good]
    if good:
        dataset = ray.data.from_items(good)
        results += list(run_batch(dataset, config).iter_rows())
    results.sort(key=lambda row: int(row["line"]))
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w") as out:
        for row in tqdm(results, desc="writing", unit="row", disable=len(results) < 1000):
            out.write(_output_line(row) + "\n")
    failed = sum(1 for row in results if row.get("error"))
    return {"rows": len(results), "failed": failed, "output": str(output_path)}

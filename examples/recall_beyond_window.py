"""Ask the served sentinel model for a fact stated far beyond its resident KV.

    .venv/bin/vllm-sentinel quality --out runs/quality          # builds the models this reads
    .venv/bin/python examples/recall_beyond_window.py --quality-dir runs/quality

One held-out document of the corpus's prose holds "The pass key is NNNN." far back and asks for it at
the end. The sentinel+W model of the quality run answers through vLLM (`attention_backend="sentinel"`,
greedy), holding only its compacted KV; the local-attention model of the same run, fine-tuned alike
and keeping the same number of keys per query, answers in transformers with its sliding-window
mask. Prints both answers, the KV each held and what full attention would hold.
"""
import argparse
import glob
from pathlib import Path

from vllm_sentinel.logs import route_vllm_logs


def pick_document(model_dir: str, length: int, min_distance: int, seed: int):
    """The first held-out passkey document (by seed) whose fact lies at least `min_distance` back."""
    import torch
    from transformers import AutoTokenizer

    from vllm_sentinel.quality.corpora import long_document_streams
    from vllm_sentinel.training.corpus import DEFAULT_CORPUS
    from vllm_sentinel.training.recall import RecallConfig, RecallGenerator

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, heldout = long_document_streams(str(DEFAULT_CORPUS), tokenizer, length)
    generator = RecallGenerator(heldout, tokenizer, RecallConfig(length=length))
    draws = torch.Generator().manual_seed(seed)
    while True:
        doc = generator.document("passkey", draws)
        if doc.queries[0].distance >= min_distance:
            return doc, tokenizer


def local_answer(model_dir: str, prompt, answer_len: int, schedule) -> list[int]:
    """Greedy answer of the local-attention model, its per-query budget matching sentinel+W's schedule."""
    import torch

    from vllm_sentinel.quality.methods import spans_of
    from vllm_sentinel.quality.scoring import examples_for, greedy_continue
    from vllm_sentinel.training.recipe import load_base

    model, tokenizer = load_base(model_dir)
    ids = tuple(tokenizer.convert_tokens_to_ids(["<CL>", "<CR>"]))
    stream = torch.cat([prompt, torch.zeros(answer_len, dtype=torch.long)])
    examples = examples_for([stream], "local", spans_of(schedule, stream.numel()), ids, schedule.window)
    return greedy_continue(model, examples, prompt.numel(), answer_len, ids, ids)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality-dir", default="runs/quality", help="the --out of a `vllm-sentinel quality` run")
    parser.add_argument("--ratio", default="0.9", help="which compression ratio's models to use")
    parser.add_argument("--length", type=int, default=1024, help="tokens in the document (the models' window)")
    parser.add_argument("--min-distance", type=int, default=700, help="how far back the fact must stand")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--verbose", action="store_true", help="vLLM's log on the terminal, not in runs/logs/")
    args = parser.parse_args()
    found = sorted(glob.glob(f"{args.quality_dir}/models-*/sentinel_window-{args.ratio}"))
    if not found:
        raise SystemExit(f"no sentinel+W model for ratio {args.ratio} under {args.quality_dir}; run "
                         f"`vllm-sentinel quality --out {args.quality_dir}` first")
    sentinel_dir = found[-1]
    local_dir = str(Path(sentinel_dir).with_name(f"local-{args.ratio}"))
    route_vllm_logs("runs/logs/recall_beyond_window.log", verbose=args.verbose)
    from transformers.utils import logging as transformers_logging
    from vllm import LLM, SamplingParams  # after the log routing: vLLM configures its logging at import

    transformers_logging.disable_progress_bar()  # our lines, not weight-loading bars

    from vllm_sentinel.config import SentinelConfig
    from vllm_sentinel.engine.layout import KVLayout
    from vllm_sentinel.observe import run_workload

    doc, tokenizer = pick_document(sentinel_dir, args.length, args.min_distance, args.seed)
    [query] = doc.queries
    prompt = doc.ids[: query.answer_start]
    truth = doc.ids[query.answer_start: query.answer_end].tolist()
    schedule = SentinelConfig.load(sentinel_dir).schedule
    print(f"a held-out document of {prompt.numel()} tokens; the fact stands {query.distance} tokens before the question:")
    print(f"  ...{tokenizer.decode(doc.ids[query.fact_start - 12: query.fact_end + 8])!r}...")
    print(f"  question: ...{tokenizer.decode(prompt[-24:])!r}   (answer {tokenizer.decode(truth)!r})")

    llm = LLM(model=sentinel_dir, attention_backend="sentinel", dtype="float32", enforce_eager=True,
              kv_cache_memory_bytes=1 << 28, max_model_len=args.length + 8, disable_log_stats=False, seed=0,
              use_tqdm_on_load=args.verbose)
    record = run_workload(llm, [prompt.tolist()], SamplingParams(max_tokens=len(truth), temperature=0, ignore_eos=True))
    llm.llm_engine.engine_core.shutdown()
    answer = list(record.outputs[0].outputs[0].token_ids)
    slots = max(s["kv_slots"] for s in record.samples)
    full = prompt.numel() + len(truth) - 1
    print(f"sentinel+W through vLLM (span {schedule.span}, window {schedule.window}): {tokenizer.decode(answer)!r} "
          f"{'correct' if answer == truth else 'wrong'} | KV held: {slots} slots, {record.peak_kv_blocks} blocks of "
          f"vLLM's pool (its own accounting); full attention: {full} slots, {-(-full // 32)} blocks")
    local = local_answer(local_dir, prompt, len(truth), schedule)
    keys = int(KVLayout(schedule).physical_len(prompt.numel()))
    print(f"local attention at the same keys per query (its last {keys} tokens, transformers): "
          f"{tokenizer.decode(local)!r} {'correct' if local == truth else 'wrong'}")


if __name__ == "__main__":
    main()

"""Stock vLLM and the sentinel backend side by side: same model, prompts and KV pool.

    .venv/bin/python examples/offline_generate.py --model models/tiny

Prints, for each engine, throughput (greedy, fixed lengths), the most KV blocks it held at once,
how many requests ran at once and how many were preempted, and one sampled completion. vLLM's
own log goes to runs/logs/offline_generate.log (--verbose: on the terminal).
"""
import argparse

from vllm_sentinel.logs import route_vllm_logs

PROMPTS = ["To read a file line by line in Python,", "A list comprehension is", "The with statement",
           "Decorators are functions that", "An iterator is an object that", "The standard library module os"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--kv-blocks", type=int, default=100, help="KV pool size in blocks of 32 tokens (small on purpose)")
    parser.add_argument("--enforce-eager", action="store_true", help="skip torch.compile: faster start")
    parser.add_argument("--verbose", action="store_true", help="vLLM's log on the terminal, not in runs/logs/")
    args = parser.parse_args()
    log_file = route_vllm_logs("runs/logs/offline_generate.log", verbose=args.verbose)
    from vllm import LLM, SamplingParams  # after the log routing: vLLM configures its logging at import

    from vllm_sentinel.observe import run_workload

    if log_file:
        print(f"(vLLM's log: {log_file})")

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    completions = {}
    for backend in ("stock", "sentinel"):
        llm = LLM(model=args.model, block_size=32, num_gpu_blocks_override=args.kv_blocks,
                  kv_cache_memory_bytes=1 << 30, max_model_len=(args.kv_blocks - 1) * 32,  # block 0 is vLLM's null block
                  disable_log_stats=False, use_tqdm_on_load=args.verbose,  # our lines, not loading bars
                  enforce_eager=args.enforce_eager, **({"attention_backend": "sentinel"} if backend == "sentinel" else {}))
        record = run_workload(llm, prompts, params)
        s = record.summary()
        print(f"{backend:>8}: {s['output_tokens_per_s']:7.0f} output tok/s | peak KV blocks held {s['peak_kv_blocks']:3d} "
              f"of {s['num_kv_blocks']} | peak running {s['peak_running']:3d} of {len(prompts)} | "
              f"preemptions {s['preemptions']:3d} | KV blocks freed by compaction {s['kv_blocks_freed']}")
        # The sample a person reads: settings a user of a small model would pick (greedy decoding
        # of a 5M-parameter model loops), seeded so both engines draw the same way.
        sample = SamplingParams(max_tokens=60, temperature=0.8, top_p=0.95, repetition_penalty=1.3, seed=0)
        completions[backend] = llm.generate([PROMPTS[0]], sample, use_tqdm=False)[0].outputs[0].text
        llm.llm_engine.engine_core.shutdown()
        del llm
    print("\nsampled with temperature 0.8, top_p 0.95, repetition_penalty 1.3 (the throughput runs are greedy):")
    for backend, text in completions.items():
        print(f"{backend} completion of {PROMPTS[0]!r}:\n{text[:300]!r}")


if __name__ == "__main__":
    main()

"""Batch inference over a Ray Dataset with the sentinel backend: the Python side of `vllm-sentinel batch`.

    .venv/bin/python examples/ray_batch.py --model models/tiny --replicas 2

Each replica is one vLLM engine in a Ray actor (Ray Data's vLLM processor). Your columns ride along
with the results; a row that fails carries its error in `error`. On a cluster, start Ray on every
node (`ray start --head`, then `ray start --address HEAD:6379`) and pass `--address auto`.
"""
import argparse

import ray

from vllm_sentinel.batch import BatchConfig, run_batch

QUESTIONS = ["How do I read a file?", "What is a generator?", "How do I sort a dict by value?",
             "What does __init__ do?", "How do I parse JSON?", "What is a virtual environment?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--address", default=None, help="a Ray cluster (`auto`); default: a local one")
    parser.add_argument("--enforce-eager", action="store_true", help="skip torch.compile: faster start")
    args = parser.parse_args()

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False,
             **({} if args.address else {"num_cpus": args.replicas + 2}))
    questions = ray.data.from_items([{"question_id": i, "prompt": f"Q: {QUESTIONS[i % len(QUESTIONS)]}\nA:"}
                                     for i in range(args.rows)])
    config = BatchConfig(model=args.model, replicas=args.replicas, max_tokens=args.max_tokens,
                         engine_kwargs={"kv_cache_memory_bytes": 1 << 30, "enforce_eager": args.enforce_eager})
    answers = run_batch(questions, config).sort("question_id")
    for row in answers.take_all():
        print(row["question_id"], repr(row["generated_text"] or row["error"])[:100])


if __name__ == "__main__":
    main()

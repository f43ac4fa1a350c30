"""Turn a Hugging Face causal LM (Llama family) into a sentinel model, then serve it compressed.

    .venv/bin/python examples/train_sentinel.py --base models/tiny/base --out models/my-sentinel

The recipe adds <CL>/<CR>, trains LoRA (and the two new embedding rows) with the paper's loss on
spans drawn from the schedule the model will be served with, and writes a directory that both
transformers and `vllm serve --attention-backend sentinel` load. The command line equivalent is
`vllm-sentinel train --base ... --out ...`.
"""
import argparse

from vllm_sentinel import ScheduleConfig, SentinelConfig, TrainConfig, perplexity, train
from vllm_sentinel.training.corpus import DEFAULT_CORPUS, corpus_streams
from vllm_sentinel.training.recipe import load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/tiny/base", help="a Hugging Face causal LM directory")
    parser.add_argument("--out", default="models/my-sentinel")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()

    model, tokenizer = load_base(args.base)
    train_ids, heldout_ids = corpus_streams(args.corpus, tokenizer)
    schedule = ScheduleConfig(sink=4, span=16, gap=0)
    config = TrainConfig(schedule=schedule, steps=args.steps, seq_len=args.seq_len, eval_every=args.steps,
                         eval_tokens=args.eval_tokens, checkpoint_every=max(args.steps // 4, 1))
    train(model, tokenizer, train_ids, heldout_ids, config, args.out)

    trained, _ = load_base(args.out)
    sentinel = SentinelConfig.load(args.out)
    for regime in ("full", "sentinel"):
        ppl = perplexity(trained, heldout_ids, regime, sentinel, window=args.seq_len, max_tokens=args.eval_tokens)
        print(f"held-out perplexity, {regime} attention: {ppl:.2f}")
    print(f"serve it: .venv/bin/vllm serve {args.out} --attention-backend sentinel --kv-cache-memory-bytes 1G")


if __name__ == "__main__":
    main()

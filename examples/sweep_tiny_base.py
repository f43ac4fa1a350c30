"""Which base-model size gives the best held-out perplexity for a fixed number of training steps?

    python examples/sweep_tiny_base.py --steps 800

Trains each candidate from scratch, one after another, on the python3.11-doc corpus with the
same number of steps (seeded: the same table on a busy or a quiet machine), and prints a markdown
table. `make-tiny` uses the winner.
"""
import argparse

from vllm_sentinel.training.corpus import DEFAULT_CORPUS, corpus_streams, load_documents, split_documents
from vllm_sentinel.training.pretrain import BaseModelConfig, pretrain_base, train_tokenizer

CANDIDATES = [  # (hidden, layers, intermediate); head_dim 64 throughout
    (192, 4, 512),
    (256, 4, 704),
    (256, 6, 704),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="pretraining steps per size")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    args = parser.parse_args()
    train_docs, _ = split_documents(load_documents(args.corpus))
    tokenizer = train_tokenizer([d.text for d in train_docs])
    train_ids, heldout_ids = corpus_streams(args.corpus, tokenizer)
    rows = []
    for hidden, layers, intermediate in CANDIDATES:
        cfg = BaseModelConfig(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                              num_kv_heads=hidden // 64, intermediate_size=intermediate, steps=args.steps)
        _, stats = pretrain_base(cfg, train_ids, heldout_ids)
        rows.append((hidden, layers, intermediate, stats))
        print(f"hidden={hidden} layers={layers}: held-out perplexity {stats['heldout_perplexity']:.2f}", flush=True)
    print(f"\n| hidden | layers | ffn | params (M) | steps | tokens seen | tok/s | held-out ppl |  ({args.steps} steps each)")
    print("|---|---|---|---|---|---|---|---|")
    for hidden, layers, intermediate, s in rows:
        print(f"| {hidden} | {layers} | {intermediate} | {s['parameters'] / 1e6:.2f} | {s['steps']} | "
              f"{s['tokens_seen']:,} | {s['tokens_per_s']:.0f} | {s['heldout_perplexity']:.2f} |")


if __name__ == "__main__":
    main()

"""Training: from a corpus to a base model to a sentinel model, and how each is scored.

- `corpus`: the default corpus (Debian's python3.11-doc), split by document;
- `recall`: recall documents (the corpus's prose with facts asked for far later) and the
  training windows that mix them into the prose;
- `pretrain`: a tokenizer and a small Llama base from scratch, for a fixed number of steps;
- `batching`: windows of real tokens -> batches under one attention regime (sentinel or a baseline);
- `recipe`: the sentinel recipe (a Hugging Face causal LM -> a model vLLM serves compressed);
- `evaluate`: held-out perplexity under a regime;
- `tiny`: `vllm-sentinel make-tiny`, the offline default model.
"""
from .recipe import DEFAULT_CHAT_TEMPLATE, TrainConfig, add_sentinel_tokens, load_base, train

__all__ = ["DEFAULT_CHAT_TEMPLATE", "TrainConfig", "add_sentinel_tokens", "load_base", "train"]

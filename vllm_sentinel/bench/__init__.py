"""Stock vLLM against the sentinel backend, each tool running both in one process run and printing ratios.

- `throughput`: `vllm-sentinel bench`, offline throughput and memory (`vllm bench throughput`'s
  conventions), long prompts, and the realistic-shape dummy model the tools share;
- `chat`: shared system prompts and multi-turn conversations, with and without prefix caching;
- `serve`: `vllm bench serve` against `vllm serve`, both ways;
- `soak`: hostile and careless clients against one `vllm serve`.
"""

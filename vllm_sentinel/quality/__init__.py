"""`vllm-sentinel quality`: does sentinel compression keep what a long-context model needs?

From one base model trained on windows of 1,024 tokens of the corpus's long documents (built and
cached under --out unless --base names one), one fine-tune per method and compression ratio with
the same recipe, steps and data order:

- full attention; local (sliding window); sink + window (StreamingLLM); scattered (one random
  token per closed span); sentinel with W = 0 (the paper); sentinel with a recent window W;
- at ratios 0.5, 0.75 and 0.9 of the keys dropped at the end of a window, every compressed
  method holding the same keys per query (`methods.py` says how the schedules are chosen).

Scored on two corpora (held-out training documents; the Python standard library's sources):
overall perplexity, perplexity on distant tokens, perplexity by position in a span, greedy
continuations (ROUGE, and their perplexity under the full-attention model); and the sentinel+W
perplexity through vLLM against transformers. Writes quality.json and quality.png.
"""
from .methods import LABELS, METHODS, plan
from .pipeline import QualityConfig, run_quality
from .report import format_report, plot, verdicts

__all__ = ["LABELS", "METHODS", "QualityConfig", "format_report", "plan", "plot", "run_quality", "verdicts"]

"""`vllm-sentinel`: the command line (train, make-tiny, eval, batch, bench, bench-chat, bench-serve, soak, quality)."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ScheduleConfig, SentinelConfig, SentinelConfigError
from .logs import route_vllm_logs

# The commands that run vLLM engines in this process tree. bench-serve and soak are not among them:
# the servers they start write their whole log to a file of their own already.
VLLM_COMMANDS = {"batch", "bench", "bench-chat", "quality"}


def _add_schedule_args(parser: argparse.ArgumentParser, defaults: ScheduleConfig | None) -> None:
    d = defaults or ScheduleConfig()
    parser.add_argument("--sink", type=int, default=None, help=f"tokens never compressed (default {d.sink})")
    parser.add_argument("--span", type=int, default=None, help=f"tokens per compressed span (default {d.span})")
    parser.add_argument("--gap", type=int, default=None, help=f"uncompressed tokens between spans (default {d.gap})")


def _schedule(args, default: ScheduleConfig) -> ScheduleConfig:
    return ScheduleConfig(sink=default.sink if args.sink is None else args.sink,
                          span=default.span if args.span is None else args.span,
                          gap=default.gap if args.gap is None else args.gap,
                          window=default.window)


def cmd_train(args) -> None:
    from .training.corpus import corpus_streams
    from .training.recipe import TrainConfig, load_base, train

    schedule = _schedule(args, ScheduleConfig(window=args.window))
    cfg = TrainConfig(schedule=schedule, regime=args.regime, seq_len=args.seq_len,
                      batch_size=args.batch_size, steps=args.steps, time_budget_s=args.time_budget,
                      lr=args.lr, lora_rank=args.lora_rank, full_finetune=args.full_finetune,
                      jitter=args.jitter, random_span_fraction=args.random_spans,
                      marked_fraction=args.marked,
                      eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed)
    model, tokenizer = load_base(args.base)
    train_ids, heldout_ids = corpus_streams(args.corpus, tokenizer)
    state = train(model, tokenizer, train_ids, heldout_ids, cfg, args.out)
    print(json.dumps(state["log"][-1] if state["log"] else {}, indent=2))
    print(f"sentinel model written to {args.out}")


def cmd_make_tiny(args) -> None:
    from .training.tiny import TinyConfig, format_report, make_tiny

    report = make_tiny(args.out, TinyConfig(), force=args.force)
    print(format_report(report))
    print(f"model: {args.out} (built in {report['seconds']['total']:.0f} s; report in {args.out}/make_tiny_report.json)")


def cmd_eval(args) -> None:
    from .training.corpus import corpus_streams
    from .training.evaluate import perplexity
    from .training.recipe import load_base

    model, tokenizer = load_base(args.model)
    sentinel = SentinelConfig.load(args.model)
    sentinel.validate_for(tokenizer, model.config.vocab_size)
    _, heldout = corpus_streams(args.corpus, tokenizer)
    schedule = _schedule(args, sentinel.schedule)
    for regime in args.regimes:
        ppl = perplexity(model, heldout, regime, sentinel, schedule, window=args.window, max_tokens=args.tokens)
        print(f"{regime:>10}: held-out perplexity {ppl:.3f}")


def _bytes(text: str) -> int:
    """'1G', '512M', '64k' or a plain number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _positive(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_batch(args) -> None:
    from .batch import BatchConfig, batch_file

    engine_kwargs = {"dtype": args.dtype, "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                     "enforce_eager": args.enforce_eager, **json.loads(args.engine_args)}
    if args.max_model_len:
        engine_kwargs["max_model_len"] = args.max_model_len
    sentinel = {name: getattr(args, name) for name in ("sink", "span", "gap") if getattr(args, name) is not None}
    config = BatchConfig(model=args.model, backend=args.backend, replicas=args.replicas,
                         tensor_parallel_size=args.tensor_parallel_size, max_tokens=args.max_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                         sentinel=sentinel or None, engine_kwargs=engine_kwargs)
    summary = batch_file(args.input, args.output, config, address=args.address)
    print(f"{summary['rows']} rows written to {summary['output']} ({summary['failed']} failed)")


BENCH_DTYPE_HELP = ("both engines' dtype; default: bfloat16 for the dummy-weight model (a served model's dtype), "
                    "the model's own otherwise. float32 on CPUs without bf16 arithmetic (AVX2 only), where "
                    "bfloat16 runs emulated, several times slower")


def bench_dtype(args, dummy: bool) -> str:
    """`--dtype` if given, else bf16 for the dummy-weight model and the model's own for others."""
    return args.dtype or ("bfloat16" if dummy else "auto")


def cmd_bench(args) -> None:
    from pathlib import Path

    from .bench.throughput import bench, realistic_dummy_model

    models = args.model or []
    if not models:  # the default pair: a realistic shape with dummy weights, and the trained tiny model
        models = [("dummy", str(realistic_dummy_model(Path(args.out) / "model-dummy")))]
        if Path("models/tiny/sentinel_config.json").is_file():
            models.append(("tiny", "models/tiny"))
        else:
            print("models/tiny not found (build it with `vllm-sentinel make-tiny --out models/tiny`): "
                  "benching the dummy-weight model only")
    else:
        models = [(Path(m).name, m) for m in models]
    workloads = args.workloads.split(",")
    if "long-prompt" in workloads:  # its own model (32k positions) and one engine per process
        import json

        from .bench.throughput import long_prompts

        workloads.remove("long-prompt")
        rows = long_prompts(args.out, quick=args.quick, enforce_eager=args.enforce_eager)
        (Path(args.out) / "bench-long-prompt.json").write_text(json.dumps(rows, indent=2))
        if not workloads:
            return
    for label, model in models:
        dummy = label == "dummy"
        dtype = bench_dtype(args, dummy)
        report = bench(model, args.out, workloads, quick=args.quick, dtype=dtype,
                       load_format="dummy" if dummy else "auto", enforce_eager=args.enforce_eager, label=label,
                       rounds=args.rounds)
        print(f"{label}: {report['seconds']:.0f} s; results in {args.out}/bench-{label}.json and .png")


def cmd_bench_chat(args) -> None:
    from pathlib import Path

    from .bench.chat import bench_chat
    from .bench.throughput import realistic_dummy_model

    if args.model is None:
        model, label, dtype, load_format = str(realistic_dummy_model(Path(args.out) / "model-dummy")), "dummy", \
            bench_dtype(args, True), "dummy"
    else:
        model, label, dtype, load_format = args.model, Path(args.model).name, bench_dtype(args, False), "auto"
    label += f"-w{args.window}" if args.window is not None else ""
    report = bench_chat(model, args.out, quick=args.quick, window=args.window, dtype=dtype, load_format=load_format,
                        label=label, enforce_eager=args.enforce_eager)
    print(f"{report['seconds']:.0f} s; results in {args.out}/bench-chat-{label}.json and .png")


def cmd_bench_serve(args) -> None:
    from pathlib import Path

    from .bench.throughput import realistic_dummy_model
    from .bench.serve import ServeWorkload, format_report, serve_bench

    serve_args = ["--enforce-eager"] if args.enforce_eager else []
    model = args.model
    if model is None:
        model = str(realistic_dummy_model(Path(args.out) / "model-dummy"))
        serve_args += ["--load-format", "dummy", "--dtype", "bfloat16"]
    workload = ServeWorkload(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                             request_rate=args.request_rate, kv_budget_requests=args.kv_budget_requests)
    report = serve_bench(model, args.out, workload, serve_args)
    print(format_report(report))
    print(f"results in {args.out}/bench-serve.json and .png")


def cmd_soak(args) -> None:
    from .bench.soak import SoakConfig, run_soak

    config = SoakConfig(model=args.model, clients=args.clients, minutes=args.minutes, seed=args.seed,
                        max_requests=args.max_requests, kv_blocks=args.kv_blocks, block_size=args.block_size,
                        max_model_len=args.max_model_len, out=args.out, port=args.port,
                        progress=not args.no_progress)
    report = run_soak(config)
    print(report["summary"])
    print(f"results in {args.out}/soak.json, server log in {report['server_log']}")
    if not report["passed"]:
        sys.exit(1)


def cmd_quality(args) -> None:
    from .quality import QualityConfig, format_report, run_quality
    from .quality.pipeline import long_base

    cfg = QualityConfig(base=args.base, base_model=long_base(steps=args.base_steps, **json.loads(args.base_config)),
                        corpus=args.corpus, out=args.out, window=args.window,
                        ratios=tuple(float(r) for r in args.ratios.split(",")), window_fraction=args.window_fraction,
                        steps=args.steps, batch_size=args.batch_size, eval_tokens=args.eval_tokens,
                        continuation_prompts=args.continuation_prompts, continuation_len=args.continuation_len,
                        vllm_ratio=args.vllm_ratio, recall_share=args.recall_share,
                        recall_documents=args.recall_documents, recipe_overrides=json.loads(args.recipe))
    report = run_quality(cfg)
    print(format_report(report))
    print(f"results in {args.out}/quality.json and quality.png")


def build_parser() -> argparse.ArgumentParser:
    from .training.corpus import DEFAULT_CORPUS

    parser = argparse.ArgumentParser(prog="vllm-sentinel", description=__doc__)
    parser.add_argument("--verbose", action="store_true",
                        help="show vLLM's own log on the terminal (by default it goes to runs/logs/COMMAND.log)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="turn a Hugging Face causal LM into a sentinel model")
    p.add_argument("--base", required=True, help="base model directory (Llama family)")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="text file or directory of documents")
    p.add_argument("--out", required=True, help="output model directory")
    _add_schedule_args(p, None)
    p.add_argument("--window", type=int, default=0,
                   help="recent window W: a closed span stays visible raw to the next W real tokens (default 0: the paper's rule)")
    p.add_argument("--regime", default="sentinel", choices=["sentinel", "local", "scattered", "full"],
                   help="sentinel (the method) or a baseline trained with the same budget")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; shortens the LR schedule to fit")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--full-finetune", action="store_true", help="train every weight instead of LoRA")
    p.add_argument("--jitter", type=float, default=0.25, help="relative jitter of span/gap/sink lengths and the window")
    p.add_argument("--random-spans", type=float, default=0.0, help="share of windows with the paper's random spans")
    p.add_argument("--marked", type=float, default=0.0,
                   help="share of windows with random marked regions (documents compressed, a raw tail), "
                        "for a model served with per-request regions")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("make-tiny", help="build the offline default sentinel model from python3.11-doc")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("eval", help="held-out perplexity of a sentinel model under attention regimes")
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    _add_schedule_args(p, None)
    p.add_argument("--regimes", nargs="+", default=["full", "sentinel", "local", "scattered"])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--tokens", type=int, default=32_768)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("batch", help="offline batch inference on Ray Data's vLLM processor",
                       description="One output line per input line (JSONL: {\"id\": ..., \"prompt\": \"...\"} or "
                                   "{\"prompt_token_ids\": [...]}), in input order; a failed row carries its error.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--input", required=True, help="prompts, one JSON object per line")
    p.add_argument("--output", required=True, help="results, one JSON object per input line")
    p.add_argument("--replicas", type=int, default=1, help="vLLM engines working in parallel")
    p.add_argument("--backend", choices=["sentinel", "stock"], default="sentinel")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism per replica")
    p.add_argument("--address", default=None, help="Ray cluster address (`auto` after `ray start`); default: local")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    _add_schedule_args(p, None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-memory-bytes", type=_bytes, default="1G", help="KV cache per replica, e.g. 1G")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    p.add_argument("--engine-args", default="{}", help="more vLLM engine arguments as JSON")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("bench", help="throughput and memory: stock vLLM vs the sentinel backend, one run",
                       description="Runs stock vLLM and the sentinel backend on the same model, prompts and KV budget "
                                   "and prints the ratios; writes bench-<model>.json and .png under --out.")
    p.add_argument("--model", action="append", help="a sentinel model directory (repeatable); default: a realistic "
                   "shape with dummy weights, and models/tiny when it exists")
    p.add_argument("--workloads", default="kv-bound,overhead,prefill,long-gen,span-sweep,long-prompt",
                   help="comma-separated; long-prompt runs its own 32k-position model, one engine per process")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--dtype", default=None, help=BENCH_DTYPE_HELP)
    p.add_argument("--quick", action="store_true", help="small sizes (seconds, for tests)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="both engines eager, without torch.compile (faster start; vLLM's default, which users run, "
                        "is compiled)")
    p.add_argument("--rounds", type=_positive, default=1,
                   help="rounds of fresh prompts per workload, with every engine up, warmed and taking turns; ratios "
                        "are the median of the rounds' ratios (short workloads on a busy or small machine swing by "
                        "10-30%% between single runs); default 1: each engine once, one after the other")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-chat", help="prefix caching: stock vLLM vs sentinel without and with it, one run",
                       description="A shared system prompt and multi-turn conversations on stock vLLM with prefix "
                                   "caching, the sentinel backend without it and with it: hit rate from vLLM's own "
                                   "counters, TTFT, throughput and peak KV blocks; writes bench-chat-<model>.json "
                                   "and .png under --out.")
    p.add_argument("--model", default=None, help="default: the bench's realistic-shape model with dummy weights")
    p.add_argument("--window", type=int, default=None, help="a recent window for every sentinel request "
                   "(default: the model's schedule)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--dtype", default=None, help=BENCH_DTYPE_HELP)
    p.add_argument("--quick", action="store_true", help="small sizes (seconds, for tests)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="both engines eager, without torch.compile (faster start; vLLM's default, which users run, "
                        "is compiled)")
    p.set_defaults(func=cmd_bench_chat)

    p = sub.add_parser("bench-serve", help="`vllm bench serve` against `vllm serve`, stock and sentinel",
                       description="Starts `vllm serve` with and without --attention-backend sentinel on the same model "
                                   "and KV pool, runs `vllm bench serve` against each and compares TTFT/TPOT.")
    p.add_argument("--model", default=None, help="default: the bench's realistic-shape model with dummy weights")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=768)
    p.add_argument("--request-rate", default="inf")
    p.add_argument("--kv-budget-requests", type=float, default=4.0, help="KV pool, in uncompressed requests")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--enforce-eager", action="store_true",
                   help="both servers eager, without torch.compile (faster start; vLLM's default, which users run, "
                        "is compiled)")
    p.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("soak", help="hammer `vllm serve --attention-backend sentinel` and check no request hurt it",
                       description="Starts `vllm serve --attention-backend sentinel` on a small KV pool, runs N "
                                   "concurrent clients (good requests, dropped streams, client timeouts, bad inputs) "
                                   "and checks that good requests succeeded, bad ones got a 4xx, the server is "
                                   "healthy and idle afterwards, and a greedy reference is unchanged. Exits 1 when not.")
    p.add_argument("--model", required=True, help="a sentinel model directory")
    p.add_argument("--clients", type=int, default=256, help="concurrent client loops")
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of load")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop the load after this many requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-blocks", type=int, default=24, help="KV pool in blocks (small: requests get preempted)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--out", default="runs/soak", help="soak.json and serve.log go here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_soak)

    p = sub.add_parser("quality", help="six attention methods at matched KV on a long-context base: full, local, "
                                       "sink+window, scattered, sentinel W=0, sentinel+W",
                       description="Builds (and caches) a base model pretrained on prose and recall documents up to "
                                   "windows of 1,024 tokens, fine-tunes it once per method and compression ratio with "
                                   "the same recipe, steps and data order, every compressed method holding the same "
                                   "keys per query; scores exact-match recall of facts by their distance (behind a "
                                   "gate: full attention must answer at every distance, local attention must fall "
                                   "to chance beyond its window), overall, distant-token and per-span-position "
                                   "perplexity and greedy continuations on held-out documents and on the Python "
                                   "standard library's sources; checks sentinel+W through vLLM against transformers "
                                   "(perplexity and every recall answer). Writes quality.json, quality.png and "
                                   "quality-recall.png under --out, where the base and the fine-tunes are cached.")
    p.add_argument("--base", default=None, help="an existing base model directory (default: build the long-context "
                   "base under --out)")
    p.add_argument("--base-steps", type=int, default=3000,
                   help="pretraining steps of the built base, over its curriculum (quality/pipeline.py, long_base)")
    p.add_argument("--base-config", default="{}", help="more BaseModelConfig fields for the built base, as JSON")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--window", type=int, default=1024, help="real tokens per training and evaluation window")
    p.add_argument("--ratios", default="0.5,0.75,0.9", help="shares of the keys dropped at the end of a window")
    p.add_argument("--window-fraction", type=float, default=0.5,
                   help="sentinel+W's recent window W as a share of the KV budget")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning steps per model (the same for every method)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per fine-tuning step")
    p.add_argument("--eval-tokens", type=int, default=12_288, help="evaluation tokens per corpus")
    p.add_argument("--continuation-prompts", type=int, default=4, help="greedy continuations per corpus and model")
    p.add_argument("--continuation-len", type=int, default=32)
    p.add_argument("--vllm-ratio", type=float, default=0.9, help="the ratio whose sentinel+W model goes through vLLM")
    p.add_argument("--recall-share", type=float, default=0.5,
                   help="share of every fine-tune's windows that are recall documents")
    p.add_argument("--recall-documents", type=int, default=48,
                   help="held-out recall documents of each kind (passkey, multi-fact) to score")
    p.add_argument("--recipe", default="{}", help="more TrainConfig fields for every fine-tune, as JSON")
    p.set_defaults(func=cmd_quality)
    return parser


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C: engines are shut down on the way out. By default the signal
    killed this process alone, and its engine processes (EngineCore, the worker) ran on, busy."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in VLLM_COMMANDS:
        _exit_on_sigterm()
        log_file = route_vllm_logs(f"runs/logs/{args.command}.log", verbose=args.verbose)
        if log_file is not None:
            print(f"(vLLM's log: {log_file}; --verbose shows it here)", file=sys.stderr)
    try:
        args.func(args)
    except (SentinelConfigError, FileNotFoundError, ValueError) as err:
        print(f"vllm-sentinel {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

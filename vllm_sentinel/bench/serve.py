"""`vllm-sentinel bench-serve`: `vllm bench serve` against `vllm serve`, with and without the sentinel backend.

Starts the server twice on the same model and KV budget (stock, then `--attention-backend sentinel`),
drives each with vLLM's own serving benchmark (random dataset, fixed lengths, `--ignore-eos`) and
compares throughput and the TTFT / TPOT percentiles it reports.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engine.layout import cdiv
from .throughput import pool_settings

VLLM = str(Path(sys.executable).parent / "vllm")
METRICS = ("ttft", "tpot", "itl")
PERCENTILES = (50, 99)


@dataclass(frozen=True)
class ServeWorkload:
    num_prompts: int = 32
    input_len: int = 64
    output_len: int = 768
    request_rate: str = "inf"          # requests per second, "inf": all at once
    kv_budget_requests: float = 4.0    # the KV pool: this many uncompressed requests (all 32 compressed fit)
    block_size: int = 32

    @property
    def kv_blocks(self) -> int:
        return cdiv(int(self.kv_budget_requests * (self.input_len + self.output_len)), self.block_size) + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 300) -> None:
    """Until `vllm serve` answers `url`; a server that exits or stays silent raises, naming its log."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}; its log: {log}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"vllm serve did not answer {url} within {timeout_s:.0f} s; its log: {log}")


def run_backend(model: str, backend: str, workload: ServeWorkload, out_dir: Path, serve_args: list[str]) -> dict:
    port = free_port()
    log = out_dir / f"serve-{backend}.log"
    config = json.loads((Path(model) / "config.json").read_text())
    dtype = serve_args[serve_args.index("--dtype") + 1] if "--dtype" in serve_args else "auto"
    pool = pool_settings(config, workload.kv_blocks, dtype, workload.block_size)
    command = [VLLM, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--block-size",
               str(pool["block_size"]), "--num-gpu-blocks-override", str(pool["num_gpu_blocks_override"]),
               "--kv-cache-memory-bytes", str(pool["kv_cache_memory_bytes"]),
               "--max-model-len", str(workload.input_len + workload.output_len), *serve_args]
    if backend == "sentinel":
        command += ["--attention-backend", "sentinel"]
    with open(log, "w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(server, f"http://127.0.0.1:{port}/health", log)
        result_file = f"bench-serve-{backend}.json"
        subprocess.run([VLLM, "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
                        "--model", model, "--tokenizer", model, "--dataset-name", "random",
                        "--random-input-len", str(workload.input_len), "--random-output-len", str(workload.output_len),
                        "--num-prompts", str(workload.num_prompts), "--request-rate", workload.request_rate,
                        "--ignore-eos", "--save-result", "--result-dir", str(out_dir), "--result-filename", result_file,
                        "--percentile-metrics", ",".join(METRICS),
                        "--metric-percentiles", ",".join(str(p) for p in PERCENTILES), "--disable-tqdm"],
                       check=True, capture_output=True, text=True, timeout=3600)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    raw = json.loads((out_dir / result_file).read_text())
    summary = {"completed": raw.get("completed"), "request_throughput": raw.get("request_throughput"),
               "output_throughput": raw.get("output_throughput"),
               "total_token_throughput": raw.get("total_token_throughput")}
    for metric in METRICS:
        for p in PERCENTILES:
            summary[f"{metric}_ms_p{p}"] = raw.get(f"p{p}_{metric}_ms")
    return summary


def serve_bench(model: str, out_dir: str | Path, workload: ServeWorkload = ServeWorkload(),
                serve_args: list[str] = ()) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {backend: run_backend(model, backend, workload, out_dir, list(serve_args)) for backend in ("stock", "sentinel")}
    report = {"model": model, "workload": asdict(workload), "serve_args": list(serve_args), "runs": runs,
              "ratios": {key: runs["sentinel"][key] / runs["stock"][key]
                         for key in ("request_throughput", "output_throughput") if runs["stock"][key]}}
    (out_dir / "bench-serve.json").write_text(json.dumps(report, indent=2))
    plot(report, out_dir / "bench-serve.png")
    return report


def format_report(report: dict) -> str:
    w = report["workload"]
    lines = [f"vllm bench serve: {w['num_prompts']} requests x {w['input_len']} in x {w['output_len']} out, request "
             f"rate {w['request_rate']}, a KV pool of {w['kv_budget_requests']} uncompressed requests"]
    for backend, run in report["runs"].items():
        lines.append(f"  {backend:>8}: {run['request_throughput']:.2f} req/s {run['output_throughput']:.1f} out tok/s | "
                     + " ".join(f"{m.upper()} p50/p99 {run[f'{m}_ms_p50']:.0f}/{run[f'{m}_ms_p99']:.0f} ms"
                                for m in METRICS))
    if report["ratios"]:
        lines.append("  sentinel / stock: " + ", ".join(f"{v:.2f}x {k.replace('_', ' ')}"
                                                         for k, v in report["ratios"].items()))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{m.upper()} p{p}" for m in METRICS for p in PERCENTILES]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(labels))
    for i, (backend, run) in enumerate(report["runs"].items()):
        values = [run[f"{m}_ms_p{p}"] for m in METRICS for p in PERCENTILES]
        axes[0].bar(x + (i - 0.5) * 0.38, values, 0.38, label=backend)
        axes[1].bar(i, run["output_throughput"], label=backend)
    axes[0].set_xticks(x, labels)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("milliseconds")
    axes[0].set_title("vllm bench serve: latency")
    axes[0].legend()
    axes[1].set_xticks(range(len(report["runs"])), list(report["runs"]))
    axes[1].set_ylabel("output tokens / s")
    axes[1].set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

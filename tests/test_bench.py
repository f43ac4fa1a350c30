"""`vllm-sentinel bench --quick`: every code path of the bench in a small configuration.

Speed is what the bench reports, not what a test asserts; the memory facts below hold on any machine.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "vllm-sentinel")


def test_the_quick_bench_compares_both_engines_and_writes_its_report(sentinel_model_dir, tmp_path):
    result = subprocess.run([CLI, "bench", "--model", str(sentinel_model_dir), "--quick", "--enforce-eager", "--workloads",
                             "kv-bound,long-gen,span-sweep", "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sentinel / stock:" in result.stdout
    label = sentinel_model_dir.name
    report = json.loads((tmp_path / f"bench-{label}.json").read_text())
    kv_bound, long_gen = report["results"]
    assert "both engines eager (--enforce-eager)" in result.stdout and report["settings"]["enforce_eager"]
    stock, sentinel = kv_bound["runs"]["stock"], kv_bound["runs"]["sentinel"]
    assert stock["output_tokens_per_s"] > 0 and kv_bound["ratios"]["output_tokens_per_s"] > 0
    # The KV budget holds four uncompressed requests: stock preempts, the sentinel engine fits them
    # all at once, each in about the KV the semantics page says it needs.
    assert stock["preemptions"] > sentinel["preemptions"] == 0
    assert sentinel["peak_running"] == kv_bound["workload"]["num_prompts"]
    assert kv_bound["kv_slots_vs_ideal"]["ratio"] <= 1.25
    assert sentinel["sentinel_tokens"] == sentinel["spans_closed"] > 0 and stock["sentinel_tokens"] == 0
    # the machine's limit, in the same run: stock with an ample pool
    assert kv_bound["runs"]["stock-ample"]["preemptions"] == 0
    assert kv_bound["ratios_vs_ample"]["output_tokens_per_s"] > 0 and "stock (ample pool)" in result.stdout
    # the limit row: stock at the physical context the sentinel engine held, on decode
    limit = long_gen["limit"]
    held = long_gen["runs"]["sentinel"]["mean_kv_slots_per_request"]
    assert limit["mean_kv_slots"] == held and 16 < held < 32 + 320
    assert limit["workload"]["input_len"] + limit["workload"]["output_len"] / 2 == pytest.approx(held, abs=1.5)
    assert long_gen["runs"]["stock-limit"]["output_tokens_per_s"] > 0 and limit["tpot_ratio"] > 0
    assert "the limit: stock attending to the" in result.stdout
    assert [r["workload"]["span"] for r in report["span_sweep"]] == [4, 16]
    assert "stock" in report["span_sweep"][0]["runs"]
    assert (tmp_path / f"bench-{label}.png").stat().st_size > 10_000


def test_rounds_keep_every_engine_up_and_report_the_median_of_the_rounds_ratios(sentinel_model_dir, tmp_path):
    """--rounds: both engines up at once, taking turns over fresh prompts; each engine's figures are
    its own (vLLM's Prometheus logger of the engine started last would otherwise answer for both)."""
    result = subprocess.run([CLI, "bench", "--model", str(sentinel_model_dir), "--quick", "--enforce-eager",
                             "--workloads", "overhead", "--rounds", "3", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    [overhead] = json.loads((tmp_path / f"bench-{sentinel_model_dir.name}.json").read_text())["results"]
    by_round = overhead["ratios_by_round"]["output_tokens_per_s"]
    assert overhead["rounds"] == 3 and len(by_round) == 3
    assert overhead["ratios"]["output_tokens_per_s"] == pytest.approx(sorted(by_round)[1])
    assert "(median of 3 rounds," in result.stdout
    for backend in ("stock", "sentinel"):
        run = overhead["runs"][backend]
        assert len(run["rounds_elapsed_s"]) == 3
        assert run["peak_running"] == overhead["workload"]["num_prompts"] and run["peak_kv_blocks"] > 0
    assert overhead["runs"]["sentinel"]["sentinel_tokens"] > 0 == overhead["runs"]["stock"]["sentinel_tokens"]


def test_a_bench_stopped_with_sigterm_takes_its_engine_processes_with_it(sentinel_model_dir, tmp_path):
    """SIGTERM (what `kill` and `pkill` send) mid-run: the bench exits and leaves no engine behind.
    Before, its EngineCore and worker processes outlived it, busy, for as long as nobody killed them."""
    import signal
    import time

    import psutil

    proc = subprocess.Popen([CLI, "bench", "--model", str(sentinel_model_dir), "--quick", "--enforce-eager",
                             "--workloads", "overhead", "--rounds", "50", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engines = []
    deadline = time.time() + 300
    while not engines and time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        engines = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())
                   or "EngineCore" in p.name()]
    assert engines, "the bench started no engine"
    time.sleep(5)  # mid-run
    descendants = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    gone, alive = psutil.wait_procs(descendants, timeout=60)
    for orphan in alive:  # a failing run must not leave them busy for the rest of the suite
        orphan.kill()
    assert not alive, [p.name() for p in alive]


def test_the_quick_chat_bench_reads_hits_from_vllm_and_compares_three_engines(sentinel_model_dir, tmp_path):
    """A shared system prompt and conversations; hit rates are vLLM's own counters."""
    result = subprocess.run([CLI, "bench-chat", "--model", str(sentinel_model_dir), "--window", "32", "--quick",
                             "--enforce-eager", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sentinel / stock (both caching)" in result.stdout
    report = json.loads((tmp_path / f"bench-chat-{sentinel_model_dir.name}-w32.json").read_text())
    assert report["schedule"]["window"] == 32
    for part in ("system-prompt", "conversation"):
        runs = {name: run[part] for name, run in report["runs"].items()}
        assert runs["sentinel, no prefix caching"]["prefix_cache_queries"] == 0
        assert runs["stock"]["hit_rate"] > 0.3 and runs["sentinel"]["hit_rate"] > 0.3
        assert runs["sentinel"]["peak_kv_blocks"] < runs["stock"]["peak_kv_blocks"]
        assert all(run["preemptions"] == 0 for run in runs.values())
    # Conversations resume from the last turn's very state: the hit rate is stock's, within 10%.
    assert report["conversation ratios"]["hit_rate"] > 0.9
    assert (tmp_path / f"bench-chat-{sentinel_model_dir.name}-w32.png").stat().st_size > 10_000


def test_long_prompts_run_each_engine_in_its_own_process_and_measure_it(tmp_path):
    result = subprocess.run([CLI, "bench", "--quick", "--enforce-eager", "--workloads", "long-prompt", "--out",
                             str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    [row] = json.loads((tmp_path / "bench-long-prompt.json").read_text())
    assert row["length"] == 512 and row["span"] == 8
    for backend in ("stock", "sentinel"):
        # a process tree running an engine holds far more than a gigabyte; the sampler saw it
        assert row[backend]["ttft_s"] > 0 and row[backend]["peak_rss_gib"] > 0.5
    assert "[long-prompt] one prompt of 512 tokens, span 8" in result.stdout


def test_bench_serve_drives_vllm_bench_serve_against_both_servers(sentinel_model_dir, tmp_path):
    result = subprocess.run([CLI, "bench-serve", "--model", str(sentinel_model_dir), "--num-prompts", "6",
                             "--input-len", "32", "--output-len", "24", "--kv-budget-requests", "2",
                             "--enforce-eager", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "bench-serve.json").read_text())
    for backend in ("stock", "sentinel"):
        run = report["runs"][backend]
        assert run["completed"] == 6 and run["output_throughput"] > 0
        assert run["ttft_ms_p50"] > 0 and run["tpot_ms_p99"] >= run["tpot_ms_p50"] > 0
    assert "sentinel / stock:" in result.stdout and (tmp_path / "bench-serve.png").is_file()
    # the sentinel server compressed (its scheduler says so at start-up); the stock one did not
    assert "sentinel compression on" in (tmp_path / "serve-sentinel.log").read_text()
    assert "sentinel compression on" not in (tmp_path / "serve-stock.log").read_text()


def test_engine_counters_ignore_label_sets_left_by_an_earlier_model_in_the_process():
    # A bench runs several models in one process; Prometheus keeps the first model's label sets.
    from types import SimpleNamespace

    from vllm.v1.metrics.reader import Counter, Gauge

    from vllm_sentinel.observe import _read_metrics

    metrics = [Counter("vllm:sentinel_tokens", {"model_name": "dummy", "engine": "0"}, 9456),
               Counter("vllm:sentinel_tokens", {"model_name": "tiny", "engine": "0"}, 480),
               Counter("vllm:sentinel_tokens", {"model_name": "tiny", "engine": "1"}, 20),
               Gauge("vllm:num_requests_running", {"model_name": "tiny", "engine": "0"}, 3)]
    llm = SimpleNamespace(get_metrics=lambda: metrics, llm_engine=SimpleNamespace(
        vllm_config=SimpleNamespace(model_config=SimpleNamespace(served_model_name="tiny"))))
    assert _read_metrics(llm, "counter") == {"vllm:sentinel_tokens": 500}
    assert _read_metrics(llm, "gauge") == {"vllm:num_requests_running": 3}

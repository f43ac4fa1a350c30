"""The verdict against the issue's targets, the printed table and the plot."""
from __future__ import annotations

from pathlib import Path

from .corpora import CORPORA
from .methods import LABELS, METHODS
from .recall import format_recall, recall_verdicts

CORPUS_NAMES = {"docs": "held-out python3.11-doc documents (the training corpus)",
                "stdlib": "Python standard library .py sources (never trained on)"}
FULL_ATTENTION_MARGIN = 0.10  # sentinel+W within 10% of full attention at ratio 0.5


def verdicts(report: dict) -> dict:
    """sentinel+W against local and sink+window (overall and distant perplexity, every ratio and
    corpus) and against full attention at 0.5. Figures only: nothing here changes what is measured."""
    out = {}
    for corpus, by_ratio in report["results"].items():
        for ratio, row in by_ratio.items():
            ours = row["sentinel_window"]
            for rival in ("local", "sink"):
                for metric in ("perplexity", "distant_perplexity"):
                    ok = None if None in (ours[metric], row[rival][metric]) else ours[metric] < row[rival][metric]
                    out[f"{corpus}@{ratio}: sentinel+W < {LABELS[rival]} ({metric})"] = ok  # None: no such tokens
            if float(ratio) == 0.5:
                out[f"{corpus}@{ratio}: sentinel+W within 10% of full attention"] = (
                    ours["perplexity"] <= (1 + FULL_ATTENTION_MARGIN) * row["full"]["perplexity"])
    recall = report.get("recall")
    if recall is not None:
        # Beyond-the-window targets mean something only where the gate holds (full attention answers
        # at every distance, local attention is at chance beyond its window).
        out["recall gate passed"] = recall["gate"]["passed"]
        if recall["gate"]["passed"]:
            out.update(recall_verdicts(recall["results"]))
    out["all targets met"] = all(ok is True for ok in out.values())
    return out


def _cell(value, width: int = 14) -> str:
    return f"{value:{width}.2f}" if value is not None else f"{'n/a':>{width}}"


def _span_ends(scores: dict) -> str:
    """Perplexity of the targets predicted by a span's first and by its last token."""
    by_offset = [v for v in scores["perplexity_by_span_offset"]]
    if not by_offset or None in (by_offset[0], by_offset[-1]):
        return "n/a"
    return f"{by_offset[0]:.1f}/{by_offset[-1]:.1f}"


def format_report(report: dict) -> str:
    cfg = report["config"]
    lines = format_recall(report["recall"]) + [""] if "recall" in report else []
    use = report["base"]["context_use_docs"]
    lines.append("base model, held-out docs, perplexity of each window's second half with "
                 + ", ".join(f"{k}: {v:.2f}" for k, v in use.items()))
    for corpus in CORPORA:
        c = report["corpora"][corpus]
        lines.append("")
        lines.append(f"{corpus}: {CORPUS_NAMES[corpus]}; {c['windows']} windows of {c['tokens_per_window']} tokens; "
                     f"{cfg['steps']} fine-tuning steps per model")
        lines.append(f"  {'ratio':<6}{'keys':>6}  {'metric':<18}" + "".join(f"{LABELS[m]:>14}" for m in METHODS))
        for ratio, row in report["results"][corpus].items():
            keys = report["plan"][ratio]["keys_per_query"]["sentinel_window"]["last"]
            distant = row["local"]["distant_tokens"]
            for i, (metric, name) in enumerate((("perplexity", "overall"),
                                                ("distant_perplexity", f"distant ({distant})"))):
                head = f"  {ratio:<6}{keys:>6}  " if i == 0 else " " * 14
                lines.append(head + f"{name:<18}" + "".join(_cell(row[m][metric]) for m in METHODS))
            lines.append(" " * 14 + f"{'first/last in span':<18}" + "".join(
                f"{_span_ends(row[m]):>14}" for m in METHODS))
            lines.append(" " * 14 + f"{'ROUGE-L / judge':<18}" + "".join(
                f"{row[m]['continuation']['rougeL_f1']:>7.3f}/{row[m]['continuation']['judge_perplexity']:<6.1f}"
                for m in METHODS))
    lines.append("")
    lines.append("keys per query (last query of a window / mean over the window):")
    for ratio, p in report["plan"].items():
        k = p["keys_per_query"]
        lines.append(f"  {ratio}: target {p['target_keys']}; " + ", ".join(
            f"{LABELS[m]} {k[m]['last']}/{k[m]['mean']:.0f}" for m in METHODS if m != "full")
            + f"; local, sink, scattered = sentinel+W per query: {p['baselines_match_sentinel_window_per_query']}")
        s, w = p["schedules"]["sentinel"], p["schedules"]["sentinel_window"]
        lines.append(f"        sentinel W=0: sink {s['sink']} span {s['span']}; sentinel+W: sink {w['sink']} "
                     f"span {w['span']} window {w['window']}")
    if "recall" in report:
        r = report["recall"]["vllm"]
        held, full = r["kv_slots_per_request"], r["full_attention_slots_per_request"]
        lines.append(f"recall through vLLM (sentinel+W at ratio {r['ratio']}, greedy): {r['greedy_equal_to_transformers']} "
                     f"of {r['queries']} answers equal transformers' greedy ones, exact match {r['exact_match_vllm']:.3f} "
                     f"(transformers {r['exact_match_transformers']:.3f}, {r['verdicts_equal']} verdicts equal); "
                     f"KV slots per request {min(held)}-{max(held)} (mean {sum(held) / len(held):.0f}) against full "
                     f"attention's {min(full)}-{max(full)} (mean {sum(full) / len(full):.0f})")
    v = report["vllm_check"]
    lines.append(f"sentinel+W at ratio {v['ratio']}: perplexity through vLLM {v['vllm']:.4f}, transformers "
                 f"{v['transformers']:.4f} (relative difference {v['relative_difference']:.1e}, worst token "
                 f"{v['max_token_logprob_difference']:.1e}, {v['tokens']} tokens)")
    failed = [k for k, ok in report["verdicts"].items() if ok is not True and k != "all targets met"]
    lines.append(f"targets met: {len(report['verdicts']) - 1 - len(failed)} of {len(report['verdicts']) - 1}"
                 + (f"; missed: {'; '.join(failed)}" if failed else ""))
    lines.append(f"time: {report['seconds']['total']:.0f} s (" + ", ".join(
        f"{k} {v:.0f} s" for k, v in report["seconds"].items() if k != "total") + ")")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(CORPORA), 2, figsize=(11, 4.2 * len(CORPORA)), squeeze=False)
    styles = {"full": "k--", "local": "s-", "sink": "^-", "scattered": "x-", "sentinel": "o:", "sentinel_window": "o-"}
    for row, corpus in enumerate(CORPORA):
        by_ratio = report["results"][corpus]
        ratios = sorted(by_ratio, key=float)
        for col, (metric, title) in enumerate((("perplexity", "overall perplexity"),
                                               ("distant_perplexity", "distant-token perplexity"))):
            ax = axes[row][col]
            for method in METHODS:
                ax.plot([float(r) for r in ratios], [by_ratio[r][method][metric] for r in ratios], styles[method],
                        label=LABELS[method])
            ax.set_title(f"{corpus}: {title}")
            ax.set_xlabel("share of KV dropped (same keys per query for every method)")
            ax.set_ylabel("perplexity")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

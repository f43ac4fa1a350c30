"""Exact-match recall of facts at known distances, per method: what lies beyond the window.

A query is answered exactly when every answer token is the argmax (sentinels banned) given the
true tokens before it, teacher-forced: precisely when greedy decoding from the query's prompt
produces the answer. One dense masked pass per document scores all its queries.

Each query is placed by its distance (how far back its fact begins, `Query.distance`, bucketed)
and against local attention's window at the same ratio (the keys local attention's query sees):
*inside* (all of the fact is visible to it), *beyond* (none of it is) or *partly*. The gate says
whether the table can show anything: full attention must answer every distance bucket, local
attention must fall to chance beyond its window. The sentinel rows also say how many of the facts
beyond the window one span holds whole (key and value under one `<CR>`); a fact cut between two
spans leaves its key under one `<CR>` and its value under the next, and a `<CR>` sees only its span.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from ..config import Regions
from ..schedule import MarkedSpans
from ..training.batching import build_example
from ..training.recall import RecallDocument
from .methods import LABELS, METHODS, spans_of
from .scoring import examples_for, masked_logits

BUCKETS = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PLACES = ("inside", "partly", "beyond")
GATE_FULL = 0.95          # full attention, every distance bucket
GATE_LOCAL_CHANCE = 0.02  # local attention beyond its window: at most this (chance is 10^-digits)
TARGET_BEYOND = 0.8       # sentinel+W beyond local's window, at the target ratios
TARGET_FACTOR = 10.0      # ... and this many times local's and sink+window's accuracy there
TARGET_INSIDE = 0.9       # every method, facts inside local's window
TARGET_RATIOS = (0.75, 0.9)


def bucket_names(length: int) -> list[str]:
    edges = [e for e in BUCKETS if e < length] + [length]
    return [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]


def bucket_of(distance: int, length: int) -> str:
    edges = [e for e in BUCKETS if e < length] + [length]
    for a, b in zip(edges[:-1], edges[1:]):
        if a <= distance < b:
            return f"{a}-{b - 1}"
    raise ValueError(f"distance {distance} outside 0..{length - 1}")


@torch.no_grad()
def predicted_tokens(model, examples, sentinel_ids: tuple[int, int], batch_size: int, progress=None) -> list[torch.Tensor]:
    """Per example `[n]`: the argmax next token after each real token, sentinels banned."""
    out = []
    for part, _, logits in masked_logits(model, examples, batch_size, sentinel_ids, progress):
        best = logits.argmax(-1)
        for row, example in enumerate(part):
            ids = example.input_ids
            real = ((ids != sentinel_ids[0]) & (ids != sentinel_ids[1])).nonzero().squeeze(1)
            out.append(best[row, real])
    return out


def query_rows(documents: list[RecallDocument], predictions: list[torch.Tensor]) -> list[dict]:
    rows = []
    for doc, pred in zip(documents, predictions):
        for q in doc.queries:
            answer = pred[q.answer_start - 1: q.answer_end - 1]
            rows.append({"kind": q.kind, "distance": q.distance, "fact_start": q.fact_start, "core_start": q.core_start,
                         "fact_end": q.fact_end, "answer_start": q.answer_start, "answer_end": q.answer_end,
                         "hit": bool(torch.equal(answer, doc.ids[q.answer_start: q.answer_end]))})
    return rows


def score_recall(model, documents: list[RecallDocument], regime: str, schedule, sentinel_ids: tuple[int, int],
                 batch_size: int, seed: int = 0, progress=None) -> list[dict]:
    """One row per query: where its fact stands and whether the model answers it exactly."""
    n = documents[0].ids.numel()
    examples = examples_for([d.ids for d in documents], regime, spans_of(schedule, n), sentinel_ids,
                            schedule.window if schedule else 0, seed=seed)
    return query_rows(documents, predicted_tokens(model, examples, sentinel_ids, batch_size, progress))


def marked_spans(document: RecallDocument, schedule) -> torch.Tensor:
    """The "documents compressed, question raw" layout: one marked region, the prose with its facts."""
    n = document.ids.numel()
    return MarkedSpans(schedule, Regions(((0, document.questions_start),), n)).spans(n)


def score_marked_recall(model, regime: str, documents: list[RecallDocument], schedule, sentinel_ids: tuple[int, int],
                        batch_size: int, progress=None) -> dict:
    """Recall with the documents marked and the questions raw (semantics page, "Marked regions"):
    sentinel compression of the marked region, or a baseline at the same keys per query (its mask
    is built from the same spans). Accuracy overall and by the fact's place against local
    attention's window in that layout."""
    spans = [marked_spans(d, schedule) for d in documents]
    local = [build_example(d.ids, "local", s, *sentinel_ids, window=schedule.window) for d, s in zip(documents, spans)]
    places = [place(asdict(q), example.mask.sum(dim=1)) for d, example in zip(documents, local) for q in d.queries]
    examples = local if regime == "local" else [
        build_example(d.ids, regime, s, *sentinel_ids, window=schedule.window) for d, s in zip(documents, spans)]
    rows = query_rows(documents, predicted_tokens(model, examples, sentinel_ids, batch_size, progress))
    return {"all": accuracy(rows), "by_place": {p: accuracy([r for r, q in zip(rows, places) if q == p]) for p in PLACES}}


def place(row: dict, local_keys: torch.Tensor) -> str:
    """inside / partly / beyond: the fact against the keys local attention's query sees."""
    t = row["answer_start"] - 1
    oldest = t - int(local_keys[t]) + 1
    if row["fact_start"] >= oldest:
        return "inside"
    if row["fact_end"] - 1 < oldest:
        return "beyond"
    return "partly"


def held_by_one_span(row: dict, spans: torch.Tensor) -> bool:
    """The fact's key and value lie in one span (the fact ends with its value and a full stop)."""
    value_end = row["fact_end"] - 1
    return bool(((spans[:, 0] <= row["core_start"]) & (spans[:, 1] >= value_end)).any()) if spans.numel() else False


def accuracy(rows: list[dict]) -> dict:
    hits = sum(r["hit"] for r in rows)
    return {"accuracy": hits / len(rows) if rows else None, "hits": hits, "queries": len(rows)}


def summarise_recall(rows: list[dict], local_keys: torch.Tensor, schedule, length: int) -> dict:
    """Accuracy by distance bucket (all kinds and per kind), by place against local's window, and for
    a sentinel schedule, beyond the window split by whether one span holds the fact."""
    out = {"all": accuracy(rows),
           "by_bucket": {b: accuracy([r for r in rows if bucket_of(r["distance"], length) == b])
                         for b in bucket_names(length)},
           "by_kind": {kind: {b: accuracy([r for r in rows if r["kind"] == kind and bucket_of(r["distance"], length) == b])
                              for b in bucket_names(length)} for kind in sorted({r["kind"] for r in rows})},
           "by_place": {p: accuracy([r for r in rows if place(r, local_keys) == p]) for p in PLACES}}
    if schedule is not None:
        spans = spans_of(schedule, length)
        beyond = [r for r in rows if place(r, local_keys) == "beyond"]
        out["beyond_one_span"] = accuracy([r for r in beyond if held_by_one_span(r, spans)])
        out["beyond_cut"] = accuracy([r for r in beyond if not held_by_one_span(r, spans)])
    return out


def gate(results: dict) -> dict:
    """Whether the base and the task show anything: full attention answers every distance bucket,
    local attention is at chance beyond its window at every ratio."""
    any_ratio = next(iter(results.values()))
    full = {b: a["accuracy"] for b, a in any_ratio["full"]["by_bucket"].items() if a["queries"]}
    local = {ratio: row["local"]["by_place"]["beyond"]["accuracy"] for ratio, row in results.items()}
    checks = {f"full attention >= {GATE_FULL} in every distance bucket": all(v >= GATE_FULL for v in full.values()),
              f"local attention <= {GATE_LOCAL_CHANCE} beyond its window at every ratio":
                  all(v is not None and v <= GATE_LOCAL_CHANCE for v in local.values())}
    return {"full_by_bucket": full, "local_beyond": local, "checks": checks, "passed": all(checks.values())}


def recall_verdicts(results: dict) -> dict:
    out = {}
    for ratio, row in results.items():
        if float(ratio) in TARGET_RATIOS:
            ours = row["sentinel_window"]["by_place"]["beyond"]["accuracy"]
            rivals = [row[m]["by_place"]["beyond"]["accuracy"] for m in ("local", "sink")]
            ok = ours is not None and ours >= TARGET_BEYOND and all(r is not None and ours >= TARGET_FACTOR * r
                                                                     for r in rivals)
            out[f"recall@{ratio}: sentinel+W >= {TARGET_BEYOND} beyond local's window and >= {TARGET_FACTOR:g}x "
                f"local and sink+window"] = ok
        for method in METHODS:
            inside = row[method]["by_place"]["inside"]["accuracy"]
            out[f"recall@{ratio}: {LABELS[method]} >= {TARGET_INSIDE} inside local's window"] = (
                None if inside is None else inside >= TARGET_INSIDE)
    return out


def _cell(a: dict, width: int = 13) -> str:
    return f"{a['accuracy']:{width}.2f}" if a["queries"] else f"{'-':>{width}}"


def format_recall(recall: dict) -> list[str]:
    g = recall["gate"]
    lines = [f"recall gate: {'PASSED' if g['passed'] else 'FAILED: the recall table below is not a result'}"]
    for check, ok in g["checks"].items():
        lines.append(f"  [{'x' if ok else ' '}] {check}")
    lines.append("  full attention by distance: " + ", ".join(f"{b} {v:.2f}" for b, v in g["full_by_bucket"].items()))
    docs = recall["documents"]
    lines.append(f"recall: exact match of {docs['queries']} queries in {docs['documents']} held-out documents "
                 f"({docs['digits']}-digit values: chance {10.0 ** -docs['digits']:.0e}), by the fact's distance")
    for ratio, row in recall["results"].items():
        keys = recall["local_keys_last"][ratio]
        lines.append(f"  ratio {ratio} (local attention's query sees its last {keys} tokens)")
        lines.append(f"    {'distance':<12}" + "".join(f"{LABELS[m]:>13}" for m in METHODS))
        for bucket in next(iter(row.values()))["by_bucket"]:
            lines.append(f"    {bucket:<12}" + "".join(_cell(row[m]["by_bucket"][bucket]) for m in METHODS))
        for p in PLACES:
            count = row["local"]["by_place"][p]["queries"]
            lines.append(f"    {p + f' ({count})':<12}" + "".join(_cell(row[m]["by_place"][p]) for m in METHODS))
        one, cut = row["sentinel_window"]["beyond_one_span"], row["sentinel_window"]["beyond_cut"]
        lines.append(f"    sentinel+W beyond the window: {_cell(one, 0).strip()} of {one['queries']} facts one span holds, "
                     f"{_cell(cut, 0).strip()} of {cut['queries']} cut between spans")
    for ratio, row in recall.get("marked", {}).items():
        lines.append(f"  documents marked, questions raw (ratio {ratio}'s schedule inside the prose, equal keys per "
                     "query): " + "; ".join(
                         f"{LABELS[m]} {_cell(r['all'], 0).strip()} (beyond local's window "
                         f"{_cell(r['by_place']['beyond'], 0).strip()} of {r['by_place']['beyond']['queries']})"
                         for m, r in row.items()))
    return lines


def plot_recall(recall: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = recall["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    styles = {"full": "k--", "local": "s-", "sink": "^-", "scattered": "x-", "sentinel": "o:", "sentinel_window": "o-"}
    for ax, (ratio, row) in zip(axes[0], results.items()):
        buckets = list(next(iter(row.values()))["by_bucket"])
        for method in METHODS:
            values = [row[method]["by_bucket"][b]["accuracy"] for b in buckets]
            ax.plot(range(len(buckets)), [v if v is not None else float("nan") for v in values], styles[method],
                    label=LABELS[method])
        ax.axvline(sum(int(b.split("-")[1]) < recall["local_keys_last"][ratio] for b in buckets) - 0.5, color="grey",
                   lw=0.8, ls=":")
        ax.set_xticks(range(len(buckets)), buckets, rotation=30, fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"ratio {ratio}: exact-match recall")
        ax.set_xlabel("distance of the fact (tokens); dotted: local's window")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8)
    if not recall["gate"]["passed"]:
        fig.suptitle("gate FAILED: not a result", color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

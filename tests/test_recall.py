"""Recall documents (facts in prose, asked for later) and how recall is scored against local attention's window."""
import pytest
import torch

from vllm_sentinel.config import ScheduleConfig
from vllm_sentinel.quality.recall import (bucket_names, bucket_of, gate, held_by_one_span, place, query_rows,
                                          summarise_recall)
from vllm_sentinel.schedule import ScheduledSpans
from vllm_sentinel.training.corpus import encode_documents, load_documents
from vllm_sentinel.training.recall import SINK_CLEAR, RecallConfig, RecallGenerator, draw_windows


@pytest.fixture(scope="module")
def tokenizer():
    from vllm_sentinel.random_model import corpus_tokenizer

    return corpus_tokenizer(4096)


@pytest.fixture(scope="module")
def prose(tokenizer):
    return [t for doc in encode_documents(load_documents()[:120], tokenizer) for t in doc]


def test_documents_state_each_fact_once_and_ask_for_it_with_its_answer(tokenizer, prose):
    cfg = RecallConfig(length=512, digits=4, facts=6, queries=4)
    documents = RecallGenerator(prose, tokenizer, cfg).evaluation_set(12, seed=3)
    assert [d.kind for d in documents] == ["passkey"] * 12 + ["multi"] * 12
    for doc in documents:
        assert doc.ids.numel() == 512
        assert len(doc.queries) == (1 if doc.kind == "passkey" else 4)
        for q in doc.queries:
            fact = tokenizer.decode(doc.ids[q.fact_start: q.fact_end])
            answer = tokenizer.decode(doc.ids[q.answer_start: q.answer_end])
            value = answer.strip()
            assert len(value) == 4 and value.isdigit()
            key = tokenizer.decode(doc.ids[q.core_start: q.fact_end])
            if doc.kind == "passkey":
                assert fact == f" The pass key is {value}." and key == f" pass key is {value}."
            else:
                assert fact.startswith(" The code for ") and fact.endswith(f" is {value}.")
                assert key == fact[len(" The code for"):]
            # the query repeats the fact's words and is followed by the same value tokens
            query = doc.ids[q.answer_start - (q.fact_end - q.fact_start - (q.answer_end - q.answer_start) - 1): q.answer_end]
            assert torch.equal(query, doc.ids[q.fact_start: q.fact_end - 1])
            assert q.fact_start >= SINK_CLEAR and q.distance == q.answer_start - 1 - q.fact_start
        starts = sorted((q.fact_start, q.fact_end) for q in doc.queries)
        assert all(a[1] <= b[0] for a, b in zip(starts, starts[1:]))  # facts never overlap
    again = RecallGenerator(prose, tokenizer, cfg).evaluation_set(12, seed=3)
    assert all(torch.equal(a.ids, b.ids) and a.queries == b.queries for a, b in zip(documents, again))
    distances = [q.distance for d in documents for q in d.queries]
    assert min(distances) < 100 and max(distances) > 400  # spread over the whole document


def test_multi_fact_documents_use_distinct_words_and_ask_a_shuffled_subset(tokenizer, prose):
    documents = RecallGenerator(prose, tokenizer, RecallConfig(length=1024, facts=8, queries=6)).evaluation_set(8, 5)
    orders = []
    for doc in documents[8:]:
        facts = [tokenizer.decode(doc.ids[q.fact_start: q.fact_end]) for q in doc.queries]
        assert len(set(f.split(" is ")[0] for f in facts)) == 6
        orders.append([q.fact_start for q in doc.queries])
    assert any(o != sorted(o) for o in orders)  # asked in another order than stated


def test_draw_windows_without_recall_draws_as_plain_sampling(tokenizer, prose):
    stream = torch.tensor(prose)
    ours = draw_windows(stream, 64, 5, torch.Generator().manual_seed(4))
    starts = torch.randint(0, stream.numel() - 64, (5,), generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(w, stream[s: s + 64]) for w, s in zip(ours, starts.tolist()))
    recall = RecallGenerator(prose, tokenizer, RecallConfig(length=128, facts=2, queries=2))
    mixed = draw_windows(stream, 128, 40, torch.Generator().manual_seed(4), recall, share=0.5)
    code = tokenizer(" The code for", add_special_tokens=False)["input_ids"]
    with_facts = sum(any(w[i: i + len(code)].tolist() == code for i in range(128)) for w in mixed)
    assert 8 <= with_facts <= 32 and all(w.numel() == 128 for w in mixed)
    with pytest.raises(ValueError, match="recall documents have 128 tokens"):
        draw_windows(stream, 64, 2, torch.Generator(), recall, share=0.5)


def rows_at(distances, fact_len=10):
    """Queries at 1000 with facts starting `distance` tokens back (fact_len tokens each)."""
    return [{"kind": "multi", "distance": d, "fact_start": 999 - d, "core_start": 999 - d + 3,
             "fact_end": 999 - d + fact_len, "answer_start": 1000, "answer_end": 1003, "hit": hit}
            for d, hit in distances]


def test_facts_are_placed_against_local_attentions_window():
    keys = torch.full((1024,), 100)  # the query at 999 sees 900..999
    inside, partly, beyond = rows_at([(99, True), (100, True), (109, False)])
    assert place(inside, keys) == "inside" and place(partly, keys) == "partly" and place(beyond, keys) == "beyond"
    assert place(rows_at([(108, False)])[0], keys) == "partly"  # its last token, 900, is still seen


def test_one_span_holds_a_fact_only_from_its_key_to_its_value():
    spans = ScheduledSpans(ScheduleConfig(4, 20, 0)).spans(1024)  # [4, 24), [24, 44), ...
    [row] = rows_at([(999 - 21, True)])  # fact 21..31, key from 24, value ends at 30: inside [24, 44)
    assert held_by_one_span(row, spans)
    [row] = rows_at([(999 - 17, True)])  # fact 17..27: key at 20, value ends at 26: cut at 24
    assert not held_by_one_span(row, spans)
    assert not held_by_one_span(row, spans[:0])


def test_summaries_buckets_and_the_gate():
    assert bucket_names(1024) == ["0-31", "32-63", "64-127", "128-255", "256-511", "512-1023"]
    assert bucket_of(0, 1024) == "0-31" and bucket_of(1023, 1024) == "512-1023"
    keys = torch.full((1024,), 100)
    rows = rows_at([(10, True), (20, True), (300, False), (600, False), (700, True)])
    summary = summarise_recall(rows, keys, ScheduleConfig(4, 20, 0), 1024)
    assert summary["by_place"]["inside"] == {"accuracy": 1.0, "hits": 2, "queries": 2}
    assert summary["by_place"]["beyond"]["hits"] == 1 and summary["by_place"]["beyond"]["queries"] == 3
    assert summary["by_bucket"]["512-1023"]["accuracy"] == 0.5 and summary["by_bucket"]["32-63"]["queries"] == 0
    perfect = summarise_recall(rows_at([(d, True) for d in (10, 40, 70, 130, 300, 600)]), keys, None, 1024)
    blind = summarise_recall(rows_at([(10, True), (300, False), (600, False)]), keys, None, 1024)
    assert gate({"0.9": {"full": perfect, "local": blind}})["passed"]
    assert not gate({"0.9": {"full": blind, "local": blind}})["passed"]           # full misses far facts
    assert not gate({"0.9": {"full": perfect, "local": perfect}})["passed"]       # local "sees" beyond its window


def test_query_rows_score_every_answer_token(tokenizer, prose):
    [doc] = RecallGenerator(prose, tokenizer, RecallConfig(length=256, facts=2, queries=1)).evaluation_set(1, 0)[1:]
    [q] = doc.queries
    right = torch.roll(doc.ids, -1)  # the true next token everywhere
    assert query_rows([doc], [right])[0]["hit"]
    wrong = right.clone()
    wrong[q.answer_end - 2] += 1  # the last answer token
    assert not query_rows([doc], [wrong])[0]["hit"]


def test_the_marked_layout_compresses_the_prose_only_and_local_keeps_as_many_keys(tokenizer, prose):
    """"Documents compressed, question raw": spans only before the questions; local attention built
    from the same spans sees exactly as many keys per real token as the sentinel stream."""
    from vllm_sentinel.masks import build_stream
    from vllm_sentinel.quality.recall import marked_spans
    from vllm_sentinel.training.batching import build_example

    schedule = ScheduleConfig(4, 8, 0, 8)
    docs = RecallGenerator(prose, tokenizer, RecallConfig(length=256, facts=3, queries=2)).evaluation_set(2, seed=4)
    for doc in docs:
        spans = marked_spans(doc, schedule)
        first_question = min(q.answer_start for q in doc.queries)
        assert spans.numel() and doc.questions_start < first_question and int(spans[:, 1].max()) <= doc.questions_start
        stream = build_stream(doc.ids, spans, 1, 2, window=schedule.window)
        local = build_example(doc.ids, "local", spans, 1, 2, window=schedule.window)
        assert torch.equal(stream.mask[stream.real_positions].sum(1), local.mask.sum(1))

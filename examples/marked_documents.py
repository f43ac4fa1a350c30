"""Compress the documents, keep the question: one chat request whose document messages are marked.

    .venv/bin/python examples/marked_documents.py --model models/tiny

A retrieval-style conversation (a few documents from the corpus, then a question) is sent twice
through the sentinel engine: once with every document message marked `"sentinel": "compress"`,
once unmarked (the schedule's sink and spans are then off: the request asks for regions and marks
none, so nothing of the prompt is compressed). Prints the marked regions the chat template's
rendering gave, each answer, and the KV blocks vLLM's pool held for each. Over HTTP the same
messages go to `/v1/chat/completions` as they are; offline, `marked_chat` renders them.
"""
import argparse

from vllm_sentinel.logs import route_vllm_logs

QUESTION = "In one sentence: what do these documents say about modules?"


def documents(count: int, chars: int) -> list[str]:
    from vllm_sentinel.training.corpus import DEFAULT_CORPUS, load_documents

    docs = load_documents(DEFAULT_CORPUS / "tutorial")
    return [" ".join(d.text[:chars].split()) for d in docs if "module" in d.text][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny")
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--chars", type=int, default=1500, help="characters of each document")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--verbose", action="store_true", help="vLLM's log on the terminal, not in runs/logs/")
    args = parser.parse_args()
    log_file = route_vllm_logs("runs/logs/marked_documents.log", verbose=args.verbose)
    from vllm import LLM, SamplingParams  # after the log routing: vLLM configures its logging at import

    from vllm_sentinel import marked_chat
    from vllm_sentinel.observe import run_workload

    if log_file:
        print(f"(vLLM's log: {log_file})")
    messages = [{"role": "user", "content": text, "sentinel": "compress"}
                for text in documents(args.documents, args.chars)]
    messages.append({"role": "user", "content": QUESTION})

    llm = LLM(model=args.model, attention_backend="sentinel", block_size=32, max_num_batched_tokens=256,
              max_model_len=2048, kv_cache_memory_bytes=1 << 28, enforce_eager=True, disable_log_stats=False,
              use_tqdm_on_load=args.verbose)
    prompt_ids, regions = marked_chat(llm.get_tokenizer(), messages)
    print(f"prompt: {len(prompt_ids)} tokens; the {args.documents} marked documents are regions {regions}, "
          f"the question's {len(prompt_ids) - regions[-1][1]} tokens after them stay raw")
    held = {}
    for name, marked in (("documents marked", regions), ("nothing marked", [])):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0, repetition_penalty=1.3,
                                extra_args={"sentinel": {"regions": marked}})
        record = run_workload(llm, [prompt_ids], params)
        held[name] = record.peak_kv_blocks
        answer = record.outputs[0].outputs[0].text.strip().replace("\n", " ")
        print(f"{name:>17}: peak KV blocks held {record.peak_kv_blocks:3d} (32 tokens each) | "
              f"answer: {answer[:160]!r}")
    marked_blocks, plain_blocks = held["documents marked"], held["nothing marked"]
    print(f"marking the documents held {marked_blocks / plain_blocks:.2f}x the KV of the unmarked request")
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()

"""Stream from `vllm serve --attention-backend sentinel` with the openai client.

    .venv/bin/vllm serve models/tiny --attention-backend sentinel --kv-cache-memory-bytes 1G &
    .venv/bin/python examples/openai_stream.py --model models/tiny

A completion and a chat answer arrive token by token; the last request turns compression off for
itself (`vllm_xargs`), which the server's other requests do not notice.
"""
import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--model", default="models/tiny", help="the name the server serves the model under")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")

    print("completion: ", end="", flush=True)
    for chunk in client.completions.create(model=args.model, prompt="To read a file line by line,",
                                           max_tokens=args.max_tokens, stream=True):
        print(chunk.choices[0].text, end="", flush=True)

    print("\n\nchat: ", end="", flush=True)
    messages = [{"role": "user", "content": "What does the with statement do?"}]
    for chunk in client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)

    uncompressed = client.completions.create(model=args.model, prompt="A list comprehension is", max_tokens=16,
                                             extra_body={"vllm_xargs": {"sentinel_enabled": False}})
    print(f"\n\nwithout compression: {uncompressed.choices[0].text!r}")


if __name__ == "__main__":
    main()

"""Talk to a pdrun deployment with the official openai client: a completion, then a streamed chat.

    python examples/client.py [--url http://127.0.0.1:8000/v1] [--words 1500]

Start the deployment first (bash examples/run-demo-cpu.sh, or pdrun launch). A prefiller computes
the prompt and the first token and hands the prompt's KV to a decoder, which generates the rest;
the answers are what one vLLM would give (greedy here). The proxy's /metrics counts the hand-offs.
"""

from __future__ import annotations

import argparse
import time

import openai


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--words", type=int, default=1500, help="prompt length in words")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key="none")
    model = client.models.list().data[0].id
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * (args.words // 9 + 1))

    t0 = time.perf_counter()
    r = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
    print(f"completion ({r.usage.prompt_tokens} prompt tokens, {time.perf_counter() - t0:.2f}s): {r.choices[0].text!r}")

    t0 = time.perf_counter()
    first = None
    print("chat, streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=32,
        temperature=0,
        stream=True,
    )
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            print(event.choices[0].delta.content, end="", flush=True)
    print(f"\n(first token after {first or 0:.2f}s)")


if __name__ == "__main__":
    main()

"""How far one vLLM's logprobs move when a prompt and its first output token are sent again as a
new prompt, against continuing the first answer.

    python examples/first_step_numerics.py --url http://127.0.0.1:8000 [--lengths 1024,1792,64]

Point it at a plain vLLM (no pdrun). For each prompt length it asks for 4 tokens, then sends the
prompt with the first of them appended and asks for 3: the same positions, computed once by
decode steps and once as a new request over the prompt's cached KV. vLLM's prefix cache holds
whole KV blocks only (16 tokens on GPUs, 128 on vLLM's CPU backend), so where the prompt ends
inside a block the new request recomputes that block's tokens, as one shorter batch; where it
ends on a block's edge, only the appended token is computed: the step a pdrun decoder runs after
a hand-off. A difference on a block's edge would be the decoder's; elsewhere it is what
recomputing a few tokens in a batch of another shape does to the last bits.
"""

from __future__ import annotations

import argparse
import random

import httpx


def complete(url: str, model: str, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    body = {"model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "logprobs": 1, "return_token_ids": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--lengths", default="1024,1792,64", help="first,last,step prompt lengths in tokens")
    args = ap.parse_args()
    first, last, step = (int(x) for x in args.lengths.split(","))
    model = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    print("prompt tokens | tokens equal | max |logprob difference|")
    for n in range(first, last + 1, step):
        rng = random.Random(n)
        ids = [rng.randrange(100, 4000) for _ in range(n)]  # fresh prompts: nothing cached before
        tokens, logprobs = complete(args.url, model, ids, 4)
        again, again_logprobs = complete(args.url, model, ids + tokens[:1], 3)
        diff = max(abs(a - b) for a, b in zip(logprobs[1:], again_logprobs, strict=True))
        print(f"{n} | {tokens[1:] == again} | {diff:.1e}")


if __name__ == "__main__":
    main()

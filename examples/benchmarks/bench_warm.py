"""Warm TTFT of one long prompt at several endpoints, interleaved: what a request costs on top of
the model's own step when everything it needs is already in the GPU cache.

Give it the endpoints of the same model side by side, e.g. plain vLLM, pdrun's proxy and the pdrun
instance behind that proxy: the proxy's share is proxy - instance, the connector's share is
instance - plain. Each endpoint gets the prompt once to warm it, then --rounds more, the endpoints
taking turns. With --fresh every round sends a new prompt twice (cold, then the warm request
measured): a tier is then still taking in the cold request's chunks, as in `pdrun bench`'s reuse.

    python examples/benchmarks/bench_warm.py --url plain=http://127.0.0.1:8200 \
        --url proxy=http://127.0.0.1:8000 --url instance=http://127.0.0.1:8100 --tokens 16384
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from pathlib import Path

import httpx

from pdrun.launch.workloads import Target, prompt, quantile, send


async def measure(
    targets: dict[str, Target], tokens: int, rounds: int, output: int, fresh: bool
) -> dict[str, list[float]]:
    rng = random.Random(0)
    ids = prompt(rng, tokens)
    ttfts: dict[str, list[float]] = {name: [] for name in targets}
    async with httpx.AsyncClient(timeout=600) as client:
        if not fresh:
            for target in targets.values():
                await send(client, target, ids, output)  # the prompt is now in its GPU cache
        for _ in range(rounds):
            if fresh:
                ids = prompt(rng, tokens)
            for name, target in targets.items():
                if fresh:
                    await send(client, target, ids, 1)
                o = await send(client, target, ids, output)
                if o.ttft is not None:
                    ttfts[name].append(o.ttft)
    return ttfts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", action="append", required=True, help="NAME=URL, one per endpoint (at least one)")
    ap.add_argument("--model", default=None, help="served model name (default: the first endpoint's)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--output", type=int, default=4, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fresh", action="store_true", help="a new prompt each round, sent cold just before")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    urls = {}
    for spec in args.url:
        name, sep, url = spec.partition("=")
        if not sep or not url.startswith("http"):
            ap.error(f"--url {spec!r}: give NAME=http://host:port")
        urls[name] = url.rstrip("/")
    model = args.model or httpx.get(f"{next(iter(urls.values()))}/v1/models").json()["data"][0]["id"]
    targets = {name: Target(url, model) for name, url in urls.items()}
    ttfts = asyncio.run(measure(targets, args.tokens, args.rounds, args.output, args.fresh))
    first = quantile(next(iter(ttfts.values())), 0.5) or 0.0
    print(f"warm TTFT, {args.tokens}-token prompt, {args.rounds} rounds (ms: median [p10 - p90], minus the first)")
    figures = {}
    for name, values in ttfts.items():
        med, p10, p90 = (1e3 * (quantile(values, q) or 0.0) for q in (0.5, 0.1, 0.9))
        figures[name] = {"median_ms": med, "p10_ms": p10, "p90_ms": p90, "n": len(values)}
        print(f"  {name:>12} {med:8.2f} [{p10:.2f} - {p90:.2f}]  {med - 1e3 * first:+.2f}")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"tokens": args.tokens, "rounds": args.rounds, "fresh": args.fresh, "ttft": figures}, indent=1)
        )


if __name__ == "__main__":
    main()

"""Warm TTFT of one long prompt at several endpoints, interleaved: what a request costs on top of
the model's own step when everything it needs is already in the GPU cache.

Give it the endpoints of the same model side by side, e.g. plain vLLM, pdrun's proxy and the pdrun
instance behind that proxy: the proxy's share is proxy - instance, the connector's share is
instance - plain. Each endpoint gets the prompt once to warm it, then --rounds more, the endpoints
taking turns in an order shuffled every round (no endpoint always follows the same other). Besides
each endpoint's own median, it reports the median of its round-by-round difference to the first
endpoint, with a 90% bootstrap interval: a difference of a millisecond or two is then told apart
from the host's drift, which moves every endpoint's median by several. With --fresh every round
sends a new prompt twice (cold, then the warm request measured): a tier is then still taking in
the cold request's chunks, as in `pdrun bench`'s reuse. With --evict N every round sends a new
prompt, then N others of its length, then the prompt again (measured): with GPU caches of fewer
than N + 1 such prompts, what comes back from a CPU tier.

An endpoint given as NAME=URL@METRICS_URL (a vLLM instance's own URL; for plain vLLM the same URL)
also has its server-side phases of each measured request read from its Prometheus metrics: vLLM's
queue time (arrival in the engine to first scheduled: a request waiting for a KV load waits here),
its prefill time (first scheduled to first token) and pdrun's cache-tier load seconds; what the
server's TTFT leaves over is its front end (HTTP, parsing, hashing the prompt).

    python examples/benchmarks/bench_warm.py --url plain=http://127.0.0.1:8200@http://127.0.0.1:8200 \
        --url proxy=http://127.0.0.1:8000@http://127.0.0.1:8100 --tokens 16384 --evict 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from pathlib import Path

import httpx

from pdrun.launch.systems import summed
from pdrun.launch.workloads import Target, prompt, quantile, send

# server-side phase -> the Prometheus sample whose growth over one request measures it
PHASES = {
    "server_ttft": "vllm:time_to_first_token_seconds_sum",
    "queue": "vllm:request_queue_time_seconds_sum",
    "prefill": "vllm:request_prefill_time_seconds_sum",
    "tier_load": "pdrun:cache_load_seconds_total",
}


async def sums(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The phases' samples now, summed over their labels."""
    return summed((await client.get(f"{url}/metrics")).text, PHASES.values())


async def measure(
    targets: dict[str, Target],
    tokens: int,
    rounds: int,
    output: int,
    fresh: bool = False,
    evict: int = 0,
    metrics: dict[str, str] | None = None,
) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Each endpoint's TTFTs, and the server-side phases of those with `metrics` (NAME -> URL)."""
    metrics = metrics or {}
    rng = random.Random(0)
    ids = prompt(rng, tokens)
    ttfts: dict[str, list[float | None]] = {name: [] for name in targets}  # round by round
    phases: dict[str, dict[str, list[float]]] = {name: {p: [] for p in PHASES} for name in metrics}
    async with httpx.AsyncClient(timeout=600) as client:
        if not fresh and not evict:
            for target in targets.values():
                await send(client, target, ids, output)  # the prompt is now in its GPU cache
        order, names = random.Random(1), list(targets)
        for _ in range(rounds):
            if fresh or evict:
                ids = prompt(rng, tokens)
                others = [prompt(rng, tokens) for _ in range(evict)]
            order.shuffle(names)
            for name in names:
                target = targets[name]
                if fresh or evict:
                    for p in [ids, *others]:
                        await send(client, target, p, 1)
                before = await sums(client, metrics[name]) if name in metrics else None
                o = await send(client, target, ids, output)
                ttfts[name].append(o.ttft)
                if before is not None:
                    after = await sums(client, metrics[name])
                    for phase, sample in PHASES.items():
                        phases[name][phase].append(after[sample] - before[sample])
    return ttfts, phases


def paired(values: list[float | None], base: list[float | None], seed: int = 0) -> tuple[float, float, float] | None:
    """The median of the round-by-round differences values - base, and its 90% bootstrap interval
    (rounds resampled); None without a round both answered."""
    diffs = [v - b for v, b in zip(values, base, strict=True) if v is not None and b is not None]
    if not diffs:
        return None
    rng = random.Random(seed)
    medians = [quantile(rng.choices(diffs, k=len(diffs)), 0.5) or 0.0 for _ in range(2000)]
    return quantile(diffs, 0.5) or 0.0, quantile(medians, 0.05) or 0.0, quantile(medians, 0.95) or 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", action="append", required=True, help="NAME=URL[@METRICS_URL], one per endpoint")
    ap.add_argument("--model", default=None, help="served model name (default: the first endpoint's)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--output", type=int, default=4, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fresh", action="store_true", help="a new prompt each round, sent cold just before")
    ap.add_argument("--evict", type=int, default=0, metavar="N", help="a new prompt each round, then N others")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    urls, metrics = {}, {}
    for spec in args.url:
        name, sep, url = spec.partition("=")
        url, _, metrics_url = url.partition("@")
        if not sep or not url.startswith("http") or (metrics_url and not metrics_url.startswith("http")):
            ap.error(f"--url {spec!r}: give NAME=http://host:port, or NAME=http://host:port@http://host:port")
        urls[name] = url.rstrip("/")
        if metrics_url:
            metrics[name] = metrics_url.rstrip("/")
    model = args.model or httpx.get(f"{next(iter(urls.values()))}/v1/models").json()["data"][0]["id"]
    targets = {name: Target(url, model) for name, url in urls.items()}
    ttfts, phases = asyncio.run(
        measure(targets, args.tokens, args.rounds, args.output, args.fresh, args.evict, metrics)
    )
    base = next(iter(ttfts.values()))
    kind = f"after {args.evict} others" if args.evict else "warm"
    print(
        f"{kind} TTFT, {args.tokens}-token prompt, {args.rounds} rounds (ms: median [p10 - p90]; "
        "median of the rounds' differences to the first [90% interval])"
    )
    figures: dict[str, dict[str, float]] = {}
    for name, answered in ttfts.items():
        values = [v for v in answered if v is not None]
        med, p10, p90 = (1e3 * (quantile(values, q) or 0.0) for q in (0.5, 0.1, 0.9))
        figures[name] = {"median_ms": med, "p10_ms": p10, "p90_ms": p90, "n": len(values)}
        line = f"  {name:>12} {med:8.2f} [{p10:.2f} - {p90:.2f}]"
        diff = paired(answered, base) if answered is not base else None
        if diff is not None:
            d, lo, hi = (1e3 * x for x in diff)
            figures[name].update(diff_ms=d, diff_lo_ms=lo, diff_hi_ms=hi)
            line += f"  {d:+.2f} [{lo:+.2f} - {hi:+.2f}]"
        if name in phases:
            for phase, values in phases[name].items():
                figures[name][f"{phase}_ms"] = 1e3 * (quantile(values, 0.5) or 0.0)
            got = phases[name]
            front = [t - q - p for t, q, p in zip(got["server_ttft"], got["queue"], got["prefill"], strict=True)]
            figures[name]["front_ms"] = 1e3 * (quantile(front, 0.5) or 0.0)
            line += "  server: " + " ".join(
                f"{k} {figures[name][f'{k}_ms']:.1f}" for k in ("server_ttft", "front", "queue", "tier_load", "prefill")
            )
        print(line)
    if args.json is not None:
        record = {"tokens": args.tokens, "rounds": args.rounds, "fresh": args.fresh, "evict": args.evict}
        # each round's TTFTs too (null: no answer), for differences between any two endpoints later
        args.json.write_text(json.dumps({**record, "ttft": figures, "ttft_s_by_round": ttfts}, indent=1))


if __name__ == "__main__":
    main()

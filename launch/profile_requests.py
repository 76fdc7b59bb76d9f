"""`pdrun profile requests`: completions through a running pdrun proxy, and where each one's time went.

Prompts are random token ids (a fixed seed), so each has exactly the asked length and shares no
prefix with another. The phases come from the proxy (`GET /pdrun/requests/{id}`, pd/proxy/timing.py);
the client's own wall time is kept beside them.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from pdrun.pd.proxy.app import REQUEST_ID
from pdrun.pd.proxy.timing import PHASES

TOKEN_IDS = range(100, 4000)  # inside any real vocabulary, clear of the special tokens
PERCENTILES = (50, 90, 99)


class RequestsError(Exception):
    """A proxy that cannot be profiled, or a request it failed: the message says which."""


def served_model(client: httpx.Client) -> str:
    try:
        r = client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise RequestsError(f"{client.base_url}: no model listed at /v1/models ({type(e).__name__}: {e})") from None


def one_request(client: httpx.Client, model: str, prompt: list[int], max_tokens: int, stream: bool) -> dict[str, Any]:
    # ignore_eos: every request generates max_tokens, so requests are alike (as in vLLM's benchmarks).
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "ignore_eos": True}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}  # the exact token count, for TPOT
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as r:
        content = r.read()
        wall = time.perf_counter() - t0
    if r.status_code != 200:
        raise RequestsError(f"a {len(prompt)}-token request answered {r.status_code}: {content[:300]!r}")
    request_id = r.headers.get(REQUEST_ID)
    if not request_id:
        raise RequestsError(f"{client.base_url} sent no {REQUEST_ID} header: is it a pdrun proxy?")
    timing = client.get(f"/pdrun/requests/{request_id}")
    if timing.status_code != 200:
        raise RequestsError(f"the proxy has no timing for request {request_id}: {timing.text[:300]}")
    return {**timing.json(), "asked_prompt_tokens": len(prompt), "client_total": round(wall, 6)}


def run(
    url: str,
    prompt_tokens: list[int],
    per_size: int,
    max_tokens: int,
    stream: bool,
    concurrency: int,
    seed: int | None,
    on_done: Callable[[dict[str, Any]], None],
    timeout_s: float = 600.0,
) -> list[dict[str, Any]]:
    """`per_size` requests of each prompt length, `concurrency` at a time; in the order sent."""
    rng = random.Random(seed)  # None: prompts no earlier run sent, so nothing is cached
    prompts = [[rng.choice(TOKEN_IDS) for _ in range(n)] for n in prompt_tokens for _ in range(per_size)]
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        model = served_model(client)

        def send(prompt: list[int]) -> dict[str, Any]:
            record = one_request(client, model, prompt, max_tokens, stream)
            on_done(record)
            return record

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(send, prompts))


def percentiles(records: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """p50/p90/p99 of each phase (and the client's wall time), over the requests that have it."""
    out: dict[str, dict[str, float | None]] = {}
    for phase in (*PHASES, "ttft", "tpot", "client_total"):
        values = sorted(r[phase] for r in records if r.get(phase) is not None)
        out[phase] = {f"p{q}": _quantile(values, q) for q in PERCENTILES}
    return out


def _quantile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

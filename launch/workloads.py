"""The workloads of `pdrun bench`: the requests each one sends, and the figures it reports.

Every request is a streamed completion of random token ids from a seeded generator (each round
draws new ones, so nothing is reused but what a workload reuses on purpose), greedy, with
`ignore_eos`: each one generates exactly the tokens it asks for. Per request, as vLLM's `vllm
bench serve` measures them: TTFT, the time to the first token; TPOT, the time per output token
after the first, (latency - TTFT) / (output tokens - 1); latency, the time to the last token.

    reuse      one long prompt cold, warm, after other prompts evicted it from the GPU cache, and
               (`after_restart`) after a full restart of the system, as the first request of its
               fresh start (a disk tier reloads it, the others recompute it): TTFT of each; in a
               system of several instances that each answer alone, also another long prompt sent
               straight to one instance and later to another (which loads it from a shared tier,
               or computes it), and the tokens that one loaded from the tier
    multiturn  conversations over a shared system prompt, each turn's prompt the whole history
               (earlier turns and answers) and a new user message, users at once, each reading an
               answer for `think` seconds before the next turn: TTFT and TPOT
    noreuse    prompts of several lengths, nothing shared, at several concurrencies: throughput,
               TTFT, TPOT
    slo        long prompts and answers arriving at rising request rates (Poisson): goodput, the
               requests per second meeting TTFT <= 2 s and TPOT <= 20 ms (DistServe's measure)
    decode     decoding alone: prompts whose KV the system already holds (each sent once before,
               for one token), sent again at several concurrencies for long answers: TPOT and
               output throughput of the decode batch, with no prefill beside it; the wait from
               the first output token to the second (in PD the decoder taking over), and the
               instances' own inter-token latency (vLLM's, from their metrics: the steps alone)

A request the system fails ends the workload with its error; while `pdrun bench --kill-decoder`
kills a decoder under noreuse and slo, they count such requests instead (`failed_requests`).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from pdrun.launch.systems import summed
from pdrun.pd.proxy.timing import event_data

TOKEN_IDS = range(100, 4000)  # inside any real vocabulary, clear of the special tokens
WORKLOADS = ("reuse", "multiturn", "noreuse", "slo", "decode")


class WorkloadError(Exception):
    """A request the system failed: the message says which and how."""


@dataclass
class Outcome:
    """One request, as its client saw it."""

    prompt_tokens: int
    output_ids: list[int]
    ttft: float | None
    latency: float
    error: str | None = None
    second: float | None = None  # to the event that carried the second output token
    sent: float = 0.0  # time.perf_counter() when it was sent
    label: str = ""  # which request of its workload it is (a conversation's turn, a reuse phase)

    def record(self, since: float) -> dict[str, Any]:
        """What `pdrun bench` keeps of it in requests/ (times in seconds, TPOT in ms, from `since`)."""
        out: dict[str, Any] = {"label": self.label} if self.label else {}
        out |= {"sent_s": round(self.sent - since, 6), "prompt_tokens": self.prompt_tokens,
                "output_tokens": len(self.output_ids), "ttft_s": self.ttft, "tpot_ms": _ms(self.tpot),
                "latency_s": round(self.latency, 6)}  # fmt: skip
        return out | ({"error": self.error} if self.error else {})

    @property
    def second_token_wait(self) -> float | None:
        """From the first output token to the second: one decode step in one vLLM; in PD, the
        decoder taking over after the prefiller's first token (the hand-off, its first step)."""
        return None if self.ttft is None or self.second is None else self.second - self.ttft

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or len(self.output_ids) < 2:
            return None
        return (self.latency - self.ttft) / (len(self.output_ids) - 1)


@dataclass
class Target:
    """A system's endpoint, and the model it serves."""

    url: str
    model: str
    timeout_s: float = 600.0
    # A request the system fails comes back as an outcome with its error, to be counted
    # (failed_requests), rather than ending the workload: while a decoder is killed under it.
    count_failures: bool = False
    requests: list[Outcome] | None = None  # where every request's outcome is kept, if anywhere


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(TOKEN_IDS) for _ in range(n)]


async def send(client: httpx.AsyncClient, target: Target, ids: list[int], max_tokens: int, label: str = "") -> Outcome:
    """One streamed completion; its outcome (kept in the target's `requests`). A request the system
    fails (an error status, an error event mid-stream, a broken connection) raises WorkloadError or
    httpx's error; with the target's `count_failures`, it is an outcome with its error, and what it
    streamed before."""
    t0 = time.perf_counter()
    o = Outcome(len(ids), [], None, 0.0, sent=t0, label=label)
    if target.requests is not None:
        target.requests.append(o)
    try:
        await _stream(client, target, ids, max_tokens, o, t0)
    except (WorkloadError, httpx.TransportError) as e:
        if not target.count_failures:
            raise
        o.error = f"{type(e).__name__}: {e}"
    o.latency = time.perf_counter() - t0
    return o


async def _stream(
    client: httpx.AsyncClient, target: Target, ids: list[int], max_tokens: int, o: Outcome, t0: float
) -> None:
    """Streams one completion into `o`, its tokens and their times as they come; WorkloadError
    where the system answered an error."""
    body = {"model": target.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}  # fmt: skip
    async with client.stream("POST", f"{target.url}/v1/completions", json=body, timeout=target.timeout_s) as r:
        if r.status_code != 200:
            raise WorkloadError(f"a {len(ids)}-token request answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            data = event_data(line.encode())
            if data is None:
                continue
            if "error" in data:
                raise WorkloadError(f"a {len(ids)}-token request failed mid-stream: {data['error']}")
            for choice in data.get("choices") or []:
                tokens = choice.get("token_ids") or []
                if (tokens or choice.get("text")) and o.ttft is None:
                    o.ttft = time.perf_counter() - t0
                o.output_ids += tokens
                if o.second is None and len(o.output_ids) >= 2:
                    o.second = time.perf_counter() - t0


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of the values, linearly interpolated; None for none."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---- reuse ----


@dataclass
class ReuseSizes:
    tokens: int = 16384  # the reused prompt
    evictors: int = 4  # other prompts of that length sent between, enough to evict it from the GPU cache
    hot: int = 5  # sent again this many times once warm: a median that one request a round cannot give
    output: int = 8
    restarts: int = 1  # full restarts of every system, each followed by the prompt once


async def reuse(
    target: Target, sizes: ReuseSizes, seed: int, serving: Sequence[str] = ()
) -> tuple[dict[str, float], list[int]]:
    """TTFT of a new prompt cold, warm (right after cold), hot (the median of `hot` more, the store
    of its cold request long done), and after `evictors` others went through; and the prompt, for
    `after_restart`. With two `serving` instances or more (URLs), another prompt sent straight to
    the first, then (the hot requests between: its stores done) to the second: TTFT there, and the
    tokens the second loaded from the tier (read after the evictors gave it steps to report them)."""
    rng = random.Random(seed)
    long = prompt(rng, sizes.tokens)
    # drawn apart, so that every system of a round is sent the same prompts besides it
    other = prompt(random.Random(~seed), sizes.tokens) if len(serving) > 1 else []
    figures: dict[str, float] = {}
    before: float | None = None
    async with httpx.AsyncClient() as client:
        for name in ("cold", "warm"):
            figures[f"ttft_{name}_s"] = _ttft(await send(client, target, long, sizes.output, name))
        if other:
            await send(client, replace(target, url=serving[0]), other, 1, "other, first instance")
        if sizes.hot:
            hot = [_ttft(await send(client, target, long, sizes.output, "hot")) for _ in range(sizes.hot)]
            figures["ttft_hot_s"] = statistics.median(hot)
        if other:
            before = await _loaded(client, serving[1])
            there = await send(client, replace(target, url=serving[1]), other, sizes.output, "other, second instance")
            figures["ttft_other_instance_s"] = _ttft(there)
        for _ in range(sizes.evictors):
            await send(client, target, prompt(rng, sizes.tokens), 1, "evictor")
        if before is not None and (after := await _loaded(client, serving[1])) is not None:
            figures["other_instance_loaded_tokens"] = after - before
        figures["ttft_evicted_s"] = _ttft(await send(client, target, long, sizes.output, "evicted"))
    return figures, long


LOADED_FROM_TIER = "pdrun:cache_loaded_tokens_total"


async def _loaded(client: httpx.AsyncClient, instance: str) -> float | None:
    """Tokens a pdrun instance has loaded from the tier (a counter not yet raised is not on the
    page: 0); None for others."""
    text = (await client.get(f"{instance}/metrics")).text
    return summed(text, [LOADED_FROM_TIER])[LOADED_FROM_TIER] if "pdrun:" in text else None


async def after_restart(target: Target, long: list[int], sizes: ReuseSizes) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        return {"ttft_restart_s": _ttft(await send(client, target, long, sizes.output))}


def _ttft(o: Outcome) -> float:
    if o.ttft is None:
        raise WorkloadError(f"a {o.prompt_tokens}-token request streamed no token")
    return o.ttft


# ---- multiturn ----


@dataclass
class MultiturnSizes:
    conversations: int = 24
    turns: tuple[int, int] = (12, 18)
    system: int = 500  # the system prompt every conversation shares
    user: tuple[int, int] = (120, 160)  # new user tokens per turn
    output: tuple[int, int] = (80, 120)  # answer tokens per turn
    max_history: int = 20000  # a conversation ends before its prompt would pass this
    users: int = 10  # conversations at once
    think: tuple[float, float] = (0.0, 0.0)  # seconds a user reads an answer before the next turn


async def multiturn(target: Target, sizes: MultiturnSizes, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    system = prompt(rng, sizes.system)
    plans = []
    for _ in range(sizes.conversations):
        turns = rng.randint(*sizes.turns)
        plans.append([(prompt(rng, rng.randint(*sizes.user)), rng.randint(*sizes.output)) for _ in range(turns)])
    reading = random.Random(seed + 1)  # apart: the prompts are the same whatever the think time
    thinks = [[reading.uniform(*sizes.think) for _ in p] for p in plans]
    queue: asyncio.Queue[tuple[int, list[tuple[list[int], int]], list[float]]] = asyncio.Queue()
    for c, (p, t) in enumerate(zip(plans, thinks, strict=True)):
        queue.put_nowait((c, p, t))
    outcomes: list[tuple[int, Outcome]] = []  # (turn, outcome)

    async def user(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            history = list(system)
            conversation, plan, think = queue.get_nowait()
            for turn, (message, answer) in enumerate(plan):
                ids = history + message
                if len(ids) + answer > sizes.max_history:
                    break
                if turn and think[turn]:
                    await asyncio.sleep(think[turn])
                o = await send(client, target, ids, answer, f"conversation {conversation} turn {turn + 1}")
                outcomes.append((turn, o))
                history = ids + o.output_ids

    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=sizes.users)) as client:
        await asyncio.gather(*(user(client) for _ in range(sizes.users)))
    elapsed = time.perf_counter() - t0
    ttfts = [o.ttft for _, o in outcomes if o.ttft is not None]
    late = [o.ttft for turn, o in outcomes if turn >= 5 and o.ttft is not None]
    tpots = [o.tpot for _, o in outcomes if o.tpot is not None]
    return _some(
        ttft_mean_s=sum(ttfts) / len(ttfts) if ttfts else None,
        ttft_p50_s=quantile(ttfts, 0.5),
        ttft_p90_s=quantile(ttfts, 0.9),
        ttft_turn6plus_p50_s=quantile(late, 0.5),
        tpot_p50_ms=_ms(quantile(tpots, 0.5)),
        output_tok_s=sum(len(o.output_ids) for _, o in outcomes) / elapsed,
        turns=float(len(outcomes)),
    )


# ---- noreuse ----


@dataclass
class NoreuseSizes:
    lengths: tuple[int, ...] = (1024, 4096, 16384)
    concurrency: tuple[int, ...] = (8, 16)
    output: int = 128
    prompts_per_user: int = 2  # each configuration sends concurrency x this many prompts


async def noreuse(target: Target, sizes: NoreuseSizes, seed: int) -> dict[str, float]:
    """At each length and concurrency, `prompts_per_user` prompts per request at once: output
    tokens per second, p50 TTFT and TPOT; with the target's `count_failures`, `failed_requests`
    too (their tokens count in the throughput, their times in no latency)."""
    rng = random.Random(seed)
    figures: dict[str, float] = {}
    failed = 0
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=max(sizes.concurrency))) as client:
        for n in sizes.lengths:
            for c in sizes.concurrency:
                prompts = [prompt(rng, n) for _ in range(c * sizes.prompts_per_user)]
                label = f"{n} tokens, {c} at once"
                outcomes, elapsed = await _closed_loop(client, target, prompts, sizes.output, c, label)
                answered = _answered(outcomes)
                failed += len(outcomes) - len(answered)
                tag = f"{n}_c{c}"
                figures |= _some(
                    **{
                        f"output_tok_s_{tag}": sum(len(o.output_ids) for o in outcomes) / elapsed,
                        f"ttft_p50_s_{tag}": quantile([o.ttft for o in answered if o.ttft is not None], 0.5),
                        f"tpot_p50_ms_{tag}": _ms(quantile([o.tpot for o in answered if o.tpot is not None], 0.5)),
                    }
                )
    return figures | _failures(target, failed)


async def _closed_loop(
    client: httpx.AsyncClient, target: Target, prompts: list[list[int]], output: int, concurrency: int, label: str
) -> tuple[list[Outcome], float]:
    """Every prompt sent, `concurrency` at a time; the outcomes and the time it took."""
    gate = asyncio.Semaphore(concurrency)

    async def one(ids: list[int]) -> Outcome:
        async with gate:
            return await send(client, target, ids, output, label)

    t0 = time.perf_counter()
    outcomes = await asyncio.gather(*(one(p) for p in prompts))
    return list(outcomes), time.perf_counter() - t0


# ---- slo ----


@dataclass
class SloSizes:
    rates: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # requests per second, per GPU of the system
    duration_s: float = 30.0  # of arrivals at each rate
    prompt: tuple[int, int] = (4096, 16384)
    output: tuple[int, int] = (256, 512)
    ttft_s: float = 2.0
    tpot_s: float = 0.020


async def slo(target: Target, sizes: SloSizes, gpus: int, seed: int) -> dict[str, float]:
    """At each rate (per GPU, times the system's GPUs), Poisson arrivals for `duration_s`: goodput
    per GPU, p99 TTFT and TPOT; with the target's `count_failures`, `failed_requests` too."""
    rng = random.Random(seed)
    figures: dict[str, float] = {}
    failed = 0
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1000)) as client:
        for rate in sizes.rates:
            total_rate = rate * gpus
            n = max(4, round(total_rate * sizes.duration_s))
            jobs = [(prompt(rng, rng.randint(*sizes.prompt)), rng.randint(*sizes.output)) for _ in range(n)]
            gaps = [rng.expovariate(total_rate) for _ in range(n)]

            async def arrive(delay: float, ids: list[int], out: int, label: str) -> Outcome:
                await asyncio.sleep(delay)
                return await send(client, target, ids, out, label)

            t0 = time.perf_counter()
            at = [sum(gaps[: i + 1]) for i in range(n)]
            label = f"{rate:g} per s per GPU"
            outcomes = await asyncio.gather(
                *(arrive(a, ids, out, label) for a, (ids, out) in zip(at, jobs, strict=True))
            )
            elapsed = time.perf_counter() - t0
            answered = _answered(outcomes)  # a failed request is never good
            failed += len(outcomes) - len(answered)
            good = sum(
                1 for o in answered
                if o.ttft is not None and o.ttft <= sizes.ttft_s and (o.tpot is None or o.tpot <= sizes.tpot_s)
            )  # fmt: skip
            tag = f"r{rate:g}"
            figures |= _some(
                **{
                    f"goodput_rps_per_gpu_{tag}": good / elapsed / gpus,
                    f"ttft_p99_s_{tag}": quantile([o.ttft for o in answered if o.ttft is not None], 0.99),
                    f"tpot_p99_ms_{tag}": _ms(quantile([o.tpot for o in answered if o.tpot is not None], 0.99)),
                }
            )
    return figures | _failures(target, failed)


# ---- decode ----


@dataclass
class DecodeSizes:
    length: int = 4096  # prompt tokens, held by the system before the decode is measured
    concurrency: tuple[int, ...] = (8, 16, 32)
    output: int = 256


async def decode(target: Target, sizes: DecodeSizes, seed: int, instances: Sequence[str] = ()) -> dict[str, float]:
    """At each concurrency, that many prompts sent once for one token (their KV then held: vLLM's
    prefix cache, a decoder's too), then again together for `output` tokens: the decode batch's TPOT
    and throughput, nothing prefilled beside it; with the system's vLLM `instances` (URLs), their
    mean inter-token latency over that batch too."""
    rng = random.Random(seed)
    figures: dict[str, float] = {}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=max(sizes.concurrency))) as client:
        for c in sizes.concurrency:
            prompts = [prompt(rng, sizes.length) for _ in range(c)]
            await _closed_loop(client, target, prompts, 1, c, f"{c} at once, first sent")
            before = await _inter_token(client, instances)
            outcomes, elapsed = await _closed_loop(client, target, prompts, sizes.output, c, f"{c} at once, decoded")
            after = await _inter_token(client, instances)
            tpots = [o.tpot for o in outcomes if o.tpot is not None]
            waits = [w for o in outcomes if (w := o.second_token_wait) is not None]
            figures |= _some(
                **{
                    f"tpot_p50_ms_c{c}": _ms(quantile(tpots, 0.5)),
                    f"tpot_p99_ms_c{c}": _ms(quantile(tpots, 0.99)),
                    f"second_token_p50_ms_c{c}": _ms(quantile(waits, 0.5)),
                    f"output_tok_s_c{c}": sum(len(o.output_ids) for o in outcomes) / elapsed,
                    f"itl_ms_c{c}": _ms((after[0] - before[0]) / (after[1] - before[1]))
                    if instances and after[1] > before[1]
                    else None,
                }
            )
    return figures


INTER_TOKEN = ("vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count")


async def _inter_token(client: httpx.AsyncClient, instances: Sequence[str]) -> tuple[float, float]:
    """vLLM's inter-token latency histogram over the instances: (sum of seconds, count)."""
    total = count = 0.0
    for url in instances:
        got = summed((await client.get(f"{url}/metrics")).text, INTER_TOKEN)
        total, count = total + got[INTER_TOKEN[0]], count + got[INTER_TOKEN[1]]
    return total, count


def _answered(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """The requests answered in full: a failed one's times end at its failure, not its answer."""
    return [o for o in outcomes if o.error is None]


def _failures(target: Target, failed: int) -> dict[str, float]:
    """`failed_requests` where the target counts failures (elsewhere the first one ended the workload)."""
    return {"failed_requests": float(failed)} if target.count_failures else {}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _some(**figures: float | None) -> dict[str, float]:
    """The figures that have a value."""
    return {k: float(v) for k, v in figures.items() if v is not None}

"""Faults under load: 200 streamed requests at once through the 1P2D deployment with its cache tier,
a mix of prompts that share a prefix and prompts that share nothing, and one fault while they run:
a decoder killed, the prefiller killed mid hand-off, the prefiller frozen (it takes requests and
answers none), the cache server killed, the cache's disk refusing writes. Each time: no request
hangs, every answer compared with plain vLLM's is the same or parts from it only at near ties
(plain vLLM's own two best tokens within NEAR_TIE_NATS: the tiny model's random weights make them
common, and a decoder that computes a request's first token itself, as fallbacks do, may take the
other: README, Exact answers), every request that fails says why, the
deployment heals on its own and nothing leaks (KV cache usage back to idle, no lease held, no
hand-off staged for a request that is gone, the
threads and file descriptors of the processes that lived through it flat). Each test prints its
figures: sent, completed, failed with an error, hung, wrong, and the fallbacks taken."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pdrun.launch.supervisor import group_members
from tests.integration.client import complete, metrics, prompt, threads_and_fds
from tests.integration.conftest import DECODER_IO_TIMEOUT_S, Cluster, Instance, log_dir_for, running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.faults]

REQUESTS = 200
OUTPUT = 8
HUNG_S = 240.0  # a request still unanswered after this is hung
SHARED = [prompt(700, seed=6000 + i) for i in range(4)]  # prefixes of 2+ chunks many requests share
SAMPLED = range(0, REQUESTS, 5)  # answers compared with plain vLLM's
FALLBACKS = "pdrun:proxy_decode_only_total"
MOVED = "pdrun:proxy_decode_retries_total"  # requests moved to another decoder before it answered
RESUMED = "pdrun:proxy_decode_resumed_total"  # streams gone on on another decoder after their tokens
STAGING_TTL_S = 30.0  # the fault deployment's: a hand-off no decoder was told of is freed after this
LOAD_FAILURES = "pdrun:load_failures_total"


def storm_prompts(seed: int) -> list[list[int]]:
    out = []
    for i in range(REQUESTS):
        if i % 2:
            out.append(prompt(300 + (i * 37) % 600, seed=seed + i))  # shares nothing
        else:
            out.append(SHARED[(i // 2) % len(SHARED)] + prompt(10 + i % 50, seed=seed + i))
    return out


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finished: bool = False
    error: str = ""
    hung: bool = False
    request_id: str = ""  # the proxy's, for GET /pdrun/requests/{id}


async def stream_one(client: httpx.AsyncClient, url: str, ids: list[int]) -> Outcome:
    body = {"model": "tiny", "prompt": ids, "max_tokens": OUTPUT, "temperature": 0, "stream": True}
    body["return_token_ids"] = True
    out = Outcome()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        out.request_id = r.headers.get("x-pdrun-request-id", "")
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out.error = str(event["error"].get("message") or event["error"])
                return out
            for choice in event.get("choices") or []:
                out.tokens += choice.get("token_ids") or []
                out.text.append(choice.get("text") or "")
                out.finished |= choice.get("finish_reason") is not None
    if not out.finished and not out.error:
        out.error = "the stream ended without a finish reason or an error"
    return out


async def storm_async(url: str, prompts: list[list[int]]) -> list[Outcome]:
    limits = httpx.Limits(max_connections=REQUESTS + 10)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(HUNG_S, connect=30)) as client:

        async def bounded(ids: list[int]) -> Outcome:
            try:
                return await asyncio.wait_for(stream_one(client, url, ids), HUNG_S)
            except TimeoutError:
                return Outcome(hung=True)
            except httpx.HTTPError as e:
                return Outcome(error=f"{type(e).__name__}: {e}")

        return await asyncio.gather(*(bounded(p) for p in prompts))


def footprints(pids: set[int]) -> dict[int, tuple[int, int]]:
    """(threads, open file descriptors) of each of these processes (one that ended counts nothing)."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, StopIteration):
            out[pid] = threads_and_fds(pid)
    return out


def totals(each: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(threads, open file descriptors) of those processes together."""
    return sum(t for t, _ in each.values()), sum(f for _, f in each.values())


def grown(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> str:
    """The processes whose threads or descriptors changed: what a footprint that did not settle names."""
    rows = []
    for pid, (t, f) in sorted(after.items()):
        t0, f0 = before.get(pid, (0, 0))
        if (t, f) != (t0, f0):
            name = "?"
            with contextlib.suppress(OSError):
                name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:90]
            rows.append(f"[{pid}] {name}: threads {t0} -> {t}, fds {f0} -> {f}")
    return "\n".join(rows) or "no process changed"


def groups(cluster: Cluster, names: list[str]) -> set[int]:
    return {pid for n in names for pid in group_members(Instance(cluster.deployment, n).pid)}


ALL = ["prefill-0", "decode-0", "decode-1"]


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A deployment of their own (the faults leave it restarted many times over), whose instances
    read every chunk the cache tier has on disk (by default they read what beats computing, which
    on a CPU may be none): a damaged file is read, not skipped."""
    connector = {
        "io_timeout_s": DECODER_IO_TIMEOUT_S,
        "connect_timeout_s": 2.0,
        "cache_disk_load": "always",
        "staging_ttl_s": STAGING_TTL_S,
    }
    # A 1 GiB arena holds every storm's chunks; each restart of the cache server makes a new one,
    # and instances keep the old one mapped until they next reach the tier.
    log_dir = log_dir_for(tmp_path_factory, "faults")
    with running_cluster(model_dir, log_dir, connector=connector, cache_cpu_gb=1.0) as c:
        yield c


@pytest.fixture(scope="module")
def warmed(cluster: Cluster) -> Cluster:
    """One storm with no fault first: the pools of threads and connections grow to the load, so that
    what a fault test sees grow after is what its fault left behind."""
    outcomes = asyncio.run(storm_async(cluster.proxy_url, storm_prompts(9_000)))
    assert all(o.finished and not o.error for o in outcomes), [o.error for o in outcomes if o.error][:3]
    return cluster


def run_with_fault(cluster: Cluster, name: str, seed: int, fault: Callable[[], object], survivors: list[str]) -> None:
    """The storm with `fault` injected once requests are in flight; then the checks above."""
    d = cluster.deployment
    proxy_pids = {d.state()["children"]["proxy"]["pid"]}
    lived = proxy_pids | groups(cluster, survivors)
    each0 = footprints(lived)
    threads0, fds0 = totals(each0)
    before = metrics(cluster.proxy_url)
    before_loads = sum(metrics(i.url).get(LOAD_FAILURES, 0) for i in cluster.decoders)
    prompts = storm_prompts(seed)

    injected = threading.Event()

    def inject() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if in_flight(cluster) >= 30:
                    break
            except OSError:  # the proxy, taking in the storm, slow to answer /metrics: asked again
                pass
            time.sleep(0.05)
        fault()
        injected.set()

    injector = threading.Thread(target=inject)
    injector.start()
    t0 = time.monotonic()
    outcomes = asyncio.run(storm_async(cluster.proxy_url, prompts))
    took = time.monotonic() - t0
    injector.join()
    assert injected.is_set()

    # Heals on its own: every instance back in rotation, and answering as plain vLLM does.
    d.wait_ready(ALL, timeout=600)
    for i in range(3):
        p = prompt(200, seed=seed + 900 + i)
        assert answer_of(complete(cluster.proxy_url, p, max_tokens=OUTPUT)) == plain(cluster, p)

    hung = sum(o.hung for o in outcomes)
    failed = [o.error for o in outcomes if o.error]
    completed = sum(o.finished and not o.error for o in outcomes)
    differ = [i for i in SAMPLED if outcomes[i].finished and answer(outcomes[i]) != plain(cluster, prompts[i])]
    ties = {i: departures(cluster.plain.url, prompts[i], outcomes[i].tokens) for i in differ}
    wrong = [i for i in differ if not ties[i]]
    after = metrics(cluster.proxy_url)
    fallbacks = {
        k.split("reason=")[1].rstrip("]"): int(v - before.get(k, 0))
        for k, v in after.items()
        if k.startswith(FALLBACKS + "[") and v > before.get(k, 0)
    }
    load_failures = sum(metrics(i.url).get(LOAD_FAILURES, 0) for i in cluster.decoders) - before_loads
    print(
        f"\n{name}: sent {REQUESTS}, completed {completed}, failed with an error {len(failed)}, hung {hung}, "
        f"wrong {len(wrong)} of {len(SAMPLED)} compared, parted from plain vLLM at near ties "
        f"{ {i: ties[i] for i in differ if ties[i]} }, decode-only {fallbacks}, moved to another decoder "
        f"{int(after.get(MOVED, 0) - before.get(MOVED, 0))}, resumed mid-stream "
        f"{int(after.get(RESUMED, 0) - before.get(RESUMED, 0))}, hand-offs recomputed "
        f"{int(load_failures)}, {took:.0f} s"
    )
    for message in sorted(set(failed)):
        print(f"  failed: {message}")
    assert hung == 0
    assert not wrong, "answers that differ from plain vLLM's: " + "; ".join(
        f"request {i} ({len(prompts[i])} tokens): {answer(outcomes[i])} against {plain(cluster, prompts[i])}, "
        f"served as {served_as(cluster, outcomes[i])}"
        for i in wrong
    )
    unclear = [e for e in failed if len(e) < 10 or "Internal Server Error" in e]
    assert not unclear, f"failures that do not say why: {unclear}"
    assert completed + len(failed) == REQUESTS

    # Nothing leaks: no KV held, no chunk pinned, no thread or descriptor per request.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(kv_in_use(i.url) for i in [cluster.prefiller, *cluster.decoders]):
        time.sleep(0.5)
    assert not any(kv_in_use(i.url) for i in [cluster.prefiller, *cluster.decoders])
    assert metrics(d.cache_metrics_url).get("pdrun:cache_leases", 0) == 0
    # No hand-off staged for a request that is gone: what decoders did not release (a decoder
    # killed, a prefiller frozen as they released) the proxy and their retries did. A prefill the
    # proxy gave up on (its prefiller frozen) may still end into a hand-off nobody was told of
    # once the prefiller runs again: its TTL frees that one.
    held_after_storm = d.staging_held()
    deadline = time.monotonic() + STAGING_TTL_S + 15
    while time.monotonic() < deadline and d.staging_held():
        time.sleep(0.5)
    held = d.staging_held()
    print(f"hand-offs held by the prefiller's staging pool: {held_after_storm} after the storm, {held} at the end")
    assert held == 0

    # Connections to a process that died close as their pools notice (on use, or kept-alive ones
    # expiring), and thread pools grow at most to their bounds under a load unlike the warm-up's:
    # flat means within a few per surviving instance of where it was (a decoder's engine and worker
    # reconnecting to a restarted prefiller and the tier took up to 18 descriptors), far below one
    # per request that the fault sent another way (100 or more here).
    def flat() -> bool:
        threads, fds = totals(footprints(lived))
        return threads <= threads0 + 8 * len(survivors) and fds <= fds0 + 24 * len(survivors)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not flat():
        time.sleep(1)
    threads1, fds1 = totals(footprints(lived))
    print(f"threads {threads0} -> {threads1}, file descriptors {fds0} -> {fds1}")
    print(grown(each0, footprints(lived)))
    assert flat(), grown(each0, footprints(lived))


def in_flight(cluster: Cluster) -> float:
    """Requests the proxy has in flight on its backends."""
    m = metrics(cluster.proxy_url)
    return sum(v for k, v in m.items() if k.startswith("pdrun:proxy_outstanding["))


def answer_of(response: dict) -> tuple[list[int], str]:
    return response["choices"][0]["token_ids"], response["choices"][0]["text"]


def answer(o: Outcome) -> tuple[list[int], str]:
    return o.tokens, "".join(o.text)


NEAR_TIE_NATS = 0.02  # plain vLLM's top-two margin below which two correct computations may part


def departures(url: str, p: list[int], tokens: list[int]) -> list[tuple[int, float]] | None:
    """Where an answer to prompt `p` parts from plain vLLM's greedy answer, plain vLLM asked again
    from the answer's own tokens after each parting: the positions and plain vLLM's margin there
    between its token and the answer's. None where the answer took a token plain vLLM does not rank
    within NEAR_TIE_NATS of its own (a wrong answer), or does not part at all (then its text does)."""
    parts: list[tuple[int, float]] = []
    k = 0
    while k < len(tokens):
        body = {"model": "tiny", "prompt": p + tokens[:k], "max_tokens": len(tokens) - k, "temperature": 0}
        body |= {"logprobs": 20, "return_tokens_as_token_ids": True, "return_token_ids": True}
        choice = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        ids = choice["token_ids"]
        j = next((j for j, (a, b) in enumerate(zip(ids, tokens[k:], strict=False)) if a != b), None)
        if j is None:
            return parts if len(ids) == len(tokens) - k and parts else None
        top = choice["logprobs"]["top_logprobs"][j]
        best, theirs = top[f"token_id:{ids[j]}"], top.get(f"token_id:{tokens[k + j]}")
        if theirs is None or best - theirs > NEAR_TIE_NATS:
            return None
        parts.append((k + j, round(best - theirs, 5)))
        k += j + 1
    return parts


def served_as(cluster: Cluster, o: Outcome) -> object:
    """What the proxy recorded of the request: its path and phases."""
    try:
        return httpx.get(f"{cluster.proxy_url}/pdrun/requests/{o.request_id}", timeout=10).json()
    except (httpx.HTTPError, ValueError) as e:
        return f"unknown ({e})"


def kv_in_use(url: str) -> float:
    return metrics(url).get("vllm:kv_cache_usage_perc", 0.0)


def plain(cluster: Cluster, p: list[int]) -> tuple[list[int], str]:
    return answer_of(complete(cluster.plain.url, p, max_tokens=OUTPUT))


def test_a_decoder_killed_under_200_streams(warmed):
    cluster = warmed
    victim = cluster.decoders[1]
    starts = victim.starts
    run_with_fault(cluster, "decoder killed", 10_000, victim.kill, survivors=["prefill-0", "decode-0"])
    assert victim.starts > starts


def test_the_prefiller_killed_mid_hand_off_under_200_streams(warmed):
    cluster = warmed
    victim = cluster.prefiller
    starts = victim.starts
    run_with_fault(cluster, "prefiller killed", 11_000, victim.kill, survivors=["decode-0", "decode-1"])
    assert victim.starts > starts


def test_the_prefiller_frozen_under_200_streams(warmed):
    """SIGSTOP: it keeps its connections and answers nothing, hand-offs included; the proxy takes it
    out of rotation on its health checks, and decoders give up on its hand-offs after io_timeout_s."""
    cluster = warmed
    victim = cluster.prefiller
    pgid = victim.pid

    def freeze() -> None:
        os.killpg(pgid, signal.SIGSTOP)
        threading.Timer(25.0, lambda: os.killpg(pgid, signal.SIGCONT)).start()

    run_with_fault(cluster, "prefiller frozen 25 s", 12_000, freeze, survivors=["decode-0", "decode-1"])


def test_the_cache_server_killed_under_200_streams(warmed):
    cluster = warmed
    cache = Instance(cluster.deployment, "cache")
    starts = cache.starts
    run_with_fault(cluster, "cache server killed", 13_000, cache.kill, survivors=ALL)
    assert cache.starts > starts


def test_every_chunk_file_damaged_under_200_streams(warmed):
    """The cache server killed (its memory tier gone) and a byte flipped in every chunk file on its
    disk: the restarted server finds each chunk it reads from disk damaged and drops it, never
    serves it; the requests that wanted those chunks compute them."""
    cluster = warmed
    cache = Instance(cluster.deployment, "cache")

    def damage_all() -> int:
        """Kill the cache server and damage every chunk file it has on disk; how many."""
        files = sorted(cluster.deployment.cache_dir.glob("*/*.chunk"))
        cache.kill()
        for path in files:
            with contextlib.suppress(FileNotFoundError), open(path, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)[0]
                f.seek(-1, os.SEEK_END)
                f.write(bytes([last ^ 0xFF]))
        return len(files)

    assert sorted(cluster.deployment.cache_dir.glob("*/*.chunk")), "the storms so far left no chunk on disk"
    run_with_fault(
        cluster, "every chunk file damaged", 15_000, damage_all, survivors=["prefill-0", "decode-0", "decode-1"]
    )

    # Read back for sure: prompts only decode-0 has computed, on the tier's disk; every file
    # damaged while idle and the server restarted (its memory tier empty); decode-1, which never
    # saw them (no prefix cache to skip the tier), is asked: the server reads each file, finds it
    # damaged and drops it; decode-1 computes.
    def tier_metrics() -> dict[str, float] | None:
        try:
            return metrics(cluster.deployment.cache_metrics_url)
        except OSError:  # not back yet
            return None

    def dropped() -> float:
        return (tier_metrics() or {}).get("pdrun:cache_dropped_corrupt_total[tier=disk]", 0)

    d0, d1 = (i.url for i in cluster.decoders)
    on_disk = set(cluster.deployment.cache_dir.glob("*/*.chunk"))
    unseen = [prompt(3 * 256 + 20, seed=15_950 + i) for i in range(8)]
    for p in unseen:
        assert answer_of(complete(d0, p, max_tokens=OUTPUT)) == plain(cluster, p)
    deadline = time.monotonic() + 60
    while len(set(cluster.deployment.cache_dir.glob("*/*.chunk")) - on_disk) < 3 * len(unseen):
        assert time.monotonic() < deadline, "decode-0's chunks never reached the tier's disk"
        time.sleep(0.5)
    damaged = damage_all()
    deadline = time.monotonic() + 60
    while tier_metrics() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in unseen:
        time.sleep(2)  # within cache_retry_s the instances find the restarted server
        assert answer_of(complete(d1, p, max_tokens=OUTPUT)) == plain(cluster, p)
        if dropped():
            break
    print(f"damaged chunk files dropped by the cache server: {int(dropped())} of {damaged}")
    assert dropped() > 0


def test_the_cache_disk_refusing_writes_under_200_streams(warmed):
    """The cache server's files may grow no bigger than 1000 bytes (as a full disk, writes fail;
    its log file too, so what it says is read from its /metrics): the disk tier goes off, memory
    serves on, and once writes succeed again the tier is back."""
    cluster = warmed
    cache = Instance(cluster.deployment, "cache")
    pid = cache.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)

    def fill() -> None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1000, hard))

    def disk_writable(want: int, seed: int) -> bool:
        """Whether the disk tier's writable gauge reads `want` within 60 s while new chunks come."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and writable() != want:
            complete(cluster.proxy_url, prompt(600, seed=seed), max_tokens=1)
            seed += 1
            time.sleep(1)
        return writable() == want

    def writable() -> float | None:
        return metrics(cluster.deployment.cache_metrics_url).get("pdrun:cache_writable[tier=disk]")

    assert writable() == 1
    try:
        run_with_fault(cluster, "cache disk refusing writes", 14_000, fill, survivors=ALL)
        assert disk_writable(0, 14_800)  # the storm's chunks may all be written behind later
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
    assert disk_writable(1, 14_900)  # a write is tried every 10 s
    assert "disk cache tier back on" in Path(cache.log_path).read_text(errors="replace")

"""The shared cache tier on real vLLM: a prefix computed by one instance is loaded, not recomputed,
by another; a decoder takes from the tier what its prefiller lost; the disk tier survives a
relaunch, and damaged chunk files cost a recompute, never a wrong answer.

Chunks of the tiny model in float32 are 512 KiB (4 layers x K,V x 256 tokens x 2 heads x 32 x 4 B).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pdrun import transfer
from pdrun.launch.vllm_server import ServerSpec, VllmServer
from pdrun.pd.proxy.app import IN_TIER
from pdrun.storage.arena import PREFIX
from pdrun.transfer import AUTH_TOKEN_ENV, Service
from tests.integration.client import (
    EXTERNAL,
    LOAD_FAILURES,
    LOADED,
    LOCAL_COMPUTE,
    TIER_PUTS,
    complete,
    continue_after,
    metrics,
    prefill,
    prompt,
    summed_metrics,
    text_prompt,
    token_ids,
    wait_for_deltas,
)
from tests.integration.conftest import DECODER_IO_TIMEOUT_S, Deployment, free_port, free_ports, start_deployment

pytestmark = pytest.mark.integration

CACHE_LOADED = "pdrun:cache_loaded_tokens_total"
DISK_LOADED = "pdrun:cache_disk_loaded_tokens_total"  # of those, read from the tier's disk
IN_STEP = "pdrun:cache_in_step_tokens_total"  # of those, copied in inside the step that computes the request
PREFETCHED = "pdrun:cache_prefetched_tokens_total"  # of those, from copies made on the proxy's hint
LOCAL_READS = "pdrun:cache_local_requests_total[op=read]"  # chunks read in place, through shared memory
LOCAL_RESERVES = "pdrun:cache_local_requests_total[op=reserve]"
LOCAL_WHERES = "pdrun:cache_local_requests_total[op=where]"  # lookups
LEASES = "pdrun:cache_leases"
CACHE_HIT = "pdrun:cache_hit_tokens_total"
STORED = "pdrun:cache_stored_chunks_total"
CHUNK = 256
BLOCK = 128  # vLLM's KV block size on CPU
HANDOFFS = "pdrun:proxy_handoffs_total"
SHORTCUTS = f"pdrun:proxy_decode_only_total[reason={IN_TIER}]"


def instance(model_dir, role, connector, extra_args=(), auth_token=None) -> ServerSpec:
    """A vLLM instance of the tiny model with PDConnector, started by hand (with the auth token
    of the deployment it joins)."""
    return ServerSpec(
        model=str(model_dir),
        port=free_port(),
        role=role,
        kv_port=free_ports(8),
        dtype="float32",
        connector=connector,
        extra_args=list(extra_args),
        env={AUTH_TOKEN_ENV: auth_token} if auth_token else {},
    )


@pytest.fixture(scope="module")
def second_prefiller(cluster, model_dir, tmp_path_factory):
    """Another prefiller on the deployment's cache tier, started by hand as on another host; idle
    in these tests, it loads from the tier inside the step, where the deployment's instances load
    beside their steps."""
    connector = {
        "cache": cluster.deployment.cache_address,
        "io_timeout_s": DECODER_IO_TIMEOUT_S,
        "cache_load_in_step": "idle",
    }
    spec = instance(model_dir, "kv_producer", connector, auth_token=cluster.deployment.auth_token)
    server = VllmServer(spec, tmp_path_factory.mktemp("logs") / "prefill-b.log")
    server.start()
    try:
        server.wait_healthy(timeout=600)
        yield server
    finally:
        server.stop()


def plain(cluster, tokens):
    return token_ids(complete(cluster.plain.url, tokens))


def decode(cluster, tokens, first):
    return continue_after(cluster.decoder.url, tokens, first)


def test_a_prefix_prefilled_on_one_prefiller_is_loaded_from_the_tier_by_another(cluster, second_prefiller):
    prefix = prompt(2048, seed=300)
    a, b = prefix + prompt(100, seed=301), prefix + prompt(150, seed=302)
    p0, p1 = cluster.prefiller.url, second_prefiller.url

    tier = cluster.deployment.cache_metrics_url
    before = metrics(tier)
    first = prefill(p0, a)
    assert decode(cluster, a, first) == plain(cluster, a)
    # Its 8 full chunks go to the tier behind the request; the 100-token rest is for the decoder only.
    assert wait_for_deltas(tier, before, {TIER_PUTS: 8}) == {TIER_PUTS: 8}

    # Through the host's shared memory: the instances copied the chunks in and out themselves.
    assert metrics(tier)[LOCAL_RESERVES] - before.get(LOCAL_RESERVES, 0) >= 1

    before, before_tier = metrics(p1), metrics(tier)
    first = prefill(p1, b)
    expected = {CACHE_HIT: 2048, CACHE_LOADED: 2048, EXTERNAL: 2048, LOCAL_COMPUTE: 150, STORED: 0}
    assert wait_for_deltas(p1, before, expected) == expected
    assert metrics(tier)[LOCAL_READS] - before_tier.get(LOCAL_READS, 0) >= 1
    assert metrics(tier)[LEASES] == 0  # nothing stays pinned once read
    before = metrics(cluster.decoder.url)
    assert decode(cluster, b, first) == plain(cluster, b)
    # The decoder still holds the prefix from `a` in its own prefix cache: it loads only the rest.
    expected = {LOADED: len(b) - 2048}
    assert wait_for_deltas(cluster.decoder.url, before, expected) == expected


def test_a_conversations_next_turn_loads_the_last_answer_from_the_tier_and_answers_as_plain_vllm(
    cluster, second_prefiller
):
    """The chunks an answer fills go to the tier; the next turn, on another instance, loads them.
    Plain vLLM serves the same two turns from its own prefix cache, which keeps the first turn's
    blocks, answer included: both reuse the KV the first turn's steps computed, up to the same token."""
    first = prompt(300, seed=390)
    # 230 tokens answered: 529 computed, two full chunks (the second: the prompt's last 44 tokens
    # and the answer's first 212) and four of plain vLLM's blocks, the same 512 tokens.
    tier = cluster.deployment.cache_metrics_url
    before = metrics(tier)
    answer = token_ids(complete(second_prefiller.url, first, max_tokens=230, ignore_eos=True))
    assert answer == token_ids(complete(cluster.plain.url, first, max_tokens=230, ignore_eos=True))
    assert wait_for_deltas(tier, before, {TIER_PUTS: 2}) == {TIER_PUTS: 2}  # without the answer's: 1
    second = first + answer + prompt(150, seed=391)
    before = metrics(cluster.prefiller.url)
    reply = token_ids(complete(cluster.prefiller.url, second))
    expected = {CACHE_LOADED: 2 * CHUNK, LOCAL_COMPUTE: len(second) - 2 * CHUNK, LOAD_FAILURES: 0}
    assert wait_for_deltas(cluster.prefiller.url, before, expected) == expected
    assert reply == plain(cluster, second)


@pytest.mark.parametrize("in_step", [True, False], ids=["inside the step", "beside the steps"])
def test_a_prompt_of_whole_chunks_loads_all_but_the_blocks_it_computes(cluster, second_prefiller, in_step):
    tokens = prompt(4 * CHUNK, seed=360 + in_step)  # 4 full chunks, the last one ending with the prompt
    loads, stores = (second_prefiller, cluster.prefiller) if in_step else (cluster.prefiller, second_prefiller)
    tier = cluster.deployment.cache_metrics_url
    before = metrics(tier)
    prefill(stores.url, tokens)
    assert wait_for_deltas(tier, before, {TIER_PUTS: 4}) == {TIER_PUTS: 4}
    before = metrics(loads.url)
    first = prefill(loads.url, tokens)
    # The instance computes the prompt's last two tokens, so the block holding them: the rest of
    # the last chunk comes from the tier with the three chunks before it.
    loaded = 4 * CHUNK - BLOCK
    expected = {CACHE_LOADED: loaded, LOCAL_COMPUTE: BLOCK, IN_STEP: loaded if in_step else 0, LOAD_FAILURES: 0}
    assert wait_for_deltas(loads.url, before, expected) == expected
    # The decoder continues from the KV the instance loaded (and handed off), as plain vLLM would.
    assert decode(cluster, tokens, first) == plain(cluster, tokens)
    if in_step:  # every one of the tiny model's 4 layers waited for its copy in vLLM's hook
        assert "cache tier inside the step layer by layer (4 of 4 layers waited for" in loads.log_path.read_text()


def test_a_prompt_whose_chunks_the_gpu_cache_holds_costs_no_tier_lookup(cluster, second_prefiller):
    tokens = prompt(1100, seed=310)  # 4 full chunks
    tier = cluster.deployment.cache_metrics_url
    before_tier = metrics(tier)
    before = before_tier.get(LOCAL_WHERES, 0)
    first = prefill(second_prefiller.url, tokens)
    looked_up = metrics(tier).get(LOCAL_WHERES, 0)
    assert looked_up == before + 1
    # Again: vLLM's own prefix cache has all 4 chunks, the tier could add nothing.
    assert prefill(second_prefiller.url, tokens).token == first.token
    assert metrics(tier).get(LOCAL_WHERES, 0) == looked_up
    # Its 4 chunks were stored once (committed behind: waited for, so that no later test counts them).
    assert wait_for_deltas(tier, before_tier, {TIER_PUTS: 4}) == {TIER_PUTS: 4}


def salted_prefill(url: str, tokens: list[int], salt: str) -> list[int]:
    body = {"model": "tiny", "prompt": tokens, "max_tokens": 1, "temperature": 0, "cache_salt": salt}
    body["kv_transfer_params"] = {"do_remote_decode": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_requests_with_different_cache_salts_share_no_kv_through_the_tier(cluster, second_prefiller):
    tokens = prompt(1100, seed=350)  # 4 full chunks
    p0, p1, tier = cluster.prefiller.url, second_prefiller.url, cluster.deployment.cache_metrics_url
    before_tier = metrics(tier)
    first = salted_prefill(p0, tokens, "tenant-a")
    assert wait_for_deltas(tier, before_tier, {TIER_PUTS: 4}) == {TIER_PUTS: 4}
    before, before_tier = metrics(p1), metrics(tier)
    assert salted_prefill(p1, tokens, "tenant-b") == first  # computed: tenant-a's chunks are not b's
    assert wait_for_deltas(p1, before, {CACHE_HIT: 0, LOCAL_COMPUTE: 1100}) == {CACHE_HIT: 0, LOCAL_COMPUTE: 1100}
    # Stored beside tenant-a's under their own keys (committed behind: waited for, so that no later
    # test counts them).
    assert wait_for_deltas(tier, before_tier, {TIER_PUTS: 4}) == {TIER_PUTS: 4}
    before = metrics(p1)
    assert salted_prefill(p1, tokens, "tenant-a") == first  # the same tenant: loaded
    assert wait_for_deltas(p1, before, {CACHE_HIT: 1024}) == {CACHE_HIT: 1024}


def ask(url: str, p: list[int] | str) -> list[int]:
    """The answer's token ids, for a prompt of token ids or of text."""
    if not isinstance(p, str):
        return token_ids(complete(url, p))
    body = {"model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0, "return_token_ids": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return token_ids(r.json())


@pytest.mark.parametrize("kind", ["ids", "text"])
def test_a_prompt_the_tier_holds_but_a_short_tail_skips_the_prefill_hop(cluster, kind):
    proxy, tier = cluster.proxy_url, cluster.deployment.cache_metrics_url
    # 1100 token ids, or 1000 words of text (1086 tokens, which the proxy asks a decoder for): 4 full chunks.
    head: list[int] | str = prompt(1100, seed=330) if kind == "ids" else text_prompt(1000, seed=332)
    longer = head + prompt(60, seed=331) if kind == "ids" else head + " and the rest of it"
    before, before_tier = metrics(proxy), metrics(tier)
    assert ask(proxy, head) == ask(cluster.plain.url, head)
    after = metrics(proxy)
    assert after[HANDOFFS] - before[HANDOFFS] == 1  # a new prompt: prefilled, handed off, stored
    assert wait_for_deltas(tier, before_tier, {TIER_PUTS: 4}) == {TIER_PUTS: 4}

    assert ask(proxy, longer) == ask(cluster.plain.url, longer)
    final = metrics(proxy)
    assert final[HANDOFFS] == after[HANDOFFS]  # no prefill hop
    assert final.get(SHORTCUTS, 0) - after.get(SHORTCUTS, 0) == 1


def test_a_conversations_turns_that_skip_the_prefill_hop_go_to_the_decoder_that_answered_it(cluster):
    """A turn whose history the tier holds skips the prefill hop; the proxy sends it to the decoder
    that answered the turn before, whose own prefix cache holds the history: it loads nothing from
    the tier and computes only what its cache lacks (taking turns, the other decoder would load
    the history from the tier)."""
    proxy, tier = cluster.proxy_url, cluster.deployment.cache_metrics_url

    def served() -> dict[str, int]:
        return {b["url"]: b["served"] for b in httpx.get(f"{proxy}/health", timeout=5).json()["decode"]}

    homes = set()
    for c in range(3):
        history = prompt(700, seed=360 + c)  # 2 full chunks
        home, cached = "", 0
        # The tier takes the first turn's 2 chunks (from the prefiller), the third chunk the second
        # turn fills, nothing of the third turn's (its answers fill no chunk).
        for turn, puts in enumerate((2, 1, 0)):
            before, before_tier, was = metrics(proxy), metrics(tier), served()
            before_home = metrics(home) if home else {}
            answer = ask(proxy, history)
            assert answer == ask(cluster.plain.url, history)
            took = [url for url, n in served().items() if n > was[url]]
            shortcuts = metrics(proxy).get(SHORTCUTS, 0) - before.get(SHORTCUTS, 0)
            assert len(took) == 1 and shortcuts == (turn > 0), (took, shortcuts)
            if turn == 0:
                home = took[0]
                homes.add(home)
            else:
                assert took == [home]
                expected = {LOCAL_COMPUTE: len(history) - cached, CACHE_LOADED: 0}
                assert wait_for_deltas(home, before_home, expected) == expected
            assert wait_for_deltas(tier, before_tier, {TIER_PUTS: puts}) == {TIER_PUTS: puts}
            # What the home decoder's prefix cache keeps of this turn: its whole blocks with KV
            # (the answer's last token has none).
            cached = BLOCK * ((len(history) + len(answer) - 1) // BLOCK)
            history = [*history, *answer, *prompt(100, seed=370 + 10 * c + turn)]
    assert len(homes) == 2  # conversations that share nothing still spread over the decoders


class Forgetful(Service):
    """A prefiller endpoint whose staged chunks are gone (evicted, expired, or a restart)."""

    def handle(self, request, payload):
        if request.op == "get":
            raise KeyError("chunk is not staged here (expired, evicted or never produced)")
        return {}
        yield


def test_a_decoder_takes_from_the_tier_what_the_prefiller_no_longer_has(cluster):
    tokens = prompt(4 * CHUNK, seed=310)  # hands over exactly 4 full chunks
    tier = cluster.deployment.cache_metrics_url
    before = metrics(tier)
    first = prefill(cluster.prefiller.url, tokens)
    assert wait_for_deltas(tier, before, {TIER_PUTS: 4}) == {TIER_PUTS: 4}
    fake = transfer.listen("tcp://127.0.0.1:0", Forgetful())
    first.params["pdrun"]["endpoints"] = [fake.address]
    before = metrics(cluster.decoder.url)
    try:
        assert decode(cluster, tokens, first) == plain(cluster, tokens)
    finally:
        fake.close()
    expected = {CACHE_LOADED: 4 * CHUNK, LOADED: 0, LOAD_FAILURES: 0, LOCAL_COMPUTE: 1}
    assert wait_for_deltas(cluster.decoder.url, before, expected) == expected


def test_concurrent_prefills_on_two_prefillers_share_the_tier_without_torn_reads(cluster, second_prefiller):
    prefix = prompt(1024, seed=320)
    seed = prefix + prompt(10, seed=320)
    tier = cluster.deployment.cache_metrics_url
    before = metrics(tier)
    prefill(cluster.prefiller.url, seed)
    assert wait_for_deltas(tier, before, {TIER_PUTS: 4}) == {TIER_PUTS: 4}
    # Each prompt has a full chunk of its own after the shared 4: gets and puts run at once.
    prompts = [prefix + prompt(CHUNK + 40 + i, seed=321 + i) for i in range(8)]
    wants = [plain(cluster, p) for p in prompts]
    urls = [cluster.prefiller.url, second_prefiller.url]
    befores = [metrics(u) for u in urls]
    before = metrics(tier)

    def pd(i):
        tokens = prompts[i]
        return decode(cluster, tokens, prefill(urls[i % 2], tokens))

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(pd, range(8), timeout=300))
    assert got == wants
    assert wait_for_deltas(tier, before, {TIER_PUTS: 8}) == {TIER_PUTS: 8}  # one own chunk each
    # A torn or corrupted chunk would fail its checksum or layout check: a load failure.
    for url, before in zip(urls, befores, strict=True):
        assert wait_for_deltas(url, before, {LOAD_FAILURES: 0}) == {LOAD_FAILURES: 0}
    # The second prefiller never computed the prefix: it loaded it, once or by racing requests.
    loaded = metrics(urls[1]).get(CACHE_LOADED, 0) - befores[1].get(CACHE_LOADED, 0)
    assert loaded % (4 * CHUNK) == 0 and loaded > 0


# ---- after the session's deployment: stop, damage, relaunch on the same cache dir ----


def stop(d: Deployment) -> None:
    d.stop()
    assert d.proc.returncode == 0 and not d.processes()


def chunk_file(cache_dir: Path, key_hex: str) -> Path:
    return cache_dir / key_hex[:2] / f"{key_hex}.chunk"


@pytest.mark.after_deployment
def test_a_relaunch_on_the_same_cache_dir_loads_from_disk_and_drops_damaged_chunks(cluster, model_dir, tmp_path):
    stop(cluster.deployment)  # memory for two more instances; the session's own test stopped it already
    cache_dir = tmp_path / "cache"
    p = prompt(2048 + 60, seed=330)
    x = prompt(2048 + 30, seed=331)
    y = prompt(1024 + 40, seed=332)
    wants = {id(t): plain(cluster, t) for t in (p, x, y)}

    first = start_deployment(model_dir, tmp_path / "first", cache_dir, prefill=1, decode=1)
    try:
        first.wait_ready(["prefill-0", "decode-0"], timeout=600)
        pre_url = first.state()["children"]["prefill-0"]["url"]
        before = metrics(first.cache_metrics_url)
        keys = {id(t): prefill(pre_url, t).params["pdrun"]["keys"] for t in (p, x, y)}
        assert wait_for_deltas(first.cache_metrics_url, before, {TIER_PUTS: 8 + 8 + 4}) == {TIER_PUTS: 20}
    finally:
        stop(first)
    files = {id(t): [chunk_file(cache_dir, k) for k in keys[id(t)][: len(t) // CHUNK]] for t in (p, x, y)}
    assert all(f.is_file() for fs in files.values() for f in fs)  # flushed to disk at stop
    flipped, truncated = files[id(x)][4], files[id(y)][2]
    data = bytearray(flipped.read_bytes())
    data[-1000] ^= 0x01
    flipped.write_bytes(data)
    truncated.write_bytes(truncated.read_bytes()[:-5000])

    # Relaunched with a memory tier of 4 chunks, so the memory tier churns over disk hits.
    memory_gb = 0.0021
    # Every chunk on disk is read (`auto` would read two until it has measured disk and prefill).
    connector = {"io_timeout_s": DECODER_IO_TIMEOUT_S, "connect_timeout_s": 2.0, "cache_disk_load": "always"}
    second = start_deployment(
        model_dir, tmp_path / "second", cache_dir, prefill=1, decode=1, cache_cpu_gb=memory_gb, connector=connector
    )
    try:
        second.wait_ready(["prefill-0", "decode-0"], timeout=600)
        # The prefiller loads the first prompt; the proxy, knowing then how chunks are named, sends
        # the others to the decoder alone (the tier holds all but their tail), which loads them.
        urls = [second.state()["children"][name]["url"] for name in ("prefill-0", "decode-0")]
        for tokens, loads in ((p, 2048), (x, 4 * CHUNK), (y, 2 * CHUNK)):
            before = summed_metrics(urls)
            assert token_ids(complete(second.proxy_url, tokens)) == wants[id(tokens)]
            assert wait_for_deltas(urls, before, {CACHE_LOADED: loads}) == {CACHE_LOADED: loads}
        tier = metrics(second.cache_metrics_url)
        assert tier["pdrun:cache_hits_total[tier=disk]"] >= 8 + 4 + 2
        assert tier["pdrun:cache_dropped_corrupt_total[tier=disk]"] == 2
        assert not flipped.exists() and not truncated.exists()
        assert 0 < tier["pdrun:cache_bytes_used[tier=memory]"] <= memory_gb * (1 << 30)
        assert tier["pdrun:cache_evictions_total[tier=memory]"] > 0
    finally:
        stop(second)


@pytest.mark.after_deployment
def test_a_restarted_instance_reads_from_disk_at_its_first_request_where_its_kept_rates_say_it_pays(
    cluster, model_dir, tmp_path
):
    """`cache_disk_load: auto` needs the instance's prefill and disk read rates; it keeps them
    beside the tier's disk, so after a relaunch the first request decides at once."""
    stop(cluster.deployment)  # memory for the instances started here
    cache_dir = tmp_path / "cache"
    p = prompt(2048 + 60, seed=340)
    want = plain(cluster, p)
    first = start_deployment(model_dir, tmp_path / "first", cache_dir, prefill=0, decode=1)
    try:
        first.wait_ready(["decode-0"], timeout=600)
        assert token_ids(complete(first.proxy_url, p)) == want  # computed: its prefill rate measured
    finally:
        stop(first)
    (kept,) = cache_dir.glob("rates-*.json")  # written as the instance stopped
    rates = json.loads(kept.read_text())
    assert rates["prefill_tokens_per_s"] > 0 and rates["disk_tokens_per_s"] is None  # no disk read yet
    # As a previous run that had read from this disk would have left it: reading beats computing.
    kept.write_text(json.dumps({"prefill_tokens_per_s": 1.0, "disk_tokens_per_s": 1e9}))
    second = start_deployment(model_dir, tmp_path / "second", cache_dir, prefill=0, decode=1)
    try:
        second.wait_ready(["decode-0"], timeout=600)
        url = second.state()["children"]["decode-0"]["url"]
        before = summed_metrics([url])
        assert token_ids(complete(second.proxy_url, p)) == want
        assert wait_for_deltas([url], before, {DISK_LOADED: 2048}) == {DISK_LOADED: 2048}
    finally:
        stop(second)


@pytest.mark.after_deployment
def test_a_prompt_the_proxy_hints_is_copied_in_ahead_and_answers_as_plain_vllm(cluster, model_dir, tmp_path):
    """With cache_prefetch_gb, the proxy names a completion's token ids to the decoder it picked;
    the decoder copies the prefix the tier holds while vLLM's front end handles the request, and
    loads it from those copies."""
    stop(cluster.deployment)  # memory for the instances started here
    p, others = prompt(4 * CHUNK + 60, seed=350), [prompt(4 * CHUNK + 60, seed=351 + i) for i in range(3)]
    want = plain(cluster, p)
    connector = {"io_timeout_s": DECODER_IO_TIMEOUT_S, "cache_prefetch_gb": 0.05}
    # A KV cache of 20 blocks (2560 tokens): three other prompts evict all of this one's blocks.
    vllm_args = ["--num-gpu-blocks-override", "20"]
    d = start_deployment(
        model_dir, tmp_path / "run", None, prefill=0, decode=1, connector=connector, vllm_args=vllm_args,
        max_model_len=2048,
    )  # fmt: skip
    try:
        d.wait_ready(["decode-0"], timeout=600)
        url = d.state()["children"]["decode-0"]["url"]
        before_tier = metrics(d.cache_metrics_url)
        assert token_ids(complete(d.proxy_url, p)) == want
        assert wait_for_deltas(d.cache_metrics_url, before_tier, {TIER_PUTS: 4}) == {TIER_PUTS: 4}
        for other in others:
            complete(d.proxy_url, other)
        before = summed_metrics([url])
        assert token_ids(complete(d.proxy_url, p)) == want
        expected = {CACHE_LOADED: 4 * CHUNK, PREFETCHED: 4 * CHUNK, LOAD_FAILURES: 0}
        assert wait_for_deltas([url], before, expected) == expected
    finally:
        stop(d)


def start_cache_server(port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdrun.launch", "cache-server", "--listen", f"tcp://127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*cmd, "--cpu-gb", "0.05", "--metrics-port", str(port + 1)], stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            metrics(f"http://127.0.0.1:{port + 1}")
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the cache server did not start: {log.read_text()}")


def mapping(name: str) -> list[str]:
    """The processes that map a file whose name starts with `name`, as "pid: path"."""
    found = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            for line in maps.read_text().splitlines():
                if f"/{name}" in line:
                    found.add(f"{maps.parent.name}: {line.split(maxsplit=5)[-1]}")
    return sorted(found)


def test_an_instance_goes_on_through_a_cache_server_restart_and_uses_the_new_one(cluster, model_dir, tmp_path):
    """The instance maps the server's arena; a restarted server has another, which the instance
    finds on its own, idle, letting the old one go; after it requests are loaded again."""
    # The server and its /metrics on two ports below the ephemeral range: restarted on the same ones,
    # neither can meanwhile be taken as the source port of an outgoing connection.
    port = free_ports(2)
    log = tmp_path / "cache.log"
    cache = start_cache_server(port, log)
    connector = {"cache": f"tcp://127.0.0.1:{port}", "cache_retry_s": 1.0}
    spec = instance(model_dir, "kv_both", connector, ["--no-enable-prefix-caching"])  # repeats: from the tier
    server = VllmServer(spec, tmp_path / "instance.log")
    server.start()
    try:
        server.wait_healthy(timeout=600)
        a, b = prompt(1024 + 10, seed=340), prompt(1024 + 20, seed=341)
        assert token_ids(complete(server.url, a)) == plain(cluster, a)
        before = metrics(server.url)
        assert token_ids(complete(server.url, a)) == plain(cluster, a)
        assert wait_for_deltas(server.url, before, {CACHE_LOADED: 1024}) == {CACHE_LOADED: 1024}

        old_arena = f"{PREFIX}{cache.pid}-"
        assert mapping(old_arena), "the instance does not map the cache server's arena"
        cache.send_signal(signal.SIGKILL)
        cache.wait(timeout=30)
        cache = start_cache_server(port, log)
        # Idle, the instance moves to the new arena on its own and lets the old one go: its memory
        # (the tier's whole size) is not held beside the new arena's.
        deadline = time.monotonic() + 30
        while mapping(old_arena) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not mapping(old_arena), f"still mapped after the restart: {mapping(old_arena)}"
        assert "cache tier restarted" in (tmp_path / "instance.log").read_text()
        # What the next request computes goes to the new server, and later requests load from it.
        assert token_ids(complete(server.url, a)) == plain(cluster, a)
        assert wait_for_deltas(f"http://127.0.0.1:{port + 1}", {}, {TIER_PUTS: 4}) == {TIER_PUTS: 4}
        deadline, loaded = time.monotonic() + 60, 0.0
        while time.monotonic() < deadline and not loaded:
            before = metrics(server.url)
            assert token_ids(complete(server.url, b)) == plain(cluster, b)
            loaded = metrics(server.url).get(CACHE_LOADED, 0) - before.get(CACHE_LOADED, 0)
        assert loaded == 1024, "the instance never loaded from the restarted cache server"
    finally:
        server.stop()
        cache.send_signal(signal.SIGTERM)
        cache.wait(timeout=30)

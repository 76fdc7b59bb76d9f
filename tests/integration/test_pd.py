"""The PD invariant on real vLLM servers: a decoder that loads the prefiller's KV and continues
after its first token answers exactly as a plain vLLM does (greedy, token for token), loads every
prompt position, computes only the first token's, and falls back to a local prefill, with the
reason logged, whenever the hand-off fails."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import pytest

from pdrun import transfer
from pdrun.transfer import Frame, Header, Service
from pdrun.transfer.wire import encode_header
from tests.integration.client import (
    EXTERNAL,
    LOAD_FAILURES,
    LOADED,
    LOCAL_COMPUTE,
    TIER_PUTS,
    complete,
    computed_with,
    continue_after,
    metrics,
    prefill,
    prompt,
    threads_and_fds,
    token_ids,
    wait_for_deltas,
)
from tests.integration.conftest import DECODER_IO_TIMEOUT_S

pytestmark = pytest.mark.integration
LENGTHS = [1, 255, 256, 257, 1000, 3000]


def decode(cluster, tokens, first):
    return continue_after(cluster.decoder.url, tokens, first)


@pytest.mark.parametrize("n", LENGTHS)
def test_pd_output_equals_plain_vllm_and_the_kv_was_loaded(cluster, n):
    tokens = prompt(n, seed=1)
    want = token_ids(complete(cluster.plain.url, tokens))
    first = prefill(cluster.prefiller.url, tokens)
    assert first.params["pdrun"]["num_tokens"] == n  # every prompt position
    before = metrics(cluster.decoder.url)
    got = decode(cluster, tokens, first)
    assert got == want
    expected = {LOADED: n, EXTERNAL: n, LOCAL_COMPUTE: 1}
    # Loaded the whole prompt and computed only the first output token's position: no prompt token.
    assert wait_for_deltas(cluster.decoder.url, before, expected) == expected


@pytest.mark.parametrize("n", [2, 257, 1000, 3000])
def test_a_decoder_that_samples_the_first_token_computes_the_last_two_prompt_tokens(cluster, n):
    """The way for requests a continuation cannot serve exactly (say, structured output): the
    decoder gets the prompt alone and samples the first token from a prefill-like step."""
    tokens = prompt(n, seed=13)
    want = token_ids(complete(cluster.plain.url, tokens))
    first = prefill(cluster.prefiller.url, tokens)
    before = metrics(cluster.decoder.url)
    assert token_ids(complete(cluster.decoder.url, tokens, kv_transfer_params=first.params)) == want
    expected = {LOADED: n - 2, EXTERNAL: n - 2, LOCAL_COMPUTE: 2}
    assert wait_for_deltas(cluster.decoder.url, before, expected) == expected


def test_eight_concurrent_hand_offs(cluster):
    cases = [(n, seed) for seed in (2, 3) for n in (255, 257, 1000, 3000)]
    wants = {case: token_ids(complete(cluster.plain.url, prompt(*case))) for case in cases}
    before = metrics(cluster.decoder.url)

    def pd(case):
        tokens = prompt(*case)
        return case, decode(cluster, tokens, prefill(cluster.prefiller.url, tokens))

    with ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(pd, cases))
    assert results == wants
    expected = sum(n for n, _ in cases)
    assert wait_for_deltas(cluster.decoder.url, before, {LOADED: expected, LOAD_FAILURES: 0}) == {
        LOADED: expected,
        LOAD_FAILURES: 0,
    }


def test_a_different_prompt_loads_only_the_common_prefix(cluster):
    a = prompt(1000, seed=4)
    b = a[:600] + prompt(400, seed=5)  # the same first two chunks (512 tokens), then different
    first = prefill(cluster.prefiller.url, a)
    before = metrics(cluster.decoder.url)
    got = token_ids(complete(cluster.decoder.url, b, kv_transfer_params=first.params))
    assert got == token_ids(complete(cluster.plain.url, b))
    assert wait_for_deltas(cluster.decoder.url, before, {LOADED: 512, LOCAL_COMPUTE: 1000 - 512}) == {
        LOADED: 512,
        LOCAL_COMPUTE: 1000 - 512,
    }


def stored_prefill(cluster, tokens):
    """The prefiller's first token and hand-off, once the tier holds the prompt's full chunks (so
    that the decoder finds them there whatever it does, not as a race with the write-behind)."""
    tier = cluster.deployment.cache_metrics_url
    before = metrics(tier)
    first = prefill(cluster.prefiller.url, tokens)
    chunks = len(tokens) // 256
    assert wait_for_deltas(tier, before, {TIER_PUTS: chunks}) == {TIER_PUTS: chunks}
    return first


def test_malformed_hand_off_params_mean_a_local_prefill(cluster):
    tokens = prompt(300, seed=6)
    first = stored_prefill(cluster, tokens)
    first.params["pdrun"]["keys"] = ["not-hex"]
    assert decode(cluster, tokens, first) == computed_with(cluster.plain.url, tokens, first)
    assert "malformed pdrun hand-off" in cluster.decoder.log_path.read_text()


class Corrupting(Service):
    """A fake prefiller endpoint that relays the real one's chunks, damaged in a chosen way (or
    whole, after `pause_s`: late)."""

    def __init__(self, real: str, how: str, auth_token: str, pause_s: float = 0.0):
        self.real, self.how, self.auth_token, self.pause_s = real, how, auth_token, pause_s

    def handle(self, request, payload):
        if request.op == "release":
            return {}
        if self.how == "silent":
            time.sleep(60)
        time.sleep(self.pause_s)
        with transfer.connect(self.real, auth_token=self.auth_token) as conn:
            for frame in conn.stream(request.op, meta=request.meta):
                data = bytearray(frame.payload)
                header = frame.header
                if self.how == "flip-a-byte":
                    data[len(data) // 2] ^= 0x40  # keeps the real checksum: the decoder must notice
                elif self.how == "wrong-layout":
                    header = msgspec.structs.replace(header, meta={**header.meta, "layout": "L99:bs1"})
                yield Frame(header, data)
        return {}


class RawEndpoint:
    """A fake prefiller endpoint that answers every request with the given bytes, then closes."""

    def __init__(self, reply: bytes):
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if b"hello" in conn.recv(1 << 16):  # the decoder's auth token first: taken
                    conn.sendall(encode_header(Header(op="ok")))
                    conn.recv(1 << 16)
                conn.sendall(self.reply)

    def close(self):
        self.sock.close()


def truncated_first_chunk(params, auth_token: str) -> bytes:
    """The prefiller's real first chunk frame, cut off half way through its payload."""
    with transfer.connect(params["pdrun"]["endpoints"][0], auth_token=auth_token) as conn:
        frame = next(iter(conn.stream("get", meta={"keys": params["pdrun"]["keys"][:1]})))
        conn.close()
    return encode_header(frame.header) + bytes(frame.payload)[: frame.header.nbytes // 2]


@pytest.mark.parametrize(
    ("how", "reason", "seed"),
    [
        ("silent", "TransferTimeout", 70),
        ("flip-a-byte", "ChecksumError", 71),
        ("wrong-layout", "does not match this instance", 72),
        ("garbage", "bad magic", 73),
        ("truncated", "PeerClosed", 74),
    ],
)
def test_a_misbehaving_prefiller_costs_a_local_prefill_not_the_request(cluster, how, reason, seed):
    tokens = prompt(700, seed=seed)
    first = prefill(cluster.prefiller.url, tokens)
    want = computed_with(cluster.plain.url, tokens, first)  # the decoder computes the prompt and the token
    params = first.params
    if how in ("garbage", "truncated"):
        token = cluster.deployment.auth_token
        fake = RawEndpoint(b"HTTP/1.1 200 OK\r\n\r\n" if how == "garbage" else truncated_first_chunk(params, token))
    else:
        real = params["pdrun"]["endpoints"][0]
        fake = transfer.listen("tcp://127.0.0.1:0", Corrupting(real, how, cluster.deployment.auth_token))
    params["pdrun"]["endpoints"] = [fake.address]
    before = metrics(cluster.decoder.url)
    try:
        t0 = time.monotonic()
        assert decode(cluster, tokens, first) == want
        assert time.monotonic() - t0 < DECODER_IO_TIMEOUT_S + 10
    finally:
        fake.close()
    # (vLLM's by-source counters are set at admission and do not see the recompute: count our own.)
    assert wait_for_deltas(cluster.decoder.url, before, {LOAD_FAILURES: 1, LOADED: 0}) == {LOAD_FAILURES: 1, LOADED: 0}
    log = cluster.decoder.log_path.read_text()
    line = [ln for ln in log.splitlines() if "KV hand-off from " + fake.address in ln]
    assert line and reason in line[-1] and "prefilling the remaining" in line[-1]
    # And the decoder goes on serving hand-offs.
    ok = prompt(300, seed=8)
    assert decode(cluster, ok, prefill(cluster.prefiller.url, ok)) == token_ids(complete(cluster.plain.url, ok))


def test_the_prefiller_endpoint_survives_garbage(cluster):
    tokens = prompt(400, seed=9)
    first = prefill(cluster.prefiller.url, tokens)
    host, port = first.params["pdrun"]["endpoints"][0].removeprefix("tcp://").split(":")
    junk_frame = encode_header(Header(op="get", nbytes=1 << 20, more=True)) + b"x" * 1000
    for junk in (b"\x00" * 100, b"GET / HTTP/1.1\r\n\r\n", junk_frame):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
    before = metrics(cluster.decoder.url)
    assert decode(cluster, tokens, first) == token_ids(complete(cluster.plain.url, tokens))
    assert wait_for_deltas(cluster.decoder.url, before, {LOADED: 400}) == {LOADED: 400}


def test_prefiller_killed_between_prefill_and_pull(cluster):
    # It kills the prefiller; the supervisor of the deployment restarts it, and the test waits for that.
    tokens = prompt(1000, seed=10)
    first = prefill(cluster.prefiller.url, tokens)
    want = computed_with(cluster.plain.url, tokens, first)
    starts = cluster.prefiller.starts
    cluster.prefiller.kill()
    before = metrics(cluster.decoder.url)
    assert decode(cluster, tokens, first) == want
    assert wait_for_deltas(cluster.decoder.url, before, {LOAD_FAILURES: 1, LOADED: 0}) == {
        LOAD_FAILURES: 1,
        LOADED: 0,
    }
    lines = [ln for ln in cluster.decoder.log_path.read_text().splitlines() if "KV hand-off" in ln]
    assert "PeerClosed" in lines[-1]  # refused, or reset if it died mid-connection

    # Meanwhile the proxy serves requests decode-only: the decoder prefills them itself.
    deadline = time.monotonic() + 10
    while cluster.prefiller.url in cluster.deployment.in_rotation() and time.monotonic() < deadline:
        time.sleep(0.2)
    alone = prompt(200, seed=12)
    before_proxy = metrics(cluster.proxy_url)
    assert token_ids(complete(cluster.proxy_url, alone)) == token_ids(complete(cluster.plain.url, alone))
    fallback = "pdrun:proxy_decode_only_total[reason=no prefiller in rotation]"
    assert metrics(cluster.proxy_url)[fallback] - before_proxy.get(fallback, 0) == 1

    cluster.wait_restarted(cluster.prefiller, starts)
    again = prompt(500, seed=11)
    assert decode(cluster, again, prefill(cluster.prefiller.url, again)) == token_ids(
        complete(cluster.plain.url, again)
    )


USAGE = "vllm:kv_cache_usage_perc"


def test_a_request_aborted_mid_hand_off_keeps_its_blocks_until_the_late_bytes_have_landed(cluster):
    decoder = cluster.decoder.url
    idle = metrics(decoder)[USAGE]
    tokens = prompt(2000, seed=95)
    first = prefill(cluster.prefiller.url, tokens)
    real = first.params["pdrun"]["endpoints"][0]
    late = transfer.listen("tcp://127.0.0.1:0", Corrupting(real, "late", cluster.deployment.auth_token, pause_s=2.5))
    first.params["pdrun"]["endpoints"] = [late.address]
    body = {"model": "tiny", "prompt": [*tokens, first.token], "max_tokens": 8, "temperature": 0, "stream": True,
            "kv_transfer_params": first.params}  # fmt: skip
    try:
        with httpx.stream("POST", f"{decoder}/v1/completions", json=body, timeout=30):
            time.sleep(0.5)  # its hand-off is being pulled, the chunks 2 s away: the client leaves
        # Requests decoding while the aborted hand-off's chunks land: had its blocks been given to
        # them, they would read that prompt's KV.
        for i in range(6):
            other = prompt(300, seed=96 + i)
            want = token_ids(complete(cluster.plain.url, other, max_tokens=24))
            assert token_ids(complete(decoder, other, max_tokens=24)) == want
    finally:
        late.close()
    # And the blocks are given back once the copy is done: nothing held for the aborted request.
    deadline = time.monotonic() + 20
    while metrics(decoder)[USAGE] > idle and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics(decoder)[USAGE] <= idle


def engine_of(api_pid: int) -> int:
    """The EngineCore process under a vLLM API server: where the connector's threads and sockets live."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == api_pid:
                return int(entry.name)
    raise AssertionError(f"no child process of {api_pid}")


def test_failed_hand_offs_leave_no_thread_or_connection_behind(cluster):
    engine = engine_of(cluster.decoder.pid)
    ok = prompt(300, seed=110)
    decode(cluster, ok, prefill(cluster.prefiller.url, ok))  # warm: pools and loader threads exist
    before = threads_and_fds(engine)
    failures = 6
    for i in range(failures):
        tokens = prompt(400, seed=111 + i)
        first = stored_prefill(cluster, tokens)
        real = first.params["pdrun"]["endpoints"][0]
        how = ("flip-a-byte", "wrong-layout")[i % 2]
        fake = transfer.listen("tcp://127.0.0.1:0", Corrupting(real, how, cluster.deployment.auth_token))
        first.params["pdrun"]["endpoints"] = [fake.address]
        try:
            assert decode(cluster, tokens, first) == computed_with(cluster.plain.url, tokens, first)
        finally:
            fake.close()
    after = threads_and_fds(engine)
    # Each failed hand-off closed what it opened: neither count grew with the failures.
    assert after[0] - before[0] < failures // 2 and after[1] - before[1] < failures // 2, (before, after)

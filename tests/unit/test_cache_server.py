"""The cache server over real TCP: lookup/get/put/stats from clients, many at once with no torn
read, a dead server costing misses not errors, exact /metrics, and `pdrun cache-server` keeping
its chunks across a restart."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdrun.storage.client import CacheClient
from pdrun.storage.server import CacheServer, serve_metrics
from pdrun.storage.tiers import DiskTier, MemoryTier, TieredStore
from tests.unit.test_tiers import CHUNK, key, payload

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    store = TieredStore(MemoryTier(8 * CHUNK), DiskTier(tmp_path, 64 * (CHUNK + 200)))
    with CacheServer("tcp://127.0.0.1:0", store) as s:
        yield s


def test_put_lookup_get_stats(server):
    client = CacheClient(server.address)
    for i in range(5):
        assert client.put(key(i), payload(i), {"tokens": 256, "i": i})
    keys = [key(i) for i in range(8)]
    assert client.lookup(keys) == 5
    assert client.lookup([key(9), *keys]) == 0  # leading run only
    got = client.get(keys)
    assert [(k, bytes(p), m) for k, p, m in got] == [(key(i), payload(i), {"tokens": 256, "i": i}) for i in range(5)]
    server.store.flush()
    stats = client.stats()
    assert stats["memory"]["puts"] == 5 and stats["disk"]["entries"] == 5
    client.close()


def test_a_prompt_read_over_tcp_keeps_its_head_over_its_tail():
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(4 * CHUNK))) as s:
        client = CacheClient(s.address)
        for i in range(4):  # one by one, as an instance on another host writes behind
            assert client.put(key(i), payload(i))
        assert len(client.get([key(0), key(1), key(2)])) == 3  # a request loads a prompt's first three
        for i in (4, 5):
            assert client.put(key(i), payload(i))
        assert client.lookup([key(i) for i in range(3)]) == 2  # 3, then the prompt's tail, made room
        client.close()


def test_get_fills_the_callers_buffers(server):
    client = CacheClient(server.address)
    client.put(key(1), payload(1))
    buffers = []

    def sink(header):
        buffers.append(bytearray(header.nbytes))
        return buffers[-1]

    got = client.get([key(1)], sink=sink)
    assert got[0][1] is buffers[0] and bytes(buffers[0]) == payload(1)


def test_many_clients_at_once_never_tear(server):
    errors: list[str] = []

    def worker(w: int) -> None:
        client = CacheClient(server.address)
        for n in range(100):
            i = (w * 3 + n) % 20
            client.put(key(i), payload(i, n % 4), {"v": n % 4})
            for k, data, meta in client.get([key((i + 7) % 20)]):
                if bytes(data) != payload((i + 7) % 20, meta["v"]):
                    errors.append(f"torn chunk {k.hex()}")
        client.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors


def test_a_dead_cache_is_a_miss_not_an_error(caplog):
    client = CacheClient(f"tcp://127.0.0.1:{free_port()}")
    assert client.lookup([key(1)]) == 0
    assert client.get([key(1)]) == []
    assert client.put(key(1), payload(1)) is False
    assert caplog.text.count("treating it as a miss") == 3  # once per kind of failure


def test_bad_requests_get_clear_errors_and_the_server_goes_on(server):
    from pdrun import transfer

    with transfer.connect(server.address) as conn, pytest.raises(transfer.RemoteError, match="unknown op 'drop'"):
        conn.call("drop")
    with transfer.connect(server.address) as conn, pytest.raises(transfer.RemoteError, match="hex chunk keys"):
        conn.call("lookup", meta={"keys": ["zz"]})
    client = CacheClient(server.address)
    assert client.put(key(3), payload(3)) and client.lookup([key(3)]) == 1


def test_metrics_count_exactly(server):
    port = free_port()
    http = serve_metrics(server.store, "127.0.0.1", port)
    try:
        client = CacheClient(server.address)
        for i in range(3):
            client.put(key(i), payload(i))
        client.get([key(0), key(1), key(7)])  # 2 hits, then the miss that ends the run
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            text = r.read().decode()
    finally:
        http.shutdown()
    samples = {(s.name, s.labels.get("tier")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("pdrun:cache_puts_total", "memory")] == 3
    assert samples[("pdrun:cache_hits_total", "memory")] == 2
    assert samples[("pdrun:cache_misses_total", "memory")] == 1
    assert samples[("pdrun:cache_bytes_out_total", "memory")] == 2 * CHUNK
    assert samples[("pdrun:cache_entries", "memory")] == 3


def test_the_cache_server_command_keeps_chunks_across_a_restart(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "pdrun.launch", "cache-server", "--listen", f"tcp://127.0.0.1:{port}",
           "--cpu-gb", "0.01",
           "--dir", str(tmp_path / "cache"), "--disk-gb", "0.1"]  # fmt: skip

    def start() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = ""
        while f"cache server on tcp://127.0.0.1:{port}" not in lines:
            line = proc.stdout.readline()
            if not line:
                proc.kill()
                proc.wait()
                pytest.fail(f"exited before serving:\n{lines}")
            lines += line
        return proc, lines

    def stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0
        assert "cache server stopped" in proc.stdout.read()

    proc, _ = start()
    try:
        client = CacheClient(f"tcp://127.0.0.1:{port}")
        for i in range(4):
            assert client.put(key(i), payload(i), {"i": i})
        client.close()
    finally:
        stop(proc)
    proc, said = start()
    assert "4 chunks" in said  # the disk index, rebuilt from the files
    try:
        client = CacheClient(f"tcp://127.0.0.1:{port}")
        t0 = time.monotonic()
        assert client.lookup([key(i) for i in range(5)]) == 4
        got = client.get([key(i) for i in range(4)])
        assert [bytes(p) for _, p, _ in got] == [payload(i) for i in range(4)]
        assert client.stats()["disk"]["hits"] == 4
        assert time.monotonic() - t0 < 10
        client.close()
    finally:
        stop(proc)


def test_after_a_failure_the_cache_is_skipped_for_retry_after_s_then_used_again(tmp_path):
    port = free_port()
    client = CacheClient(f"tcp://127.0.0.1:{port}", retry_after_s=1.0)
    assert client.lookup([key(1)]) == 0  # refused: nothing listens yet
    with CacheServer(f"tcp://127.0.0.1:{port}", TieredStore(MemoryTier(8 * CHUNK))) as s:
        s.store.put(key(1), payload(1))
        t0 = time.monotonic()
        assert client.lookup([key(1)]) == 0  # within the back-off: a miss without even connecting
        assert client.put(key(2), payload(2)) is False
        assert s.store.lookup([key(2)]) == 0
        time.sleep(max(0.0, 1.05 - (time.monotonic() - t0)))
        assert client.lookup([key(1)]) == 1
    client.close()


def test_a_cache_that_hangs_costs_one_timeout_not_one_per_call():
    from pdrun import transfer

    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) and never answers
    address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
    client = CacheClient(
        address, connect=lambda a: transfer.connect(a, connect_timeout=0.5, io_timeout=0.5), retry_after_s=30
    )
    try:
        t0 = time.monotonic()
        assert client.lookup([key(1)]) == 0
        first = time.monotonic() - t0
        assert 0.4 < first < 5
        t0 = time.monotonic()
        for _ in range(20):
            assert client.lookup([key(1)]) == 0
            assert client.get([key(1)]) == []
        assert time.monotonic() - t0 < 0.5
    finally:
        client.close()
        silent.close()


def test_fetch_streams_each_chunk_to_the_caller_and_stops_at_the_first_missing(server):
    client = CacheClient(server.address)
    for i in (0, 1, 3):
        client.put(key(i), payload(i), {"i": i})
    seen = []
    buf = bytearray(len(payload(0)))
    n = client.fetch([key(i) for i in range(4)], lambda h, p: seen.append((h.meta["i"], bytes(p))), lambda h: buf)
    assert n == 2 and seen == [(0, payload(0)), (1, payload(1))]

    def refuse(h, p):
        raise ValueError("not for this cache")

    with pytest.raises(ValueError, match="not for this cache"):
        client.fetch([key(0)], refuse)
    assert client.lookup([key(0)]) == 1  # the client goes on
    client.close()


def test_the_digest_recorded_at_put_is_the_one_served_never_recomputed(server):
    from pdrun.transfer.wire import checksum

    client = CacheClient(server.address)
    server.store.put(key(1), payload(1), {}, checksum(payload(1)))
    server.store.put(key(2), payload(2), {}, checksum(payload(2)) ^ 1)  # a wrong digest is never made right
    assert [bytes(p) for _, p, _ in client.get([key(1)])] == [payload(1)]
    assert client.get([key(2)]) == []  # the client's verification refuses it: a miss
    client.close()

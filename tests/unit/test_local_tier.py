"""The cache tier through shared memory, on a real arena, real unix sockets and real processes:
instances share chunks by their own copies, leases keep what is being read or written from being
reused, and an instance that dies or overstays its lease pins nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
import zmq

from pdrun.storage.client import CacheClient
from pdrun.storage.local import HELD, NO_ROOM, LocalClient, LocalError
from pdrun.storage.server import CacheServer
from pdrun.storage.tiers import DiskTier, MemoryTier, TieredStore

CHUNK = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(f"chunk {i}".encode())


def payload(i: int) -> bytes:
    return xxhash.xxh3_64_digest(str(i).encode()) * (CHUNK // 8)


@pytest.fixture
def server(tmp_path):
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(4 * CHUNK), DiskTier(tmp_path, 64 * CHUNK))) as s:
        yield s


def local(server) -> LocalClient:
    client = LocalClient.discover(CacheClient(server.address).local())
    assert client is not None
    return client


def store(client: LocalClient, keys: list[int], order: list[int] = ()) -> None:
    ordered = [key(i) for i in order]
    lease, slots = client.reserve([key(i) for i in keys], [CHUNK] * len(keys), [{"i": i} for i in keys], order=ordered)
    for i, offset in zip(keys, slots, strict=True):
        assert offset >= 0
        client.arena.view(offset, CHUNK)[:] = payload(i)
    client.commit(lease, [key(i) for i in keys])


def test_an_instance_reads_in_place_what_another_process_stored(server):
    code = f"""
import sys
from pdrun.storage.client import CacheClient
from pdrun.storage.local import LocalClient
from tests.unit.test_local_tier import store
client = LocalClient.discover(CacheClient({server.address!r}).local())
store(client, [0, 1, 2])
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    reader = local(server)
    assert reader.where([key(0), key(1), key(2), key(3)]) == (3, 3)
    lease, slots = reader.read([key(i) for i in range(4)])
    assert [bytes(reader.arena.view(s.offset, s.nbytes)) for s in slots] == [payload(i) for i in range(3)]
    assert [s.meta for s in slots] == [{"i": i} for i in range(3)]
    assert reader.release(lease)
    assert server.store.stats()["memory"]["bytes_in"] == 3 * CHUNK  # the server copied nothing itself
    reader.close()


def test_a_chunk_held_already_is_not_written_again_and_a_full_arena_says_no_room(server):
    client = local(server)
    store(client, [0, 1])
    lease, _ = client.read([key(0), key(1)])  # both pinned
    write, more = client.reserve([key(0), key(2), key(3), key(4)], [CHUNK] * 4, [{}] * 4)
    assert more[0] == HELD and more[1] >= 0 and more[2] >= 0 and more[3] == NO_ROOM  # 4 slots: 2 pinned, 2 new
    client.commit(write, [key(2)])  # 3 was not filled: freed
    assert client.where([key(2), key(3)]) == (1, 1)
    assert client.release(lease)
    store(client, [5, 6, 7])  # unpinned now: the oldest are evicted for them
    assert client.where([key(i) for i in (5, 6, 7)]) == (3, 3)
    client.close()


def test_a_chunk_another_request_is_writing_is_held_not_refused_for_room(server):
    client = local(server)
    first, slots = client.reserve([key(0)], [CHUNK], [{}])  # one request copies chunk 0 in
    assert slots[0] >= 0
    _, again = client.reserve([key(0)], [CHUNK], [{}])  # another computed the same chunk meanwhile
    assert again == [HELD]  # the first one's copy serves it: not counted as dropped for want of room
    client.commit(first, [key(0)])
    assert client.where([key(0)]) == (1, 1)
    client.close()


def test_a_prompt_under_pressure_loses_its_tail_not_its_head(server):
    client = local(server)
    store(client, [0, 1, 2])  # one prompt's chunks, stored together
    server.store.flush()  # on disk too: memory evicts them before any chunk that waits for the disk
    store(client, [10, 11])  # 4 slots: one of the first prompt's goes
    assert client.where([key(i) for i in (0, 1, 2)]) == (2, 3)  # its head still loads from memory
    lease, _ = client.read([key(10), key(11)])  # read: the second prompt, head last, most recent
    assert client.release(lease)
    store(client, [20, 21])  # two more go: the first prompt's (older), tail first
    assert client.where([key(i) for i in (0, 1, 2)]) == (0, 3)
    assert client.where([key(10), key(11)]) == (2, 2)
    client.close()


def test_a_prompt_stored_over_two_steps_keeps_its_head_over_its_tail_in_memory_and_on_disk(tmp_path):
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(4 * CHUNK), DiskTier(tmp_path, 64 * CHUNK))) as s:
        client = local(s)
        store(client, [0, 1])  # a prefill's first step
        store(client, [2, 3], order=[0, 1, 2, 3])  # its second, naming the chunks before
        s.store.flush()
        store(client, [10, 11])
        assert client.where([key(i) for i in range(4)]) == (2, 4)
        client.close()
    size = next(tmp_path.glob("*/*.chunk")).stat().st_size
    again = DiskTier(tmp_path, budget_bytes=int(4.5 * size))  # six files, room for four: two go at the scan
    assert again.lookup([key(i) for i in range(4)]) == 2 and again.lookup([key(10), key(11)]) == 2


HOLDER = """
import os, sys, time
from pdrun.storage.client import CacheClient
from pdrun.storage.local import LocalClient
from tests.unit.test_local_tier import key, store
client = LocalClient.discover(CacheClient(sys.argv[1]).local())
store(client, [0])
client.read([key(0)])  # a read lease, never released
client.reserve([key(1), key(2)], [65536, 65536], [{}, {}])  # a write lease, never committed
print("holding", flush=True)
time.sleep(60)
"""


def test_an_instance_killed_holding_leases_pins_nothing_once_the_server_sees_it_gone(server):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, server.address], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        assert server.local is not None and server.local.leases() == 2
        client = local(server)
        _, slots = client.reserve([key(10), key(11)], [CHUNK] * 2, [{}] * 2)
        assert slots[1] == NO_ROOM  # 0 read-pinned, 1 and 2 being written: one slot left
        server.local.sweep()
        assert server.local.leases() == 3  # alive: its leases stand (and this client's one)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    server.local.sweep()
    assert server.local.leases() == 1  # the client above still holds its own
    _, slots = client.reserve([key(12), key(13)], [CHUNK] * 2, [{}] * 2)
    assert all(s >= 0 for s in slots)  # 0 unpinned, 1 and 2 freed
    client.close()


def test_a_read_lease_held_too_long_is_unpinned_and_its_release_says_so(tmp_path):
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(4 * CHUNK))) as server:
        assert server.local is not None
        server.local.lease_s = 0.0
        client = local(server)
        store(client, [0])
        lease, _ = client.read([key(0)])
        server.local.sweep()
        assert not client.release(lease)  # the reader must not trust what it copied
        assert server.local.leases() == 0
        client.close()


def test_chunks_on_disk_are_read_by_the_instance_and_damaged_files_dropped(server, tmp_path):
    client = local(server)
    store(client, [0, 1])
    server.store.flush()
    assert client.disk == tmp_path
    chunk = client.disk_chunk(key(0))
    assert chunk is not None and chunk.header.nbytes == CHUNK and chunk.header.meta == {"i": 0}
    buf = bytearray(CHUNK)
    chunk.read_into(memoryview(buf))
    assert bytes(buf) == payload(0)
    path = DiskTier.path_in(tmp_path, key(1))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    damaged = client.disk_chunk(key(1))
    assert damaged is not None
    with pytest.raises(Exception, match="checksum"):
        damaged.read_into(memoryview(buf))
    client.damaged(key(1), ValueError("checksum"))
    assert not path.exists() and server.store.stats()["disk"]["dropped_corrupt"] == 1
    client.close()


def test_bad_requests_get_errors_and_the_service_goes_on(server):
    client = local(server)
    with pytest.raises(LocalError, match="unknown op"):
        client.call("format_disk")
    with pytest.raises(LocalError, match="keys"):
        client.call("where", keys="all of them")
    with pytest.raises(LocalError, match="no such write lease"):
        client.commit(12345, [key(0)])
    ctx = zmq.Context()
    raw = ctx.socket(zmq.REQ)
    raw.connect(client.info.ipc)
    raw.send(b"\xc1 not msgpack")
    assert raw.poll(5000) and b"error" in raw.recv()
    raw.close(0)
    ctx.term()
    store(client, [0])
    assert client.where([key(0)]) == (1, 1)
    client.close()


def test_a_server_gone_is_a_clear_error_for_the_caller(tmp_path):
    server = CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(4 * CHUNK)))
    client = local(server)
    client.timeout_ms = 300
    server.close()
    with pytest.raises(LocalError, match="did not answer"):
        client.where([key(0)])
    client.close()

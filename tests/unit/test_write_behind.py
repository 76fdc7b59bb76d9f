"""Writing chunks behind to a real cache server: every chunk put in order and counted; a cache
that hangs never blocks the caller, the bounded queue drops (and counts) what does not fit."""

from __future__ import annotations

import socket
import threading
import time

import torch

from pdrun import transfer
from pdrun.pd.write_behind import WriteBehind
from pdrun.storage.client import CacheClient
from pdrun.storage.server import CacheServer
from pdrun.storage.tiers import MemoryTier, TieredStore
from tests.unit.conftest import LateCopy

CHUNK = 64 * 1024


def chunk(i: int) -> torch.Tensor:
    return torch.full((CHUNK,), i % 251, dtype=torch.uint8)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: list[tuple[int, bool]] = []

    def __call__(self, nbytes: int, seconds: float, stored: bool) -> None:
        assert seconds >= 0
        with self.lock:
            self.results.append((nbytes, stored))


def test_every_chunk_reaches_the_cache_with_its_meta():
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(64 * CHUNK))) as server:
        done = Recorder()
        writer = WriteBehind(CacheClient(server.address), 1 << 30, done)
        for i in range(20):
            assert writer.submit(key(i), chunk(i), {"blocks": 2, "i": i})
        assert writer.flush(timeout=30)
        assert done.results == [(CHUNK, True)] * 20
        for i in range(20):
            got = server.store.get(key(i))
            assert got is not None and bytes(got.data) == bytes(chunk(i).numpy()) and got.meta["i"] == i
        writer.close()


def test_a_hung_cache_never_blocks_submit_and_the_overflow_is_dropped():
    silent = socket.create_server(("127.0.0.1", 0))  # accepts and never answers
    address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
    client = CacheClient(address, connect=lambda a: transfer.connect(a, io_timeout=1.0), retry_after_s=60)
    done = Recorder()
    writer = WriteBehind(client, 4 * CHUNK, done)
    try:
        t0 = time.monotonic()
        accepted = [writer.submit(key(i), chunk(i), {}) for i in range(10)]
        assert time.monotonic() - t0 < 0.5  # the first put hangs in the writer thread, not here
        assert accepted == [True] * 4 + [False] * 6
        assert writer.flush(timeout=10)  # one timeout, then misses at once while the cache is skipped
        assert done.results == [(CHUNK, False)] * 4
        assert writer.submit(key(11), chunk(11), {})  # room again
    finally:
        writer.close()
        silent.close()


def test_a_chunk_still_being_copied_is_written_once_the_copy_is_done():
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(4 * CHUNK))) as server:
        writer = WriteBehind(CacheClient(server.address), 1 << 30, Recorder())
        buf = torch.zeros(CHUNK, dtype=torch.uint8)
        assert writer.submit(key(1), buf, {}, ready=LateCopy(buf, 7, delay_s=0.3))
        assert writer.flush(timeout=30)
        assert bytes(server.store.get(key(1)).data) == bytes([7]) * CHUNK
        writer.close()

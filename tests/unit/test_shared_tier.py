"""A paged KV cache to the cache server's arena and back (pd/tier.py), on a real server, arena and
unix socket: what a store copies out a load puts back byte for byte, the chunks stay pinned until
the load ends, and a load whose pins ran out is not trusted; loads inside the step (pd/loads.py)
from chunks the scheduler pinned."""

from __future__ import annotations

import time

import pytest
import torch

from pdrun.pd import plan
from pdrun.pd import tier as shared_tier
from pdrun.pd.codec import PagedKV
from pdrun.pd.config import ConnectorConfig
from pdrun.pd.connector import PDMetadata
from pdrun.pd.loader import ChunkLoader, LoadJob, TierPin
from pdrun.pd.loads import Loads
from pdrun.pd.stats import StatsCounter
from pdrun.pd.tier import SharedTier, TierLink
from pdrun.storage.arena import PAGE
from pdrun.storage.client import CacheClient
from pdrun.storage.local import LocalClient
from pdrun.storage.server import CacheServer
from pdrun.storage.tiers import MemoryTier, TieredStore
from pdrun.transfer import ConnectionPool

BLOCKS, BLOCK, CHUNK = 64, 4, 8  # 2 blocks per chunk
PER = CHUNK // BLOCK
CHUNKS = 6


def paged() -> PagedKV:
    g = torch.Generator().manual_seed(7)
    caches = {f"model.layers.{i}.attn": torch.randn(BLOCKS, 2, BLOCK, 3, generator=g) for i in range(2)}
    return PagedKV(caches, BLOCKS, BLOCK)


def keys(n: int = CHUNKS) -> list[bytes]:
    return [i.to_bytes(16, "big") for i in range(n)]


SRC = list(range(CHUNKS * PER))  # blocks stored
DST = list(range(CHUNKS * PER, 2 * CHUNKS * PER))  # blocks loaded into


@pytest.fixture
def tier():
    cache = paged()
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(1 << 20))) as server:
        client = LocalClient.discover(CacheClient(server.address).local())
        assert client is not None
        stored: list[int] = []
        t = SharedTier(client, cache, lambda n, *_: stored.append(n))
        yield server, t, cache, stored
        t.close()


def stored_chunks(t: SharedTier, cache: PagedKV, n: int = CHUNKS) -> None:
    t.store([(k, SRC[i * PER : (i + 1) * PER]) for i, k in enumerate(keys(n))])
    t.flush()


def loader(cache: PagedKV, n: int = CHUNKS) -> ChunkLoader:
    tokens = n * CHUNK
    job = LoadJob("", [], plan.plan_load(keys(n), tokens, 0, tokens, DST, CHUNK, BLOCK), 0, tokens, DST)
    return ChunkLoader(cache, job)


def test_a_load_puts_back_what_a_store_copied_out_and_pins_until_it_ends(tier):
    server, t, cache, stored = tier
    stored_chunks(t, cache)
    assert sum(stored) == CHUNKS
    ld = loader(cache)
    load = t.start_load(keys(), ld)
    assert load.done() and ld.done == CHUNKS * CHUNK  # off a GPU the copies are done when queued
    assert server.local.leases() == 1  # pinned until the load ends: no store may take these slots
    assert t.finish(load)
    assert server.local.leases() == 0
    for layer in cache.layers:
        assert torch.equal(layer[SRC], layer[DST])


def test_a_load_takes_the_leading_chunks_the_arena_holds(tier):
    _, t, cache, _ = tier
    stored_chunks(t, cache, n=3)
    ld = loader(cache)
    load = t.start_load(keys(), ld)
    assert load.chunks == 3 and ld.done == 3 * CHUNK  # the rest is computed
    assert t.finish(load)
    n = 3 * PER
    for layer in cache.layers:
        assert torch.equal(layer[SRC[:n]], layer[DST[:n]])
        assert not torch.equal(layer[SRC[n:]], layer[DST[n:]])


def test_a_load_whose_pins_ran_out_is_not_trusted(tier):
    server, t, cache, _ = tier
    stored_chunks(t, cache)
    server.local.lease_s = 0.0
    load = t.start_load(keys(), loader(cache))
    server.local.sweep()  # past its time: unpinned, the slots may be reused
    assert not t.finish(load)


def test_a_chunk_of_another_layout_is_refused_and_unpins_what_it_took(tier):
    server, t, cache, _ = tier
    stored_chunks(t, cache)
    other = ChunkLoader(
        cache, LoadJob("", [], [plan.ChunkLoad(keys(1)[0], PER + 1, 0, DST[:PER], CHUNK)], 0, CHUNK, DST)
    )
    with pytest.raises(Exception, match="does not match"):
        t.start_load(keys(1), other)
    assert server.local.leases() == 0


def test_chunks_an_arena_full_of_pinned_ones_has_no_room_for_are_counted_as_such():
    cache = paged()
    room = 2 * PAGE  # two chunks (a slot is page-aligned)
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(room))) as server:
        client = LocalClient.discover(CacheClient(server.address).local())
        assert client is not None
        told: list[tuple[int, int, int, int]] = []
        t = SharedTier(
            client, cache, lambda n, _bytes, held, no_room, failed, _s: told.append((n, held, no_room, failed))
        )
        try:
            stored_chunks(t, cache, n=2)
            assert told[-1] == (2, 0, 0, 0)
            load = t.start_load(keys(2), loader(cache, n=2))  # both pinned while it runs
            t.store([(k, SRC[i * PER : (i + 1) * PER]) for i, k in enumerate(keys(4)) if i >= 2])
            t.flush()
            assert told[-1] == (0, 0, 2, 0)  # stored, held already, no room, failed
            assert t.finish(load)
        finally:
            t.close()


def test_chunks_the_tier_said_it_holds_are_not_offered_again_and_their_prompt_becomes_the_newest(monkeypatch):
    cache = paged()
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(4 * PAGE))) as server:  # 4 chunks
        client = LocalClient.discover(CacheClient(server.address).local())
        assert client is not None
        told: list[tuple[int, int, int, int]] = []
        t = SharedTier(
            client, cache, lambda n, _bytes, held, no_room, failed, _s: told.append((n, held, no_room, failed))
        )
        a, b, c = keys(6)[0:2], keys(6)[2:4], keys(6)[4:6]

        def store(prompt: list[bytes]) -> None:
            t.store([(k, SRC[i * PER : (i + 1) * PER]) for i, k in enumerate(prompt)])
            t.flush()

        try:
            store(a)
            store(b)  # the tier is full
            assert server.local.requests["reserve"] == 2
            store(a)  # as a warm request recomputing its last chunk: the tier took them just now
            assert server.local.requests["reserve"] == 2 and server.local.requests["touch"] == 1
            assert told[-1] == (0, 2, 0, 0)  # stored, held already, no room, failed
            store(c)  # room made by evicting the prompt used longest ago: b, though a was stored first
            assert client.where(a) == (2, 2) and client.where(b) == (0, 0)
            monkeypatch.setattr(shared_tier, "HELD_FOR_S", 0.0)
            store(a)  # not taken to be held any more: asked again, and held
            assert server.local.requests["reserve"] == 4 and told[-1] == (0, 2, 0, 0)
        finally:
            t.close()


def until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_watch_moves_to_a_restarted_servers_arena_and_lets_the_old_go_once_unused():
    """An idle instance must not keep a replaced server's arena mapped (its memory stays allocated
    while any process maps it): the watch moves to the new arena without waiting for a failure,
    and the old one is closed only once no thread still uses it (a store queued copies into it)."""
    cache = paged()
    with (
        CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(1 << 20))) as first,
        CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(1 << 20))) as second,
    ):
        old_client = LocalClient.discover(CacheClient(first.address).local())
        new_info = CacheClient(second.address).local()
        assert old_client is not None and new_info is not None
        old = SharedTier(old_client, cache, lambda *_: None)
        serving = {"token": old_client.info.token}
        link = TierLink(old, lambda: LocalClient.discover(CacheClient(second.address).local()), retry_s=60)
        link.watch(lambda: serving["token"], 0.02)
        try:
            with link.use() as in_use:
                assert in_use is old
                serving["token"] = new_info["token"]  # the server now serves another arena
                assert until(lambda: link.current is not old), "the watch never moved to the new arena"
                time.sleep(0.2)
                assert hasattr(old, "memory"), "closed while a thread still used it"
            assert until(lambda: not hasattr(old, "memory")), "the old arena was never let go"
            with link.use() as now:
                assert now is link.current and now.client.info.token == new_info["token"] and not now.failed
        finally:
            link.close()


def pinned_loads(t: SharedTier, cache: PagedKV) -> tuple[Loads, StatsCounter]:
    """A worker's loads over the tier `t`, as the connector makes them."""
    stats = StatsCounter()
    cfg = ConnectorConfig(chunk_size=CHUNK)
    conns = ConnectionPool(lambda address: None)  # never dialed: these loads read the arena
    return Loads(cfg, cache, 0, BLOCK, False, stats, conns, None, TierLink(t, lambda: None, 5.0)), stats


def pinned_job(t: SharedTier, token: str | None = None) -> LoadJob:
    """A job for the stored chunks, pinned as the scheduler pins them when it looks them up."""
    lease, slots = t.client.read(keys())
    pin = TierPin(lease, token or t.client.info.token, [(s.offset, s.nbytes, s.meta) for s in slots])
    tokens = CHUNKS * CHUNK
    return LoadJob("", [], plan.plan_load(keys(), tokens, 0, tokens, DST, CHUNK, BLOCK), 0, tokens, DST, True, 0, pin)


def step(loads: Loads, job: LoadJob, cache: PagedKV) -> set[int]:
    """One step that runs the job's request: the loads started, every layer waited for by the
    forward pass, then the blocks vLLM is told to recompute."""
    loads.start(PDMetadata(loads={"r": job}))
    for name in cache.layer_of:
        loads.wait_for_layer(name)
    return loads.take_load_errors()


def test_chunks_pinned_at_lookup_are_loaded_in_the_step_and_let_go_after_it(tier):
    server, t, cache, _ = tier
    stored_chunks(t, cache)
    loads, stats = pinned_loads(t, cache)
    job = pinned_job(t)
    assert step(loads, job, cache) == set()
    loads.shutdown()
    for layer in cache.layers:
        assert torch.equal(layer[SRC], layer[DST])
    assert server.local.leases() == 0
    taken = stats.take()
    assert taken is not None and taken.data["cache_in_step_tokens"] == CHUNKS * CHUNK
    assert taken.data["load_failures"] == 0


@pytest.mark.parametrize("how", ["pins ran out", "another arena"])
def test_a_pinned_load_that_cannot_be_trusted_is_recomputed(tier, how):
    """Its pins gone before the step ended (the bytes may be another chunk's), or pinned in an
    arena this worker does not map (a cache server restarted between the lookup and the step):
    every block of the load is reported for vLLM to recompute."""
    server, t, cache, _ = tier
    stored_chunks(t, cache)
    loads, stats = pinned_loads(t, cache)
    job = pinned_job(t, token="another arena" if how == "another arena" else None)
    if how == "pins ran out":
        t.client.release(job.pin.lease)  # as the server unpins a read lease held past its time
    assert step(loads, job, cache) == set(DST)
    loads.shutdown()
    taken = stats.take()
    assert taken is not None and taken.data["load_failures"] == 1 and taken.data["cache_in_step_tokens"] == 0
    if how == "another arena":
        t.client.release(job.pin.lease)  # the scheduler's pin, left to its server
    assert server.local.leases() == 0

"""A decoder's loader pulling a staged hand-off over real loopback connections: whole, over several
lanes at once, and what is kept when part of it is gone."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdrun import transfer
from pdrun.pd import plan
from pdrun.pd.chunkmeta import RunMeta
from pdrun.pd.codec import PagedKV
from pdrun.pd.loader import ChunkLoader, LoadJob, pull
from pdrun.pd.staging import StagingPool, StagingService, host_allocator

BLOCKS, BLOCK, CHUNK = 32, 4, 8  # 2 blocks per chunk: 16 chunks
GAP = 11  # the chunk staged under a transfer of its own


def paged(seed=None):
    caches = {}
    for i in range(2):
        t = torch.zeros(BLOCKS, 2, BLOCK, 3)
        if seed is not None:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed + i)))
        caches[f"model.layers.{i}.attn"] = t
    return PagedKV(caches, BLOCKS, BLOCK)


def key(i):
    return i.to_bytes(16, "big")


class Counting(StagingService):
    """Holds each "get" until `lanes` of them are being served at once (a barrier, 5 s at most):
    a pull whose lanes ran one after another breaks it and fails."""

    def __init__(self, *args):
        super().__init__(*args)
        self.barrier: threading.Barrier | None = None

    def handle(self, request, payload):
        if self.barrier is not None:
            self.barrier.wait(timeout=5)
        return (yield from super().handle(request, payload))


@pytest.fixture
def prefiller():
    src = paged(seed=3)
    pool = StagingPool(1 << 24, ttl_s=60)
    per = CHUNK // BLOCK
    for i in range(BLOCKS // per):
        ids = list(range(i * per, (i + 1) * per))
        transfer_id = "gap" if i == GAP else "t"  # a chunk a test can evict alone (`pool.release("gap")`)
        pool.stage(transfer_id, key(i), per, src.nbytes(per), lambda buf, ids=ids: src.gather(ids, buf))
    service = Counting(pool, src.describe())
    with transfer.listen("tcp://127.0.0.1:0", service) as listener:
        yield src, pool, service, listener.address


def job(address, dst_ids):
    tokens = BLOCKS * BLOCK
    keys = [key(i) for i in range(tokens // CHUNK)]
    chunks = plan.plan_load(keys, tokens, 0, tokens, dst_ids, CHUNK, BLOCK)
    return LoadJob("t", [address], chunks, 0, tokens, dst_ids)


def same_blocks(src, dst, src_ids, dst_ids):
    return all(torch.equal(a[src_ids], b[dst_ids]) for a, b in zip(src.layers, dst.layers, strict=True))


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_a_hand_off_lands_whole_over_any_number_of_lanes(prefiller, lanes):
    src, _, service, address = prefiller
    service.barrier = threading.Barrier(lanes)  # the lanes are pulled at the same time
    dst = paged()
    dst_ids = list(reversed(range(BLOCKS)))
    loader = ChunkLoader(dst, job(address, dst_ids))
    conns = transfer.ConnectionPool(transfer.connect)
    with ThreadPoolExecutor(4) as pool:
        pull(conns, address, loader, lanes, pool)
    conns.close()
    assert loader.done == BLOCKS * BLOCK and loader.next == len(loader.chunks)
    assert loader.nbytes == src.nbytes(BLOCKS)
    assert same_blocks(src, dst, list(range(BLOCKS)), dst_ids)


def test_a_lane_that_fails_keeps_what_came_before_its_gap(prefiller):
    src, pool, _, address = prefiller
    # Chunk 11 evicted: released, then a chunk that needs its room (the second lane, chunks 8-15, stops there).
    pool.release("gap")
    assert pool.stage("other", key(99), 1, pool.budget - pool.nbytes + 1, lambda buf: None)
    assert pool.get(key(GAP)) is None
    dst = paged()
    loader = ChunkLoader(dst, job(address, list(range(BLOCKS))))
    conns = transfer.ConnectionPool(transfer.connect)
    with ThreadPoolExecutor(4) as executor, pytest.raises(transfer.RemoteError, match="not staged"):
        pull(conns, address, loader, 2, executor)
    conns.close()
    assert loader.next == 11 and loader.done == 11 * CHUNK  # chunks 0-10 in place, in order
    assert loader.remaining()[0].key == key(11)  # what the cache tier is asked for next
    assert same_blocks(src, dst, list(range(22)), list(range(22)))


def test_what_the_lanes_placed_survives_the_switch_to_the_cache_tier(prefiller):
    """The loader goes on from the cache tier after a lane failed: the chunks the lanes placed are
    not scattered again from its own (never filled) buffers."""
    src, pool, _, address = prefiller
    pool.release("gap")
    assert pool.stage("other", key(99), 1, pool.budget - pool.nbytes + 1, lambda buf: None)
    dst = paged()
    loader = ChunkLoader(dst, job(address, list(range(BLOCKS))))
    conns = transfer.ConnectionPool(transfer.connect)
    with ThreadPoolExecutor(4) as executor, pytest.raises(transfer.RemoteError):
        pull(conns, address, loader, 2, executor)
    conns.close()
    loader.switch_source(on_device=False)
    for c in loader.remaining():  # the tier's copy of the rest, from host memory
        chunk = torch.empty(src.nbytes(c.src_blocks), dtype=torch.uint8)
        src.gather(c.block_ids, chunk)
        loader.place_from(chunk)
    loader.settle()
    assert loader.done == BLOCKS * BLOCK
    assert same_blocks(src, dst, list(range(BLOCKS)), list(range(BLOCKS)))


class Slab:
    """A staging allocator handing out consecutive pieces of one buffer: chunks staged one after
    another lie back to back, which the staging service sends joined."""

    def __init__(self, nbytes):
        self.memory = torch.empty(nbytes, dtype=torch.uint8)
        self.used = 0

    def __call__(self, nbytes):
        buf = self.memory[self.used : self.used + nbytes]
        self.used += nbytes
        return buf


def staged(allocate, skip=()):
    """A prefiller's pool holding every chunk but those in `skip`, the sizes of the frames it serves,
    and its service."""
    src = paged(seed=5)
    pool = StagingPool(1 << 24, ttl_s=60, allocate=allocate)
    per = CHUNK // BLOCK
    for i in range(BLOCKS // per):
        if i not in skip:
            ids = list(range(i * per, (i + 1) * per))
            pool.stage("t", key(i), per, src.nbytes(per), lambda buf, ids=ids: src.gather(ids, buf))
    frames = []
    return src, frames, StagingService(pool, src.describe(), on_served=frames.append)


@pytest.mark.parametrize(("scheme", "lanes"), [("tcp", 1), ("tcp", 2), ("ucx", 1)])
def test_chunks_that_lie_back_to_back_travel_joined_in_frames_of_the_size_asked(scheme, lanes):
    if scheme == "ucx":
        pytest.importorskip("ucxx")
    src, frames, service = staged(Slab(1 << 20))
    dst = paged()
    dst_ids = list(reversed(range(BLOCKS)))
    with transfer.listen(f"{scheme}://127.0.0.1:0", service) as listener:
        loader = ChunkLoader(dst, job(listener.address, dst_ids), window=8, per_frame=3)
        conns = transfer.ConnectionPool(transfer.connect)
        with ThreadPoolExecutor(2) as pool:
            pull(conns, listener.address, loader, lanes, pool)
        conns.close()
    chunk = src.nbytes(CHUNK // BLOCK)
    share = 16 // lanes  # each lane's chunks: frames of 3, the last of what is left (the lanes' interleave)
    assert sorted(frames) == sorted(lanes * ([3 * chunk] * (share // 3) + [share % 3 * chunk] * (share % 3 > 0)))
    assert loader.done == BLOCKS * BLOCK and loader.nbytes == src.nbytes(BLOCKS)
    assert same_blocks(src, dst, list(range(BLOCKS)), dst_ids)


def test_chunks_apart_in_host_memory_travel_one_a_frame_whatever_was_asked():
    src, frames, service = staged(host_allocator)
    dst = paged()
    with transfer.listen("tcp://127.0.0.1:0", service) as listener:
        loader = ChunkLoader(dst, job(listener.address, list(range(BLOCKS))), window=8, per_frame=4)
        conns = transfer.ConnectionPool(transfer.connect)
        pull(conns, listener.address, loader, 1, None)
        conns.close()
    assert frames == [src.nbytes(CHUNK // BLOCK)] * 16
    assert same_blocks(src, dst, list(range(BLOCKS)), list(range(BLOCKS)))


def test_a_frame_stops_at_a_chunk_not_staged_and_what_came_before_it_is_placed():
    src, frames, service = staged(Slab(1 << 20), skip={GAP})
    dst = paged()
    with transfer.listen("tcp://127.0.0.1:0", service) as listener:
        loader = ChunkLoader(dst, job(listener.address, list(range(BLOCKS))), window=8, per_frame=4)
        conns = transfer.ConnectionPool(transfer.connect)
        with pytest.raises(transfer.RemoteError, match="not staged"):
            pull(conns, listener.address, loader, 1, None)
        conns.close()
    chunk = src.nbytes(CHUNK // BLOCK)
    assert frames == [4 * chunk, 4 * chunk, 3 * chunk]  # chunks 0-3, 4-7, 8-10
    assert loader.next == GAP and loader.done == GAP * CHUNK
    assert same_blocks(src, dst, list(range(2 * GAP)), list(range(2 * GAP)))


@pytest.mark.parametrize("bad", [0, 17, "4", True])
def test_a_frame_size_out_of_range_is_refused_with_its_name(bad):
    _, _, service = staged(Slab(1 << 20))
    with (
        transfer.listen("tcp://127.0.0.1:0", service) as listener,
        transfer.connect(listener.address) as conn,
        pytest.raises(transfer.RemoteError, match="chunks_per_frame"),
    ):
        list(conn.stream("get", meta={"keys": [key(0).hex()], "chunks_per_frame": bad}))


def test_a_frame_of_more_chunks_than_asked_for_is_refused_before_a_byte_lands():
    src = paged(seed=1)
    loader = ChunkLoader(paged(), job("tcp://127.0.0.1:1", list(range(BLOCKS))), window=8, per_frame=2)
    meta = RunMeta(src.describe(), [2, 2, 2]).encode()
    with pytest.raises(transfer.ProtocolError, match="at most 2"):
        loader.sink(transfer.Header(op="chunk", key=key(0), meta=meta, nbytes=3 * src.nbytes(2)))
    assert loader.asked == 0

"""The hand-off layer by layer (`layerwise`). A prefiller's chunks copied out: whatever layers
vLLM's hooks copy, in any order, `finish` copies the rest, and the chunks hold what a whole-chunk
gather gives. A decoder's load over real loopback connections (tcp, ucx): each layer is in place
when its wait returns, while later layers are not yet sent; a hand-off that is gone frees
every wait at once, and says why."""

from __future__ import annotations

import threading

import pytest
import torch

from pdrun import transfer
from pdrun.pd import plan
from pdrun.pd.codec import PagedKV
from pdrun.pd.layerwise import LayerwiseLoad, LayerwiseSave, MappedLoad, pull_layers
from pdrun.pd.loader import LoadJob
from pdrun.pd.plan import ChunkSave
from pdrun.pd.staging import StagingPool, StagingService

LAYERS, BLOCKS = 5, 12


def paged() -> PagedKV:
    g = torch.Generator().manual_seed(0)
    return PagedKV(
        {f"model.layers.{i}.attn": torch.randn(BLOCKS, 2, 4, 6, generator=g) for i in range(LAYERS)}, BLOCKS, 4
    )


def saves() -> list[ChunkSave]:
    return [
        ChunkSave("t", 0, b"a" * 16, [3, 4]),
        ChunkSave("t", 1, b"b" * 16, [9, 0]),
        ChunkSave("t", 2, b"c" * 16, [7]),
    ]


@pytest.mark.parametrize("hooked", [[], [0, 1, 2, 3, 4], [2], [4, 0, 3]])
def test_the_chunks_hold_what_a_whole_gather_gives(hooked):
    kv = paged()
    chunks = [(s, torch.zeros(kv.nbytes(len(s.block_ids)), dtype=torch.uint8)) for s in saves()]
    copier = LayerwiseSave(kv, chunks)
    for i in hooked:
        copier.layer(i)
        copier.layer(i)  # a layer vLLM names twice (a shared cache) is copied once
    assert copier.hooked == len(hooked)
    assert copier.finish() is None  # on a CPU the copies are done
    for s, buf in chunks:
        want = torch.zeros_like(buf)
        kv.gather(s.block_ids, want)
        assert torch.equal(buf, want), (hooked, s.index)


def test_a_hook_copies_its_own_layer_only():
    kv = paged()
    chunks = [(s, torch.zeros(kv.nbytes(len(s.block_ids)), dtype=torch.uint8)) for s in saves()]
    LayerwiseSave(kv, chunks).layer(2)
    for s, buf in chunks:
        view = kv.chunk_view(buf, len(s.block_ids))
        assert torch.equal(view[2], kv.layers[2][s.block_ids])
        assert not view[[0, 1, 3, 4]].any()


class Gated(StagingService):
    """Sends a layer's frames only once the test opens that layer: what the decoder has when a wait
    returns is then known exactly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[int] = []  # chunks in each frame
        self.open = [threading.Event() for _ in range(LAYERS)]
        self.open[0].set()

    def handle(self, request, payload):
        frames = super().handle(request, payload)
        while True:
            try:
                frame = next(frames)
            except StopIteration as stop:
                return stop.value
            assert self.open[frame.header.meta["layer"]].wait(10)
            self.sent.append(len(frame.header.meta["blocks"]))
            yield frame


CHUNK_BLOCKS, BLOCK = 2, 4


@pytest.fixture(params=["tcp", "ucx"])
def prefiller(request):
    src = paged()
    pool = StagingPool(1 << 24, ttl_s=60)
    for i in range(BLOCKS // CHUNK_BLOCKS):  # 6 chunks of 2 blocks
        ids = list(range(i * CHUNK_BLOCKS, (i + 1) * CHUNK_BLOCKS))
        transfer_id = "gap" if i == 4 else "t"  # chunk 4: evictable alone (`pool.release("gap")`)
        pool.stage(
            transfer_id, bytes([i]) * 16, CHUNK_BLOCKS, src.nbytes(CHUNK_BLOCKS), lambda b, ids=ids: src.gather(ids, b)
        )
    service = Gated(pool, src.describe(), layers=LAYERS)
    for layer in service.open:  # all open but in the test that gates them
        layer.set()
    with transfer.listen(f"{request.param}://127.0.0.1:0", service, io_timeout=5) as listener:
        yield src, pool, listener.address, service


def layer_job(address: str, dst_ids: list[int]) -> LoadJob:
    """Tokens [4, 45) of a 45-token hand-off: the first chunk in part, the last one short."""
    handed, chunk = BLOCKS * BLOCK - 3, CHUNK_BLOCKS * BLOCK
    keys = [bytes([i]) * 16 for i in range(BLOCKS // CHUNK_BLOCKS)]
    chunks = plan.plan_load(keys, handed, BLOCK, handed, dst_ids, chunk, BLOCK)
    return LoadJob("t", [address], chunks, BLOCK, handed, dst_ids, layerwise=True)


def empty() -> PagedKV:
    return PagedKV({f"model.layers.{i}.attn": torch.zeros(BLOCKS, 2, 4, 6) for i in range(LAYERS)}, BLOCKS, 4)


@pytest.mark.parametrize(
    ("window", "whole_layers"),
    [(1, False), (4, False), (9, False), (4, True)],  # whole layers: as chunks landing beside a GPU cache ask
)
def test_a_decoder_gets_each_layer_before_the_next_arrives(prefiller, window, whole_layers):
    """(Chunks staged in host memory go a frame per layer of a chunk even where whole layers are asked
    for: only GPU memory is joined, see the next test for whole layers.)"""
    src, _, address, service = prefiller
    dst = empty()
    dst_ids = [11, 3, 0, 7, 8, 5, 1, 10, 2, 9, 4, 6]
    load = LayerwiseLoad(dst, layer_job(address, dst_ids), on_device=whole_layers, window=window)
    assert load.whole_layers == whole_layers
    for later in service.open[1:]:
        later.clear()
    conns = transfer.ConnectionPool(transfer.connect)
    puller = threading.Thread(target=pull_layers, args=(conns, address, load))
    puller.start()
    chunks = len(load.job.chunks)
    for layer in range(LAYERS):
        load.wait(layer)
        # In place once the wait returns, with the later layers not sent yet; the first chunk's
        # skipped block untouched.
        assert load.arrived == chunks * (layer + 1), (layer, load.arrived)
        assert torch.equal(dst.layers[layer][dst_ids[1:]], src.layers[layer][1:]), layer
        assert not dst.layers[layer][dst_ids[0]].any()
        if layer + 1 < LAYERS:
            assert not dst.layers[layer + 1].any()
            service.open[layer + 1].set()
    puller.join()
    conns.close()
    assert load.complete and load.awaited == [True] * LAYERS
    assert service.sent == [1] * chunks * LAYERS


def test_a_decoder_places_frames_of_whole_layers():
    """As a prefiller with chunks in GPU memory sends them (tests/gpu runs the real thing): each frame
    one layer of every chunk, joined; the decoder's ring holds 2 + window layers."""
    src, dst = paged(), empty()
    dst_ids = [11, 3, 0, 7, 8, 5, 1, 10, 2, 9, 4, 6]
    load = LayerwiseLoad(dst, layer_job("tcp://-", dst_ids), on_device=True, window=4)
    assert (load.whole_layers, load.window, load._slots) == (True, 2, 4)
    bufs = []
    for i, c in enumerate(load.job.chunks):
        bufs.append(torch.zeros(src.nbytes(c.src_blocks), dtype=torch.uint8))
        src.gather(list(range(i * CHUNK_BLOCKS, (i + 1) * CHUNK_BLOCKS)), bufs[-1])
    meta = {"layout": src.describe(), "blocks": [c.src_blocks for c in load.job.chunks]}
    for layer in range(LAYERS):
        joined = torch.cat([b.view(LAYERS, -1)[layer] for b in bufs])
        key = load.job.chunks[0].key
        header = transfer.Header("chunk", key=key, nbytes=joined.numel(), meta={**meta, "layer": layer})
        load.sink(header)[:] = joined.numpy()
        load.place(header)
        load.wait(layer)
        assert torch.equal(dst.layers[layer][dst_ids[1:]], src.layers[layer][1:]), layer
    load.stop()
    assert load.complete
    short = {**meta, "layer": 0, "blocks": [*meta["blocks"][:-1], 1]}  # a frame that is not what was asked
    header = transfer.Header("chunk", key=load.job.chunks[0].key, nbytes=joined.numel(), meta=short)
    with pytest.raises(transfer.ProtocolError, match="expected layer"):
        LayerwiseLoad(empty(), load.job, on_device=True).sink(header)
    assert load.nbytes == src.nbytes(BLOCKS)  # every layer of every chunk, once


def test_chunks_in_local_memory_are_in_place_before_the_forward_pass_waits():
    """A load inside the step from the cache tier's arena, on CPU: whole chunks (every layer, as
    the arena holds them) scattered at once, the first chunk's skipped block untouched; each
    layer the forward pass waits for is counted (tests/gpu reads them a layer at a time)."""
    src, dst = paged(), empty()
    dst_ids = [11, 3, 0, 7, 8, 5, 1, 10, 2, 9, 4, 6]
    job = layer_job("", dst_ids)
    sources = []
    for i, c in enumerate(job.chunks):
        sources.append(torch.zeros(src.nbytes(c.src_blocks), dtype=torch.uint8))
        src.gather(list(range(i * CHUNK_BLOCKS, (i + 1) * CHUNK_BLOCKS)), sources[-1])
    load = MappedLoad(dst, job, sources, by_layer=False)
    for layer in range(LAYERS):
        assert torch.equal(dst.layers[layer][dst_ids[1:]], src.layers[layer][1:]), layer
        assert not dst.layers[layer][dst_ids[0]].any()
    for layer in range(LAYERS - 1):
        load.wait(layer)
    load.stop()
    assert load.complete and load.awaited == [True] * (LAYERS - 1) + [False]
    assert load.nbytes == dst.nbytes(len(dst_ids) - 1)


def test_a_hand_off_that_is_gone_frees_every_wait_and_says_why(prefiller):
    _, pool, address, _ = prefiller
    # Chunk 4 evicted (released, its room taken): the prefiller says so before the first frame.
    pool.release("gap")
    assert pool.stage("other", bytes([99]) * 16, 1, pool.budget - pool.nbytes + 1, lambda buf: None)
    assert pool.get(bytes([4]) * 16) is None
    dst = empty()
    load = LayerwiseLoad(dst, layer_job(address, list(range(BLOCKS))))
    conns = transfer.ConnectionPool(transfer.connect)
    with pytest.raises(transfer.RemoteError, match="not staged"):
        pull_layers(conns, address, load)
    conns.close()
    for layer in range(LAYERS):
        load.wait(layer)  # returns: the forward pass goes on, and the step's result is dropped
    assert not load.complete and "not staged" in load.error and load.arrived == 0
    assert not any(t.any() for t in dst.layers)


def test_a_prefiller_that_cannot_serve_layers_refuses_and_one_that_sends_whole_chunks_is_refused(prefiller):
    src, pool, address, _ = prefiller
    with (
        transfer.listen("tcp://127.0.0.1:0", StagingService(pool, src.describe())) as old,
        transfer.connect(old.address) as conn,
        pytest.raises(transfer.RemoteError, match="does not serve chunks by layer"),
    ):
        list(conn.stream("get", meta={"keys": [bytes([0]).hex() * 16], "by_layer": True}))
    load = LayerwiseLoad(empty(), layer_job(address, list(range(BLOCKS))))
    whole = {"layout": src.describe(), "blocks": CHUNK_BLOCKS}  # a "get" without by_layer: a whole chunk
    header = transfer.Header("chunk", key=bytes([0]) * 16, nbytes=src.nbytes(CHUNK_BLOCKS), meta=whole)
    with pytest.raises(transfer.ProtocolError, match=r"invalid chunk metadata .* at `\$\.blocks`"):
        load.sink(header)

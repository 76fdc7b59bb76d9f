"""A hand-off between two CUDA caches (GPU 0 to GPU 1 when there are two), pulled as the decoder's
loader does: scatters queued on the loader's stream, a ring buffer handed out again only once the
scatter reading it is done. Big chunks with scattered block ids make each scatter slow, so a buffer
reused too early would be overwritten while read, and the blocks would differ. With the Triton
block copies (one launch per batch of chunks, the default where the layout allows) and with
torch's; over tcp, ucx GPU to GPU (one chunk a frame, or several joined), and ucx from the
prefiller's host memory into GPU memory."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdrun import transfer
from pdrun.pd import plan
from pdrun.pd.codec import PagedKV
from pdrun.pd.layerwise import LayerwiseSave, MappedLoad
from pdrun.pd.loader import ChunkLoader, LoadJob, pull
from pdrun.pd.plan import ChunkSave
from pdrun.pd.staging import StagingPool, StagingService

pytestmark = pytest.mark.gpu

BLOCKS, BLOCK, CHUNK = 512, 16, 256  # 16 blocks per chunk: 32 chunks of 8 MiB
LAYERS, HEADS, DIM = 8, 8, 128


def paged(device: str, seed: int | None) -> PagedKV:
    caches = {}
    for i in range(LAYERS):
        t = torch.zeros(BLOCKS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16, device=device)
        if seed is not None:
            g = torch.Generator(device=device).manual_seed(seed + i)
            t.copy_(torch.randn(t.shape, generator=g, device=device))
        caches[f"model.layers.{i}.attn"] = t
    return PagedKV(caches, BLOCKS, BLOCK)


@pytest.fixture(params=["tcp", "ucx", "ucx-host"])
def prefiller(request):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    scheme = request.param.split("-")[0]
    src = paged("cuda:0", seed=5)
    staged_on_device = request.param == "ucx"
    on_device = scheme == "ucx"  # as the connector lands them: in GPU memory over ucx, whatever they wait in
    pool = StagingPool(1 << 31, ttl_s=60, allocate=src.device_buffer if staged_on_device else src.host_buffer)
    per = CHUNK // BLOCK
    for i in range(BLOCKS // per):
        ids = list(range(i * per, (i + 1) * per))
        pool.stage("t", key(i), per, src.nbytes(per), lambda buf, ids=ids: src.gather(ids, buf))
    with transfer.listen(f"{scheme}://127.0.0.1:0", StagingService(pool, src.describe())) as listener:
        yield src, listener.address, on_device


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.mark.parametrize("block_copy", ["triton", "torch"])
@pytest.mark.parametrize(("window", "per_frame"), [(1, 1), (4, 1), (8, 4), (4, 3)])
def test_queued_scatters_never_read_a_reused_buffer(prefiller, window, per_frame, block_copy, monkeypatch):
    src, address, on_device = prefiller
    monkeypatch.setenv("PDRUN_BLOCK_COPY", "auto" if block_copy == "triton" else "torch")
    dst = paged(f"cuda:{min(1, torch.cuda.device_count() - 1)}", seed=None)
    assert dst.block_copy == block_copy  # this layout takes the one-launch copies unless told not to
    dst_ids = [(7 * i) % BLOCKS for i in range(BLOCKS)]  # scattered: the slow, indexed scatter
    tokens = BLOCKS * BLOCK
    keys = [key(i) for i in range(tokens // CHUNK)]
    job = LoadJob("t", [address], plan.plan_load(keys, tokens, 0, tokens, dst_ids, CHUNK, BLOCK), 0, tokens, dst_ids)
    # Frames of several chunks where both ends hold them in GPU memory (joined by the prefiller).
    loader = ChunkLoader(dst, job, on_device, window, per_frame if on_device else 1)
    conns = transfer.ConnectionPool(lambda a: transfer.connect(a, io_timeout=60))
    with ThreadPoolExecutor(2) as lanes:
        pull(conns, address, loader, 1, lanes)
    conns.close()
    assert loader.done == tokens
    for a, b in zip(src.layers, dst.layers, strict=True):  # no synchronize here: pull settled the loads
        assert torch.equal(a.to(b.device), b[dst_ids])


def test_a_gather_into_host_memory_leaves_the_forward_stream_free():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    src = paged("cuda:0", seed=9)
    out = src.host_buffer(src.nbytes(BLOCKS))  # 256 MiB: ~5 ms out at 55 GB/s, the device gather ~0.2 ms
    ids = [(3 * i) % BLOCKS for i in range(BLOCKS)]
    ready = src.gather(ids, out)
    torch.cuda.current_stream(src.device).synchronize()  # the forward pass's stream: free once the device gather is
    assert not ready.query()  # the copy out is still going, on a stream of its own
    ready.synchronize()
    for layer, chunk in zip(src.layers, src.chunk_view(out, BLOCKS), strict=True):
        assert torch.equal(chunk.to(src.device), layer[ids])


@pytest.mark.parametrize("memory", ["device", "host"])
def test_chunks_copied_out_layer_by_layer_equal_a_whole_gather(memory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    src = paged("cuda:0", seed=11)
    allocate = src.host_buffer if memory == "host" else src.device_buffer
    per = CHUNK // BLOCK
    saves = [ChunkSave("t", i, key(i), [(5 * (i * per + j)) % BLOCKS for j in range(per)]) for i in range(6)]
    chunks = [(s, allocate(src.nbytes(per))) for s in saves]
    copier = LayerwiseSave(src, chunks)
    for i in range(0, LAYERS, 2):  # the others are left to finish
        copier.layer(i)
    copier.finish().synchronize()
    for s, buf in chunks:
        want = src.device_buffer(src.nbytes(per))
        src.gather(s.block_ids, want).synchronize()
        assert torch.equal(buf.to(src.device), want), (memory, s.index)


def test_a_mapped_load_reads_host_memory_a_layer_at_a_time_into_scattered_blocks():
    """The cache tier's load inside the step: whole chunks in pinned host memory (as the arena,
    registered for DMA, holds them) read by the GPU straight into the cache, a layer per launch;
    each layer waited for on the forward pass's stream, the first chunk in part."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    src, dst = paged("cuda:0", seed=13), paged("cuda:0", seed=None)
    per, n = CHUNK // BLOCK, 8
    hosts = []
    for i in range(n):
        hosts.append(src.host_buffer(src.nbytes(per)))
        src.gather(list(range(i * per, (i + 1) * per)), hosts[-1]).synchronize()
    dst_ids = [(7 * j + 3) % BLOCKS for j in range(n * per)]
    keys = [key(i) for i in range(n)]
    chunks = plan.plan_load(keys, n * CHUNK, BLOCK, n * CHUNK, dst_ids, CHUNK, BLOCK)  # the first block computed
    load = MappedLoad(dst, LoadJob("", [], chunks, BLOCK, n * CHUNK, dst_ids, layerwise=True), hosts, by_layer=True)
    for layer in range(LAYERS):
        load.wait(layer)
    load.stop()
    torch.cuda.current_stream(dst.device).synchronize()
    assert load.complete and load.awaited == [True] * LAYERS
    for s, d in zip(src.layers, dst.layers, strict=True):
        assert torch.equal(d[dst_ids[1:]], s[1 : n * per])
        assert not d[dst_ids[0]].any()

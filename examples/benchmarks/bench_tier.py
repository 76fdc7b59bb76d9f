"""The cache tier through shared memory, without vLLM: a paged KV cache of the Llama-3.1-8B shape
(32 layers, 8 KV heads of 128, bf16, 16-token blocks) stores a prompt's chunks into a cache
server's arena and loads them back into other blocks, as an instance does; prints a table and
writes JSON.

    python examples/benchmarks/bench_tier.py --tokens 16384 --rounds 5 --out tier.json

Store: the copies out of the KV cache queued and the slots committed (what the tier holds after).
Load: from asking for the chunks to the blocks in place. On a GPU the arena is registered for DMA,
and the floor is the host<->GPU copy speed; on CPU the copies are memcpy. Every load is checked
byte for byte against the blocks stored. On a GPU two more rows give the floors: the same bytes
copied chunk by chunk into GPU memory from pinned host memory (`h2d_pinned`) and from the arena
(`h2d_arena`), with no paged cache in between; with the Triton copies two more, the chunks read
straight out of pinned host memory into the paged cache by the copy kernel (`direct`: one launch;
`direct_by_layer`: one per layer; `direct_arena_by_layer`: one per layer, out of the arena itself),
checked like the loads.

On a GPU, a load inside the step (`cache_load_in_step`) too: the chunks pinned, every layer's copy
queued at once, the GPU reading the arena itself, while the main thread waits for each layer as a
forward pass does (`in_step`), and the same beside a thread running Python without pause, as a
loaded engine's thread does (`in_step_busy`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import Busy

from pdrun.pd import plan
from pdrun.pd.codec import PagedKV
from pdrun.pd.layerwise import MappedLoad
from pdrun.pd.loader import ChunkLoader, LoadJob
from pdrun.pd.tier import SharedTier
from pdrun.storage.client import CacheClient
from pdrun.storage.local import LocalClient
from pdrun.storage.server import CacheServer
from pdrun.storage.tiers import MemoryTier, TieredStore

BLOCK, CHUNK = 16, 256


def paged_cache(layers: int, heads: int, dim: int, blocks: int, device: str) -> PagedKV:
    caches = {
        f"model.layers.{i}.attn": torch.randn(blocks, 2, BLOCK, heads, dim, device=device).to(torch.bfloat16)
        for i in range(layers)
    }
    return PagedKV(caches, blocks, BLOCK)


def h2d_seconds(host: torch.Tensor, chunk_bytes: int, chunks: int) -> float:
    """Seconds to copy `chunks` chunks from `host` into GPU memory, one copy per chunk."""
    dst = torch.empty(chunk_bytes * chunks, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(chunks):
        part = slice(i * chunk_bytes, (i + 1) * chunk_bytes)
        dst[part].copy_(host[part], non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def direct_seconds(paged: PagedKV, host: torch.Tensor, ids: list[int], per: int, by_layer: bool) -> float:
    """Seconds for the Triton copies to read chunks straight out of pinned host memory into blocks
    `ids` (the GPU reads the bytes over the bus: nothing copied into GPU memory first), in one
    launch for every layer, or one per layer (as a load inside the forward pass would, each layer
    ready for its attention as soon as it is in place)."""
    chunk_bytes = paged.nbytes(per)
    rows = []
    for i in range(len(ids) // per):
        rows += paged.copy_table(ids[i * per : (i + 1) * per], 0, per, host, i * chunk_bytes)
    table = paged.device_table(rows)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for layers in [range(k, k + 1) for k in range(len(paged.layers))] if by_layer else [None]:
        paged._copy_blocks(table, True, layers)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def in_step_seconds(
    tier: SharedTier, paged: PagedKV, keys: list[bytes], loads: list, dst_ids: list[int], busy: bool
) -> float:
    """A load inside the step, as an instance runs one (MappedLoad): the chunks pinned, every
    layer's copy queued at once, the GPU reading the arena itself, while this thread waits for each
    layer in turn as the forward pass does; seconds until every layer is waited for and the copies
    are done. `busy`: beside a thread running Python without pause, as a loaded engine's."""
    spinner = Busy() if busy else None
    t0 = time.perf_counter()
    lease, slots = tier.client.read(keys)
    job = LoadJob("", [], loads, 0, len(loads) * CHUNK, dst_ids, layerwise=True)
    load = MappedLoad(paged, job, [tier.slot(s.offset, s.nbytes) for s in slots], by_layer=True)
    for layer in range(len(paged.layers)):
        load.wait(layer)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    if spinner is not None:
        spinner.stop()
    assert tier.client.release(lease) and load.complete, load.error
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    sys.setswitchinterval(200e-6)  # as pdrun's instances run (switch_interval_us)
    per = CHUNK // BLOCK
    chunks = args.tokens // CHUNK
    blocks = 2 * chunks * per + 1
    paged = paged_cache(args.layers, args.heads, args.dim, blocks, args.device)
    chunk_bytes = paged.nbytes(per)
    memory = MemoryTier(chunks * chunk_bytes * 2 + (1 << 20))
    stored_counts: list[int] = []
    with CacheServer("tcp://127.0.0.1:0", TieredStore(memory)) as server:
        client = LocalClient.discover(CacheClient(server.address).local())
        assert client is not None, "the cache server's arena is not reachable through this host's memory"
        t0 = time.perf_counter()
        tier = SharedTier(client, paged, lambda stored, *_: stored_counts.append(stored))
        register_s = time.perf_counter() - t0
        pinned = paged.host_buffer(chunks * chunk_bytes) if args.device.startswith("cuda") else None
        src_ids = list(range(chunks * per))
        dst_ids = list(range(chunks * per, 2 * chunks * per))
        rows: dict[str, list[float]] = {"store_s": [], "load_s": []}
        for r in range(args.rounds):
            keys = [f"round {r} chunk {i}".encode().ljust(16, b".")[:16] for i in range(chunks)]
            saves = [(keys[i], src_ids[i * per : (i + 1) * per]) for i in range(chunks)]
            t0 = time.perf_counter()
            tier.store(saves)
            tier.flush()
            rows["store_s"].append(time.perf_counter() - t0)
            loads = plan.plan_load(keys, args.tokens, 0, chunks * CHUNK, dst_ids, CHUNK, BLOCK)
            job = LoadJob("", [], loads, 0, chunks * CHUNK, dst_ids)
            t0 = time.perf_counter()
            loader = ChunkLoader(paged, job)
            load = tier.start_load(keys, loader)  # as an instance's engine thread queues it
            loader.settle()
            assert tier.finish(load), "the chunks were unpinned while being copied"
            rows["load_s"].append(time.perf_counter() - t0)
            assert loader.done == chunks * CHUNK, f"loaded {loader.done} of {chunks * CHUNK} tokens"
            for layer in paged.layers:
                assert torch.equal(layer[src_ids], layer[dst_ids]), "a loaded block differs from the one stored"
            for layer in paged.layers:
                layer[dst_ids] = 0
            for busy in (False, True) if tier.registered and paged.block_copy == "triton" else ():
                seconds = in_step_seconds(tier, paged, keys, loads, dst_ids, busy)
                rows.setdefault("in_step_busy_s" if busy else "in_step_s", []).append(seconds)
                for layer in paged.layers:
                    assert torch.equal(layer[src_ids], layer[dst_ids]), "a block loaded in the step differs"
                    layer[dst_ids] = 0
            if args.device.startswith("cuda"):
                for name, host in (("h2d_pinned_s", pinned), ("h2d_arena_s", tier.memory)):
                    rows.setdefault(name, []).append(h2d_seconds(host, chunk_bytes, chunks))
            if pinned is not None and paged.block_copy == "triton":
                for i in range(chunks):  # the chunks as the arena holds them, in pinned memory
                    paged.gather(src_ids[i * per : (i + 1) * per], pinned[i * chunk_bytes : (i + 1) * chunk_bytes])
                for i in range(chunks):  # and as the arena holds them (registered, not allocated pinned)
                    paged.gather(src_ids[i * per : (i + 1) * per], tier.memory[i * chunk_bytes : (i + 1) * chunk_bytes])
                directs = [("direct_s", pinned, False), ("direct_by_layer_s", pinned, True)]
                directs.append(("direct_arena_by_layer_s", tier.memory, True))
                for name, host, by_layer in directs:
                    rows.setdefault(name, []).append(direct_seconds(paged, host, dst_ids, per, by_layer))
                    for layer in paged.layers:
                        assert torch.equal(layer[src_ids], layer[dst_ids]), f"{name}: a block read directly differs"
                        layer[dst_ids] = 0
        tier.close()
    nbytes = chunks * chunk_bytes
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "tokens": args.tokens,
        "chunk_bytes": chunk_bytes,
        "bytes": nbytes,
        "register_s": register_s,
        "stored_chunks": sum(stored_counts),
    }
    size = f"{chunks} chunks of {chunk_bytes >> 20} MiB ({nbytes / 1e9:.2f} GB)"
    print(f"{args.tokens} tokens, {size} on {result['device']}, arena registered in {register_s:.2f} s")
    print("| step | median ms | min - max ms | GB/s (median) |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        med = statistics.median(values)
        result[name] = {"median": med, "min": min(values), "max": max(values), "gbps": nbytes / med / 1e9}
        spread = f"{min(values) * 1e3:.1f} - {max(values) * 1e3:.1f}"
        print(f"| {name[:-2]} | {med * 1e3:.1f} | {spread} | {nbytes / med / 1e9:.1f} |")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

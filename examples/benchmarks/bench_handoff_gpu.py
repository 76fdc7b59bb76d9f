"""One long prompt's KV hand-off, end to end, per path, next to the copy floors of the same run.

A prefiller process fills a paged KV cache of the Llama-8B shape (32 layers x K,V x 8 heads x 128,
bf16: 128 KiB per token; 16k tokens = 2 GiB), gathers it chunk by chunk into the real staging pool
and serves it. A decoder process (this one; on the next GPU when there are two) pulls every chunk
with the connector's own loader and scatters it into its paged cache, as PDConnector does. Timed:
the first request to the last block in place (and synchronized); the bytes are then checked. Over
ucx, `--window` chunks are received at once (the connector's `chunks_in_flight`), into GPU memory
`--per-frame` adjacent chunks in one frame (`chunks_per_frame`); `--busy` keeps a thread running
Python in both processes, as their engine threads under load do; `--lanes`
connections pull shares of the chunks at once (the connector's `load_lanes`). `--by-layer`: the
decoder loads as a `layerwise` one does (layer 0 of every chunk, then layer 1, ..., a frame each,
placed a layer at a time) and the time to its first layer in place is reported too: what a
forward pass waits before its first attention layer.

Paths: ucx with chunks in GPU memory (GPU to GPU: cuda_ipc on one host), ucx host-staged (from the
prefiller's pinned host memory into the decoder's GPU memory: UCX pipelines it through GPU
fragments), ucx host memory at both ends, tcp (pinned host memory). Floors: pinned host->GPU and GPU->host copy,
GPU->GPU copy (memcpy on a CPU-only host).

    python examples/benchmarks/bench_handoff_gpu.py                               # on a CUDA host
    python examples/benchmarks/bench_handoff_gpu.py --device cpu --tokens 2048    # the logic, on a CPU

A path below its target rate (for a 16k-token prompt between two H200s of one host) is marked
BELOW TARGET. Results from H200s are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import multiprocessing as mp
import os
import pstats
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Busy, memcpy_gbps, write_json

from pdrun import transfer
from pdrun.pd import plan
from pdrun.pd.codec import PagedKV
from pdrun.pd.layerwise import LayerwiseLoad, pull_layers
from pdrun.pd.loader import ChunkLoader, LoadJob
from pdrun.pd.loader import pull as load
from pdrun.pd.staging import StagingPool, StagingService

LAYERS, HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-8B, vLLM's 16-token blocks
# path: (transport, where the prefiller stages chunks, where the decoder receives them), as the connector
# does for staging_memory auto (ucx-gpu) and host (ucx-host); ucx-host-host is a decoder receiving into
# host memory too (a CPU decoder's way, for comparison).
PATHS = {
    "ucx-gpu": ("ucx", "device", "device"),
    "ucx-host": ("ucx", "host", "device"),
    "ucx-host-host": ("ucx", "host", "host"),
    "tcp": ("tcp", "host", "host"),
}
TARGETS_GBPS = {"ucx-gpu": 250.0, "ucx-host": 45.0, "tcp": 3.0}  # what a 16k-token prompt should reach on H200s


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def paged_cache(device: str, num_blocks: int, pattern: bool) -> PagedKV:
    layers = {}
    for i in range(LAYERS):
        t = torch.empty(num_blocks, 2, BLOCK, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
        flat = t.view(-1).view(torch.uint8)
        if pattern:  # a pattern the decoder can check, different per layer and block
            flat.copy_(((torch.arange(flat.numel(), device=device) + 7 * i) % 251).to(torch.uint8))
        else:
            flat.zero_()
        layers[f"model.layers.{i}.self_attn.attn"] = t
    return PagedKV(layers, num_blocks, BLOCK)


def prefiller(
    device: str, scheme: str, memory: str, tokens: int, chunk: int, busy: bool, ready: mp.Queue, stop: mp.Event
) -> None:
    num_blocks = tokens // BLOCK
    paged = paged_cache(device, num_blocks, pattern=True)
    allocate = paged.device_buffer if memory == "device" else paged.host_buffer
    per_chunk = chunk // BLOCK
    cuda = paged.device.type == "cuda"
    for _ in range(2):  # timed the second time: the allocators hand back the first time's buffers, as when serving
        pool = StagingPool(paged.nbytes(num_blocks) + (1 << 20), ttl_s=3600, allocate=allocate)
        if cuda:
            torch.cuda.synchronize(paged.device)
        t0 = time.perf_counter()
        for i in range(tokens // chunk):
            ids = list(range(i * per_chunk, (i + 1) * per_chunk))
            pool.stage("bench", key(i), per_chunk, paged.nbytes(per_chunk), lambda buf, ids=ids: paged.gather(ids, buf))
        if cuda:  # how long the engine's stream is held by the copies out, and when they are all done
            torch.cuda.current_stream(paged.device).synchronize()
        held = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize(paged.device)
        staged = time.perf_counter() - t0
    listener = transfer.listen(f"{scheme}://127.0.0.1:0", StagingService(pool, paged.describe(), layers=LAYERS))
    ready.put((listener.address, {"stream_held_ms": round(held * 1e3, 2), "staged_ms": round(staged * 1e3, 2)}))
    spinner = busy_engine() if busy else None
    stop.wait()
    if spinner is not None:
        spinner.stop()
    listener.close()


def busy_engine() -> Busy:
    """What a loaded vLLM engine thread is to the hand-off's threads: Python running without pause,
    handing over the GIL at the switch interval PDConnector sets."""
    sys.setswitchinterval(200e-6)
    return Busy()


class WireOnly(ChunkLoader):
    """A diagnostic: chunks received into the ring as the loader does, none scattered."""

    def _flush(self) -> None:
        self._queued = self.next


def pull(
    conns: transfer.ConnectionPool,
    address: str,
    paged: PagedKV,
    memory: str,
    tokens: int,
    chunk: int,
    window: int,
    per_frame: int,
    lanes: int,
    wire_only: bool,
    by_layer: bool = False,
    profile: bool = False,
) -> tuple[float, float | None]:
    """Seconds for the decoder to have every block of the prompt in place, pulled as PDConnector
    does, over the pool's connections (a decoder keeps its connections to a prefiller); and, by
    layer, seconds to the first layer in place."""
    keys = [key(i) for i in range(tokens // chunk)]
    block_ids = list(range(tokens // BLOCK))
    chunks = plan.plan_load(keys, tokens, 0, tokens, block_ids, chunk, BLOCK)
    job = LoadJob("bench", [address], chunks, 0, tokens, block_ids, layerwise=by_layer)
    on_device = memory == "device"
    profiler = cProfile.Profile() if profile else None
    first_layer = None
    if by_layer:
        layers = LayerwiseLoad(paged, job, on_device=on_device, window=window)
        with ThreadPoolExecutor(1) as executor:
            t0 = time.perf_counter()
            with profiler or contextlib.nullcontext():
                pulling = executor.submit(pull_layers, conns, address, layers)
                for i in range(LAYERS):  # as the forward pass's hooks wait
                    layers.wait(i)
                    if i == 0:
                        if paged.device.type == "cuda":
                            torch.cuda.synchronize(paged.device)
                        first_layer = time.perf_counter() - t0
                pulling.result()
    else:
        loader = (WireOnly if wire_only else ChunkLoader)(paged, job, on_device, window, per_frame)
        with ThreadPoolExecutor(max(1, lanes - 1)) as executor:
            t0 = time.perf_counter()
            with profiler or contextlib.nullcontext():
                load(conns, address, loader, lanes, executor)
    if paged.device.type == "cuda":
        torch.cuda.synchronize(paged.device)
    seconds = time.perf_counter() - t0
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    return seconds, first_layer


def check(paged: PagedKV) -> None:
    for i in (0, LAYERS // 2, LAYERS - 1):
        flat = paged.layers[i].view(-1).view(torch.uint8)
        want = ((torch.arange(flat.numel(), device=flat.device) + 7 * i) % 251).to(torch.uint8)
        if not torch.equal(flat, want):
            raise AssertionError(f"layer {i}: the decoder's cache differs from the prefiller's after the hand-off")


def floors(device: str, decode_device: str, nbytes: int) -> dict[str, float]:
    if not device.startswith("cuda"):
        return {"memcpy": round(memcpy_gbps(nbytes), 2)}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=device), torch.empty_like(host, device=decode_device)

    def timed(copy) -> float:
        copy()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            copy()
        torch.cuda.synchronize()
        return round(5 * nbytes / (time.perf_counter() - t0) / 1e9, 2)

    return {
        "pinned_to_gpu": timed(lambda: src.copy_(host, non_blocking=True)),
        "gpu_to_pinned": timed(lambda: host.copy_(src, non_blocking=True)),
        "gpu_to_gpu": timed(lambda: dst.copy_(src, non_blocking=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="prompt tokens handed off (default 16384 = 2 GiB)")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"some of {', '.join(PATHS)}")
    ap.add_argument("--rounds", type=int, default=3, help="hand-offs per path; the median is reported")
    ap.add_argument(
        "--window", type=int, default=16, help="chunks received at once over ucx (the connector's chunks_in_flight)"
    )
    ap.add_argument(
        "--per-frame",
        type=int,
        default=8,
        help="chunks asked for in one frame when received into GPU memory over ucx (the connector's chunks_per_frame)",
    )
    ap.add_argument("--lanes", type=int, default=0, help="connections per hand-off (default: 2 over tcp, 1 over ucx)")
    ap.add_argument("--wire-only", action="store_true", help="diagnostic: receive the chunks, scatter none")
    ap.add_argument(
        "--by-layer", action="store_true", help="the decoder loads layer by layer, as a `layerwise` one does"
    )
    ap.add_argument(
        "--profile", action="store_true", help="diagnostic: one more hand-off per path, the decoder under cProfile"
    )
    ap.add_argument(
        "--busy",
        action="store_true",
        help="a thread running Python without pause in both processes during the hand-offs (as their engine "
        "threads under load), Python's switch interval at the connector's 200 us",
    )
    ap.add_argument("--device", default="cuda", help="cuda (prefiller on GPU 0, decoder on GPU 1 if any) or cpu")
    ap.add_argument("--json", type=Path, default=Path("bench_handoff_gpu.json"))
    args = ap.parse_args()
    if args.by_layer and (args.wire_only or args.lanes > 1):
        ap.error("--by-layer pulls over one connection and places every layer: no --wire-only, no --lanes")
    if args.tokens % args.chunk_tokens or args.chunk_tokens % BLOCK:
        ap.error(f"--tokens must be a multiple of --chunk-tokens, itself a multiple of {BLOCK}")
    paths = [p for p in args.paths.split(",") if p]
    if unknown := [p for p in paths if p not in PATHS]:
        ap.error(f"unknown paths {unknown}: choose from {', '.join(PATHS)}")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: --device cpu runs the CPU paths")
    if not cuda:
        paths = [p for p in paths if PATHS[p][2] == "host"]
    prefill_dev = "cuda:0" if cuda else "cpu"
    decode_dev = f"cuda:{min(1, torch.cuda.device_count() - 1)}" if cuda else "cpu"

    nbytes = args.tokens * LAYERS * 2 * HEADS * HEAD_DIM * 2
    floor = floors(prefill_dev, decode_dev, nbytes)
    rows = []
    ctx = mp.get_context("spawn")
    for path in paths:
        scheme, staged, memory = PATHS[path]
        ready, stop = ctx.Queue(), ctx.Event()
        proc = ctx.Process(
            target=prefiller,
            args=(prefill_dev, scheme, staged, args.tokens, args.chunk_tokens, args.busy, ready, stop),
        )
        proc.start()
        try:
            address, staging = ready.get(timeout=600)
            paged = paged_cache(decode_dev, args.tokens // BLOCK, pattern=False)
            paged.warm_up()  # the Triton copies built, as the connector does at registration
            lanes = 1 if args.by_layer else args.lanes or (2 if scheme == "tcp" else 1)  # the connector's defaults
            window = args.window if scheme == "ucx" else 1
            per_frame = args.per_frame if scheme == "ucx" and memory == "device" else 1  # as the connector asks
            conns = transfer.ConnectionPool(lambda a: transfer.connect(a, io_timeout=120))
            with contextlib.ExitStack() as stack:  # the lanes' connections, made before any clock starts
                for _ in range(lanes):
                    stack.enter_context(conns.connection(address)).call("ping")
            # The first hand-off over a new connection pays for UCX's CUDA IPC set-up (tens of ms:
            # mapping each staging buffer); a decoder pays it once per prefiller and buffer.
            # Reported apart, not in the median.
            shape = (args.tokens, args.chunk_tokens, window, per_frame, lanes, args.wire_only, args.by_layer)
            spinner = busy_engine() if args.busy else None
            (first, _), *timed = [pull(conns, address, paged, memory, *shape) for _ in range(args.rounds + 1)]
            if spinner is not None:
                spinner.stop()
            seconds = [s for s, _ in timed]
            first_layer = [f for _, f in timed if f is not None]
            if args.profile:
                print(f"{path}: the decoder's side of one hand-off, under cProfile")
                pull(conns, address, paged, memory, *shape, profile=True)
            conns.close()
            if not args.wire_only:
                check(paged)
        finally:
            stop.set()
            proc.join(30)
        median = statistics.median(seconds)
        rows.append(
            {
                "path": path,
                "transport": scheme,
                "staged_in": staged,
                "received_in": memory,
                "bytes": nbytes,
                "first_seconds": round(first, 4),
                "seconds": [round(s, 4) for s in seconds],
                "lanes": lanes,
                "first_layer_ms": round(statistics.median(first_layer) * 1e3, 2) if first_layer else None,
                "staging": staging,  # the prefiller's copies out of its cache for this prompt
                "gb_per_s": round(nbytes / median / 1e9, 2),
                "target_gb_per_s": TARGETS_GBPS.get(path) if cuda else None,
            }
        )
        del paged

    print(
        f"Hand-off of {args.tokens} tokens ({nbytes / 2**30:.2f} GiB, {args.chunk_tokens}-token chunks), "
        f"{prefill_dev} -> {decode_dev}; floors (GB/s): {floor}"
    )
    heads = f"{'path':>13} {'lanes':>5} {'GB/s':>8} {'target':>7}  {'first':>7}  {'staging ms':>14}  {'layer 0 ms':>10}"
    print(f"{heads}  seconds")
    for r in rows:
        target = r["target_gb_per_s"]
        verdict = "" if target is None else ("  ok" if r["gb_per_s"] >= target else "  BELOW TARGET")
        rate, first = f"{r['gb_per_s']:>8.2f}", r["first_seconds"]
        staging = f"{r['staging']['stream_held_ms']}/{r['staging']['staged_ms']}"
        layer0 = r["first_layer_ms"] if r["first_layer_ms"] is not None else "-"
        cells = f"{r['path']:>13} {r['lanes']:>5} {rate} {target or '-':>7}  {first:>7}  {staging:>14}  {layer0:>10}"
        print(f"{cells}  {r['seconds']}{verdict}")
    print("staging ms: the prefiller's stream held by the copies out / until every chunk was staged")
    if args.by_layer:
        print("layer 0 ms: until the decoder's first layer was in place (loaded by layer), median")
    write_json(
        args.json,
        {
            "benchmark": "handoff_one_prompt",
            "tokens": args.tokens,
            "chunk_tokens": args.chunk_tokens,
            "window": args.window,
            "per_frame": args.per_frame,
            "ucx_progress": os.environ.get("PDRUN_UCX_PROGRESS", "auto"),
            "ucx_spin_us": os.environ.get("PDRUN_UCX_SPIN_US", "200"),
            "block_copy": os.environ.get("PDRUN_BLOCK_COPY", "auto"),
            "wire_only": args.wire_only,
            "by_layer": args.by_layer,
            "busy": args.busy,
            "prefill_device": prefill_dev,
            "decode_device": decode_dev,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "floors_gb_per_s": floor,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

"""Hand-off bandwidth over loopback: what a decoder pulling chunks from a prefiller gets, per transport.

The prefiller side is the real staging pool and service (pd.staging) in its own process; the
decoder side pulls chunks into a preallocated buffer as PDConnector does, over 1..N parallel
connections, with and without checksums, over tcp and (--transports tcp,ucx) ucx. The memcpy floor
(one copy of the same bytes in this process) is measured in the same run. Prints a table and
writes JSON.

With --busy, the pulls also run beside a thread busy in Python, as a decoder's run beside vLLM's
engine thread in its worker process, at each of --switch-us (Python's switch interval: how long the
busy thread may keep the GIL from a pulling thread that waits for it; pdrun's worker sets 200, Python's
own default is 5000). The busy thread's pace during the pulls, against its pace alone, is what the
pulls cost it.

    python examples/benchmarks/bench_tcp.py                       # 8B shape: 128 KiB/token, 256-token chunks
    python examples/benchmarks/bench_tcp.py --streams 1,2,4 --transports tcp,ucx --json out.json
    python examples/benchmarks/bench_tcp.py --transports ucx --streams 1 --busy --switch-us 5000,1000,200,50
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LLAMA_8B_BYTES_PER_TOKEN, Busy, busy_pace, memcpy_gbps, write_json

from pdrun import transfer
from pdrun.pd.staging import StagingPool, StagingService


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def serve(scheme: str, chunks: int, nbytes: int, checksums: bool, ready: mp.Queue, stop: mp.Event) -> None:
    pool = StagingPool(budget_bytes=chunks * nbytes, ttl_s=3600)
    g = torch.Generator().manual_seed(0)

    def fill(buf: torch.Tensor) -> None:  # done at once: nothing to wait for
        buf.copy_(torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8))

    for i in range(chunks):
        pool.stage("bench", key(i), 1, nbytes, fill)
    listener = transfer.listen(f"{scheme}://127.0.0.1:0", StagingService(pool, "bench"), checksums=checksums)
    ready.put(listener.address)
    stop.wait()
    listener.close()


def pull(
    address: str, keys: list[bytes], nbytes: int, checksums: bool, streams: int, rounds: int, busy: bool = False
) -> tuple[float, float | None]:
    """Seconds to pull every key `rounds` times over `streams` connections, and (`busy`) the loops per
    ms a busy thread beside the pulls got done meanwhile."""
    conns = [transfer.connect(address, checksums=checksums) for _ in range(streams)]
    bufs = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(streams)]
    parts = [keys[i::streams] for i in range(streams)]

    def worker(i: int) -> None:
        view = bufs[i].numpy()
        for _ in range(rounds):
            for _frame in conns[i].stream("get", meta={"keys": [k.hex() for k in parts[i]]}, sink=lambda h: view):
                pass

    worker(0)  # warm up: connections, page faults
    spinner = Busy() if busy else None
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    t0, loops = time.perf_counter(), spinner.loops if spinner else 0
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    pace = None
    if spinner is not None:
        pace = (spinner.loops - loops) / elapsed / 1e3
        spinner.stop()
    for c in conns:
        c.close()
    return elapsed, pace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--bytes-per-token", type=int, default=LLAMA_8B_BYTES_PER_TOKEN)
    ap.add_argument("--chunks", type=int, default=16, help="distinct chunks staged (default 16 = 512 MiB)")
    ap.add_argument("--rounds", type=int, default=3, help="times each chunk is pulled per measurement")
    ap.add_argument("--streams", default="1,2,4", help="parallel connections to try")
    ap.add_argument("--transports", default="tcp", help="tcp, ucx or both: tcp,ucx")
    ap.add_argument("--busy", action="store_true", help="also pull beside a thread busy in Python")
    ap.add_argument("--switch-us", default="5000", help="Python switch intervals to try, microseconds")
    ap.add_argument("--json", type=Path, default=Path("bench_tcp.json"))
    args = ap.parse_args()

    nbytes = args.chunk_tokens * args.bytes_per_token
    keys = [key(i) for i in range(args.chunks)]
    floor = memcpy_gbps(nbytes)
    alone = busy_pace() if args.busy else None
    rows = []
    ctx = mp.get_context("spawn")
    for scheme, checksums in ((t, c) for t in args.transports.split(",") for c in (True, False)):
        ready, stop = ctx.Queue(), ctx.Event()
        server = ctx.Process(target=serve, args=(scheme, args.chunks, nbytes, checksums, ready, stop), daemon=True)
        server.start()
        address = ready.get(timeout=120)
        try:
            cases = [
                (int(streams), int(us), busy)
                for streams in args.streams.split(",")
                for us in args.switch_us.split(",")
                for busy in ((False, True) if args.busy else (False,))
            ]
            for streams, us, busy in cases:
                sys.setswitchinterval(us * 1e-6)
                seconds, pace = pull(address, keys, nbytes, checksums, streams, args.rounds, busy)
                moved = nbytes * args.chunks * args.rounds
                rows.append(
                    {
                        "transport": scheme,
                        "checksums": checksums,
                        "streams": streams,
                        "switch_us": us,
                        "busy": busy,
                        "busy_pace": round(pace / alone, 3) if pace is not None and alone else None,
                        "chunk_bytes": nbytes,
                        "bytes": moved,
                        "seconds": round(seconds, 4),
                        "gb_per_s": round(moved / seconds / 1e9, 3),
                        "ms_per_chunk": round(seconds / (args.chunks * args.rounds) * 1e3 * streams, 2),
                    }
                )
        finally:
            stop.set()
            server.join(10)

    print(
        f"Loopback hand-off, {args.chunk_tokens}-token chunks x {args.bytes_per_token // 1024} KiB/token "
        f"= {nbytes / 2**20:.0f} MiB per chunk; memcpy floor {floor:.2f} GB/s"
    )
    print(
        f"{'transport':>9} {'checksums':>9} {'streams':>7} {'switch us':>9} {'busy':>5} {'GB/s':>7} "
        f"{'ms/chunk':>9} {'x memcpy':>9} {'busy pace':>9}"
    )
    for r in rows:
        pace = "" if r["busy_pace"] is None else f"{r['busy_pace']:.2f}"
        print(
            f"{r['transport']:>9} {r['checksums']!s:>9} {r['streams']:>7} {r['switch_us']:>9} {r['busy']!s:>5} "
            f"{r['gb_per_s']:>7.2f} {r['ms_per_chunk']:>9.1f} {r['gb_per_s'] / floor:>9.2f} {pace:>9}"
        )
    result = {
        "benchmark": "loopback_handoff",
        "chunk_tokens": args.chunk_tokens,
        "bytes_per_token": args.bytes_per_token,
        "memcpy_gb_per_s": round(floor, 3),
        "rows": rows,
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()

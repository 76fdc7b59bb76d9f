"""Cache tier bandwidth: put and get of 256-token 8B-shape chunks (32 MiB), next to their floors.

Measured in one run, on the same chunks:
  floors       memcpy (one host copy), disk write (write + fsync a file), disk read (read a file
               whose pages were dropped from the page cache)
  tiers        MemoryTier (steady state: buffers reused) and DiskTier in this process: what the
               store itself costs
  server       a real `pdrun cache-server` process, through CacheClient over TCP loopback (with
               checksums) as a connector uses it: the memory tier, warm; then the disk tier after
               a restart of the server (memory empty, page cache dropped): every get reads the disk
Page cache pages are dropped with posix_fadvise(DONTNEED) on each file (no root needed). Prints a
table and writes JSON.

    python examples/benchmarks/bench_cache.py                   # 16 chunks (512 MiB) under /tmp
    python examples/benchmarks/bench_cache.py --dir /mnt/nvme/bench --chunks 32 --json out.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LLAMA_8B_BYTES_PER_TOKEN, memcpy_gbps, write_json

from pdrun.storage.client import CacheClient
from pdrun.storage.tiers import DiskTier, MemoryTier

ROOT = Path(__file__).resolve().parents[2]


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def drop_page_cache(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_floors(directory: Path, chunks: list[torch.Tensor]) -> tuple[float, float]:
    """Seconds to write + fsync every chunk as a file, and to read them back cold."""
    directory.mkdir(parents=True)
    paths = [directory / f"{i}.bin" for i in range(len(chunks))]

    def write() -> None:
        for path, c in zip(paths, chunks, strict=True):
            with open(path, "wb") as f:
                f.write(memoryview(c.numpy()))
                f.flush()
                os.fsync(f.fileno())

    written = timed(write)
    drop_page_cache(directory)
    buf = bytearray(chunks[0].numel())

    def read() -> None:
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                f.readinto(buf)

    read_s = timed(read)
    shutil.rmtree(directory)
    return written, read_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`pdrun cache-server` as a user starts it."""

    def __init__(self, cpu_gb: float, directory: Path | None):
        self.port, self.metrics_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "pdrun.launch", "cache-server", "--listen", f"tcp://127.0.0.1:{self.port}"]
        cmd += ["--cpu-gb", str(cpu_gb), "--metrics-port", str(self.metrics_port)]
        if directory is not None:
            cmd += ["--dir", str(directory), "--disk-gb", "1000"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the cache server did not start") from None
                time.sleep(0.2)
        self.client = CacheClient(f"tcp://127.0.0.1:{self.port}")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()  # flushes the disk tier's pending writes, then exits
        self.proc.wait(timeout=120)


def client_put(client: CacheClient, chunks: list[torch.Tensor]) -> None:
    for i, c in enumerate(chunks):
        if not client.put(key(i), memoryview(c.numpy()), {"blocks": 16}):
            raise RuntimeError(f"the cache refused chunk {i}")


def client_get(client: CacheClient, n: int, nbytes: int) -> None:
    view = torch.empty(nbytes, dtype=torch.uint8).numpy()
    got = client.fetch([key(i) for i in range(n)], lambda header, payload: None, lambda header: view)
    if got != n:
        raise RuntimeError(f"the cache served {got} of {n} chunks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--bytes-per-token", type=int, default=LLAMA_8B_BYTES_PER_TOKEN)
    ap.add_argument("--chunks", type=int, default=16, help="chunks per measurement (default 16 = 512 MiB)")
    ap.add_argument("--dir", type=Path, default=None, help="where the disk measurements write (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=Path("bench_cache.json"))
    args = ap.parse_args()

    nbytes = args.chunk_tokens * args.bytes_per_token
    n = args.chunks
    total = nbytes * n
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8) for _ in range(n)]
    work = Path(tempfile.mkdtemp(prefix="pdrun-bench-", dir=args.dir))
    seconds: dict[str, float] = {}
    try:
        print(f"{n} chunks of {nbytes / 2**20:.0f} MiB; disk measurements under {work}", flush=True)
        memcpy = memcpy_gbps(nbytes)
        seconds["floor disk write"], seconds["floor disk read"] = disk_floors(work / "floor", chunks)

        # Steady state, as in a server that has run a while: puts reuse evicted or replaced buffers,
        # gets copy into the caller's reused buffer (what the server does per connection).
        mem = MemoryTier(total + nbytes)
        for i, c in enumerate(chunks):
            mem.put(key(i), c.numpy())
        seconds["tier memory put"] = timed(lambda: [mem.put(key(i), c.numpy()) for i, c in enumerate(chunks)])
        out = bytearray(nbytes)
        seconds["tier memory get"] = timed(lambda: [mem.get(key(i), lambda _n: out) for i in range(n)])
        disk = DiskTier(work / "tier", total * 2)
        seconds["tier disk put"] = timed(lambda: [disk.put(key(i), c.numpy()) for i, c in enumerate(chunks)])
        drop_page_cache(work / "tier")
        seconds["tier disk get"] = timed(lambda: [disk.get(key(i)) for i in range(n)])

        server = ServerProcess(cpu_gb=(total + nbytes) / 2**30 + 0.01, directory=None)
        try:
            client_put(server.client, chunks)  # warm: connections, the server's buffers
            seconds["server memory put"] = timed(lambda: client_put(server.client, chunks))
            seconds["server memory get"] = timed(lambda: client_get(server.client, n, nbytes))
        finally:
            server.stop()
        server = ServerProcess(cpu_gb=(total + nbytes) / 2**30 + 0.01, directory=work / "server")
        try:
            client_put(server.client, chunks)  # written behind to disk; the stop below waits for it
        finally:
            server.stop()
        drop_page_cache(work / "server")
        server = ServerProcess(cpu_gb=(total + nbytes) / 2**30 + 0.01, directory=work / "server")
        try:
            seconds["server disk get"] = timed(lambda: client_get(server.client, n, nbytes))
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    floors = {"memory": memcpy, "write": total / seconds["floor disk write"] / 1e9}
    floors["read"] = total / seconds["floor disk read"] / 1e9
    floor_of = {
        "floor disk write": "write",
        "floor disk read": "read",
        "tier memory put": "memory",
        "tier memory get": "memory",
        "tier disk put": "write",
        "tier disk get": "read",
        "server memory put": "memory",
        "server memory get": "memory",
        "server disk get": "read",
    }
    rows = []
    for name, s in seconds.items():
        gbps = total / s / 1e9
        floor = floors[floor_of[name]]
        rows.append(
            {
                "what": name,
                "gb_per_s": round(gbps, 3),
                "ms_per_chunk": round(s / n * 1e3, 2),
                "floor": f"{'memcpy' if floor_of[name] == 'memory' else 'disk ' + floor_of[name]}",
                "x_floor": round(gbps / floor, 3),
            }
        )
    print(f"memcpy floor {memcpy:.2f} GB/s")
    print(f"{'':<18} {'GB/s':>7} {'ms/chunk':>9}  {'x floor':>7} (floor)")
    for r in rows:
        print(f"{r['what']:<18} {r['gb_per_s']:>7.2f} {r['ms_per_chunk']:>9.1f}  {r['x_floor']:>7.2f} ({r['floor']})")
    write_json(
        args.json,
        {
            "benchmark": "cache_tier",
            "chunk_tokens": args.chunk_tokens,
            "bytes_per_token": args.bytes_per_token,
            "chunks": n,
            "memcpy_gb_per_s": round(memcpy, 3),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

"""`pdrun profile transfer`: latency and bandwidth of one KV chunk pulled over a transport, per size.

A peer (`pdrun profile peer`, a process of its own) holds a buffer and answers "get" with the
first `nbytes` of it, in one frame, as a prefiller's endpoint answers a decoder. The profiler pulls
chunks of each size into a preallocated buffer, in turn, and times each pull end to end (request
sent to the last byte in place, checksum verified, and with `--memory cuda` the copy to or from the
GPU when the transport stages through host memory).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pdrun import transfer
from pdrun.transfer import Frame, Header, Service

MEMORY_KINDS = ("host", "cuda")
PEER_READY = "pdrun profile peer listening on "
LLAMA_8B_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head dim x bf16


class ProfileError(Exception):
    """Bad input or a peer that cannot be used: the message says which."""


def bytes_per_token(config_path: Path) -> int:
    """KV bytes per token of a Hugging Face model: a config.json, or a directory holding one."""
    path = config_path / "config.json" if config_path.is_dir() else config_path
    try:
        cfg = json.loads(path.read_text())
        layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads", heads)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProfileError(f"--model {config_path}: not a readable model config ({type(e).__name__}: {e})") from None
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    size = 4 if "32" in dtype else 2
    return int(layers) * 2 * int(kv_heads) * int(head_dim) * size


def _check_memory(memory: str) -> torch.device:
    if memory not in MEMORY_KINDS:
        raise ProfileError(f"--memory {memory!r}: must be one of {', '.join(MEMORY_KINDS)}")
    if memory == "cuda" and not torch.cuda.is_available():
        raise ProfileError("--memory cuda needs a CUDA GPU, and torch sees none here")
    return torch.device("cuda" if memory == "cuda" else "cpu")


class _Staged:
    """A buffer in the asked memory and, where the transport moves host bytes only, its pinned host
    twin that the payload goes through."""

    def __init__(self, scheme: str, memory: str, nbytes: int):
        device = _check_memory(memory)
        self.data = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.staged = device.type == "cuda" and scheme != "ucx"  # pdrun's tcp moves host bytes
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True) if self.staged else None

    def payload(self, nbytes: int) -> Any:
        """What to send: the device bytes copied out first if staged."""
        if self.host is None:
            return _view(self.data[:nbytes])
        self.host[:nbytes].copy_(self.data[:nbytes])
        return memoryview(self.host[:nbytes].numpy())

    def sink(self, nbytes: int) -> Any:
        return memoryview(self.host[:nbytes].numpy()) if self.host is not None else _view(self.data[:nbytes])

    def landed(self, nbytes: int) -> None:
        """The payload is in the sink: move it to the device and wait for every copy to finish."""
        if self.host is not None:
            self.data[:nbytes].copy_(self.host[:nbytes], non_blocking=True)
        if self.data.is_cuda:
            torch.cuda.synchronize()


def _view(t: torch.Tensor) -> Any:
    return t if t.is_cuda else memoryview(t.numpy())


class ProbeService(Service):
    """Answers "get" {"nbytes": N} with N bytes in one frame; "ping" with the buffer's size and memory."""

    def __init__(self, buffer: _Staged, memory: str):
        self.buffer = buffer
        self.memory = memory
        self.max_bytes = buffer.data.numel()

    def receive_buffer(self, header: Header) -> Any:
        raise ValueError("requests to a profile peer carry no payload")

    def handle(self, request: Header, payload: Any) -> Iterator[Frame]:
        if request.op == "ping":
            return {"max_bytes": self.max_bytes, "memory": self.memory}
        if request.op != "get":
            raise ValueError(f"unknown op {request.op!r} (a profile peer serves get and ping)")
        n = request.meta.get("nbytes")
        if not isinstance(n, int) or not 0 < n <= self.max_bytes:
            raise ValueError(f"'nbytes' must be an integer in 1..{self.max_bytes}, got {n!r}")
        yield Frame(Header(op="chunk"), self.buffer.payload(n))
        return {}


def run_peer(listen: str, memory: str, max_bytes: int, announce: Callable[[str], None]) -> None:
    """Serve until interrupted; `announce` gets the bound address."""
    scheme = listen.split("://", 1)[0]
    service = ProbeService(_Staged(scheme, memory, max_bytes), memory)
    with transfer.listen(listen, service) as listener:
        announce(listener.address)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@dataclass
class Point:
    transport: str
    memory: str
    chunk_tokens: int
    chunk_bytes: int
    iterations: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    gb_per_s: float  # chunk bytes over the median pull


class LoopbackPeer:
    """`pdrun profile peer` in a child process on 127.0.0.1, for one transport and memory kind."""

    def __init__(self, scheme: str, memory: str, max_bytes: int):
        cmd = [sys.executable, "-m", "pdrun.launch", "profile", "peer", "--listen", f"{scheme}://127.0.0.1:0"]
        cmd += ["--memory", memory, "--max-bytes", str(max_bytes)]
        self.errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.errors, text=True)
        assert self.proc.stdout is not None
        said = []  # UCX may print warnings first
        while (line := self.proc.stdout.readline()) and not line.startswith(PEER_READY):
            said.append(line)
        if not line:
            self._stop()
            self.errors.seek(0)
            why = ("".join(said) + self.errors.read()).strip()[-2000:]
            self.errors.close()
            raise ProfileError(f"the {scheme} peer did not start: {why}")
        self.address = line[len(PEER_READY) :].strip()

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def close(self) -> None:
        self._stop()
        self.errors.close()

    def __enter__(self) -> LoopbackPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_iterations(nbytes: int) -> int:
    """About 1 GiB per size, between 10 and 200 pulls."""
    return max(10, min(200, (1 << 30) // nbytes))


def measure(
    address: str, memory: str, sizes: list[tuple[int, int]], iterations: int | None, on_point: Callable[[Point], None]
) -> None:
    """Pull each (tokens, nbytes) size `iterations` times from the peer at `address`."""
    scheme = address.split("://", 1)[0]
    biggest = max(n for _, n in sizes)
    with transfer.connect(address) as conn:
        peer = conn.call("ping").meta
        if peer.get("max_bytes", 0) < biggest:
            raise ProfileError(f"the peer at {address} holds {peer.get('max_bytes')} bytes, {biggest} are asked")
        buf = _Staged(scheme, memory, biggest)
        for tokens, nbytes in sizes:
            reps = iterations or default_iterations(nbytes)
            times = []
            for i in range(reps + 2):  # 2 warm-up pulls: connection, page faults, allocator
                t0 = time.perf_counter()
                for _frame in conn.stream("get", meta={"nbytes": nbytes}, sink=lambda h, n=nbytes: buf.sink(n)):
                    pass
                buf.landed(nbytes)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            times.sort()
            p50 = statistics.median(times)
            on_point(
                Point(
                    transport=scheme,
                    memory=memory,
                    chunk_tokens=tokens,
                    chunk_bytes=nbytes,
                    iterations=reps,
                    p50_ms=round(p50 * 1e3, 4),
                    p99_ms=round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3, 4),
                    mean_ms=round(statistics.fmean(times) * 1e3, 4),
                    gb_per_s=round(nbytes / p50 / 1e9, 4),
                )
            )


def result_json(points: list[Point], bytes_per_token: int, command: str) -> dict[str, Any]:
    return {
        "profile": "transfer",
        "command": command,
        "bytes_per_token": bytes_per_token,
        "host": {"cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "points": [asdict(p) for p in points],
    }


def check_plot() -> None:
    """Fail before measuring, not after, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ProfileError("--plot needs matplotlib: pip install 'pdrun[plot]'") from None


def plot(points: list[Point], path: Path) -> None:
    """Latency and bandwidth against chunk size, one line per transport and memory kind."""
    check_plot()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, bw) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, ((transport, memory), line) in enumerate(_lines(points).items()):
        x = [p.chunk_tokens for p in line]
        label, color = f"{transport} / {memory}", f"C{i}"
        lat.plot(x, [p.p50_ms for p in line], marker="o", color=color, label=f"{label} p50")
        lat.plot(x, [p.p99_ms for p in line], marker="x", linestyle="--", color=color, label=f"{label} p99")
        bw.plot(x, [p.gb_per_s for p in line], marker="o", color=color, label=label)
    sizes = sorted({p.chunk_tokens for p in points})
    for ax, ylabel, title in (
        (lat, "latency per chunk (ms)", "Pull latency"),
        (bw, "GB/s (chunk / median pull)", "Bandwidth"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(t) for t in sizes])
        ax.minorticks_off()
        ax.set_xlabel(f"chunk size (tokens, {points[0].chunk_bytes // points[0].chunk_tokens:,} bytes each)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    lat.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lines(points: list[Point]) -> dict[tuple[str, str], list[Point]]:
    lines: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        lines.setdefault((p.transport, p.memory), []).append(p)
    return {k: sorted(v, key=lambda p: p.chunk_tokens) for k, v in lines.items()}

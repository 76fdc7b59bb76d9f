"""What every benchmark here shares: the 8B chunk shape, the memcpy floor, the machine, the JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

LLAMA_8B_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head dim x bf16 = 128 KiB


def memcpy_gbps(nbytes: int, reps: int = 10) -> float:
    """One host copy of `nbytes`: the floor any move of the same bytes is compared with."""
    src, dst = torch.randint(0, 256, (nbytes,), dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    result = {**result, "command": " ".join(sys.argv), "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


class Busy:
    """A thread running Python without pause (as an engine thread between its GPU waits): loops done."""

    def __init__(self) -> None:
        self.loops = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for i in range(1000):
                total += i
            self.loops += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def busy_pace(seconds: float = 0.5) -> float:
    """A busy thread's loops per ms with nothing beside it."""
    busy = Busy()
    time.sleep(0.05)
    start, t0 = busy.loops, time.perf_counter()
    time.sleep(seconds)
    pace = (busy.loops - start) / (time.perf_counter() - t0) / 1e3
    busy.stop()
    return pace

"""Writing chunks behind to the cache tier, off the forward pass.

The engine thread only hands over a host copy of a chunk; a thread here puts it to the cache
server. The queue is bounded in bytes: when the cache cannot keep up, new chunks are dropped and
counted, never waited for. The cache is an optimisation; the forward pass is not to be slowed by it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from pdrun.pd.codec import Ready
from pdrun.storage.client import CacheClient

log = logging.getLogger(__name__)

# (bytes, seconds, stored) of one finished put
OnStored = Callable[[int, float, bool], None]


class WriteBehind:
    def __init__(self, client: CacheClient, max_bytes: int, on_stored: OnStored):
        self.client = client
        self.max_bytes = max_bytes
        self._on_stored = on_stored
        self._queue: queue.Queue[tuple[bytes, torch.Tensor, dict[str, Any], Ready | None] | None] = queue.Queue()
        self._pending = 0  # bytes queued or being written
        self._cond = threading.Condition()
        self._warned_full = False
        self._thread = threading.Thread(target=self._run, name="pdrun-write-behind", daemon=True)
        self._thread.start()

    def submit(self, key: bytes, chunk: torch.Tensor, meta: dict[str, Any], ready: Ready | None = None) -> bool:
        """Queue `chunk` (a flat uint8 host tensor nobody writes to any more, once `ready` is done)
        for the cache; False when the queue is full and it was dropped."""
        nbytes = chunk.numel()
        with self._cond:
            if self._pending + nbytes > self.max_bytes:
                if not self._warned_full:
                    self._warned_full = True
                    log.warning(
                        "cache write-behind queue full (%d bytes): dropping chunks until the cache %s catches up",
                        self.max_bytes,
                        self.client.address,
                    )
                return False
            self._pending += nbytes
        self._queue.put((key, chunk, meta, ready))
        return True

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            key, chunk, meta, ready = item
            t0 = time.perf_counter()
            try:
                if ready is not None:
                    ready.synchronize()
                stored = self.client.put(key, memoryview(chunk.numpy()), meta)
            except Exception:  # never let one bad chunk stop the writer
                log.exception("write-behind of chunk %s failed", key.hex())
                stored = False
            self._on_stored(chunk.numel(), time.perf_counter() - t0, stored)
            with self._cond:
                self._pending -= chunk.numel()
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written (or dropped); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        self.client.close()

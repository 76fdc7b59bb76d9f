"""What an instance measures as it runs to decide what to load from the cache tier's disk."""

from __future__ import annotations

import time
from typing import Any


class Rates:
    """What this instance measures as it runs, to load from disk only what pays: its prefill rate
    (tokens of the steps that computed at least a chunk, over the time to the next step) and its
    disk loads' rate (tokens over seconds, as its workers report them)."""

    ALPHA = 0.2  # weight of the newest sample
    PROBE_CHUNKS = 2  # read from disk while its rate is not known yet

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.prefill: float | None = None  # tokens/s
        self.disk: float | None = None
        self._last: tuple[float, int] | None = None

    @classmethod
    def _mix(cls, old: float | None, sample: float) -> float:
        return sample if old is None else (1 - cls.ALPHA) * old + cls.ALPHA * sample

    def step(self, tokens: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            then, computed = self._last
            if computed >= self.chunk_size and 0 < now - then < 2.0:  # not an idle gap
                self.prefill = self._mix(self.prefill, computed / (now - then))
        self._last = (now, tokens)

    def disk_read(self, stats: dict[str, Any]) -> None:
        tokens, seconds = stats.get("cache_disk_loaded_tokens", 0), stats.get("cache_disk_load_seconds", 0.0)
        if tokens and seconds > 0:
            self.disk = self._mix(self.disk, tokens / seconds)

    def disk_chunks(self, on_disk: int) -> int:
        """How many of `on_disk` chunks to read: all where that pays, none where it does not, a
        few while the disk is not measured, none before this instance has prefilled anything (the
        first requests after a restart are computed, not spent measuring the disk)."""
        if self.prefill is None:
            return 0
        pays = self.disk_pays()
        if pays is None:
            return min(on_disk, self.PROBE_CHUNKS)
        return on_disk if pays else 0

    def disk_pays(self) -> bool | None:
        """Whether reading from disk beats computing; None until both are measured."""
        if self.disk is None or self.prefill is None:
            return None
        return self.disk > self.prefill

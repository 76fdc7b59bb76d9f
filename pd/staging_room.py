"""A prefiller's scheduler keeps its staging pool from overflowing: a prefill whose hand-off would
not fit beside the hand-offs decoders are yet to pull waits in vLLM's queue (nothing computed,
nothing evicted) until decoders release enough; the oldest waiting prefill goes first.

Room is counted in chunks: the workers report how many the pool holds and every hand-off they let
go (released by its decoder, expired, or dropped). A hand-off no decoder pulled within `wait_s` of
its prefill finishing stops holding room (its decoder is late or gone: the pool evicts it if a newer
one needs the space, as it would without this). A prefill larger than the pool runs alone.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class _Held:
    chunks: int
    handed_at: float | None = None  # when its prefill finished and a decoder was told to pull it


class StagingRoom:
    def __init__(self, workers: int, wait_s: float, clock: Callable[[], float] = time.monotonic):
        self.capacity: int | None = None  # chunks the pool holds (the smallest rank's), once a worker said
        self.workers = workers  # every TP rank stages its share of each chunk and reports its release
        self.wait_s = wait_s
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._released: Counter[str] = Counter()  # ranks that let a hand-off go, until all have
        self._waiting: set[str] = set()  # prefills held back, counted once each
        self._closed = False  # a prefill waits in this scheduling pass: those behind it wait too
        self.deferred = 0  # prefills held back since `take_deferred`

    def admit(self, rid: str, chunks: int) -> bool:
        """Whether prefill `rid`, whose hand-off stages `chunks` chunks, may run now (its room is
        then held until its hand-off is let go); False: it waits for decoders to release room."""
        if rid in self._held:
            return True
        if not self._closed and self._fits(chunks):
            self._held[rid] = _Held(chunks)
            self._waiting.discard(rid)
            return True
        self._closed = True
        if rid not in self._waiting:
            self._waiting.add(rid)
            self.deferred += 1
        return False

    def _fits(self, chunks: int) -> bool:
        if self.capacity is None:
            return True
        now = self._clock()
        used = sum(h.chunks for h in self._held.values() if h.handed_at is None or now - h.handed_at < self.wait_s)
        return used == 0 or used + chunks <= self.capacity

    def new_pass(self) -> None:
        """A scheduling pass is over: the next one tries the waiting prefills again, oldest first."""
        self._closed = False

    def handed(self, rid: str) -> None:
        """`rid`'s prefill finished: a decoder is told to pull its hand-off."""
        held = self._held.get(rid)
        if held is not None:
            held.handed_at = self._clock()

    def forget(self, rid: str) -> None:
        """`rid` will stage nothing more and no decoder will pull it (aborted, or answered whole), or
        waited and left."""
        self._held.pop(rid, None)
        self._waiting.discard(rid)

    def reported(self, capacity: int | None, released: Iterable[str]) -> None:
        """What the workers said this step: the pool's room in chunks, the hand-offs they let go."""
        if capacity:
            self.capacity = capacity
        for rid in released:
            self._released[rid] += 1
            if self._released[rid] >= self.workers:
                del self._released[rid]
                self._held.pop(rid, None)

    def take_deferred(self) -> int:
        deferred, self.deferred = self.deferred, 0
        return deferred

    def __len__(self) -> int:
        return len(self._held)

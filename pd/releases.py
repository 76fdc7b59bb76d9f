"""A decoder's releases: telling a prefiller that the hand-off it staged has been pulled (or will
not be), so that its staging pool frees the chunks now rather than at their TTL."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

RETRY_S = 2.0  # a release its prefiller did not take (frozen, restarting) is sent again this often,
GIVE_UP_S = 120.0  # for this long; then the prefiller's staging TTL frees the hand-off


class Releaser:
    """Sends releases on a thread of its own, so that a prefiller that does not answer never holds
    up a load. One that is not taken is sent again every RETRY_S for GIVE_UP_S; meanwhile the
    others for the same prefiller wait with it instead of each waiting out a timeout."""

    def __init__(self, send: Callable[[str, str], None]):
        self._send = send  # (address, transfer id); raises if the prefiller did not take it
        self._queue: list[tuple[float, int, str, str, float | None]] = []  # (due, n, address, transfer, first try)
        self._order = itertools.count()
        self._failing: dict[str, float] = {}  # address -> when to try it again
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pdrun-release", daemon=True)
        self._thread.start()

    def release(self, address: str, transfer_id: str) -> None:
        self._push(time.monotonic(), address, transfer_id, None)

    def pending(self) -> int:
        """Releases not yet taken: queued, or waiting to be sent again."""
        with self._cv:
            return len(self._queue)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _push(self, due: float, address: str, transfer_id: str, first_try: float | None) -> None:
        with self._cv:
            heapq.heappush(self._queue, (due, next(self._order), address, transfer_id, first_try))
            self._cv.notify()

    def _next(self) -> tuple[str, str, float | None] | None:
        """The next release due, once it is; None once closed."""
        with self._cv:
            while not self._closed:
                now = time.monotonic()
                if self._queue and self._queue[0][0] <= now:
                    _, _, address, transfer_id, first_try = heapq.heappop(self._queue)
                    return address, transfer_id, first_try
                self._cv.wait(self._queue[0][0] - now if self._queue else None)
            return None

    def _run(self) -> None:
        while (item := self._next()) is not None:
            address, transfer_id, first_try = item
            now = time.monotonic()
            if now < self._failing.get(address, 0.0):  # that prefiller did not answer lately
                self._push(self._failing[address], address, transfer_id, first_try)
                continue
            try:
                self._send(address, transfer_id)
                self._failing.pop(address, None)
            except Exception as e:
                first_try = now if first_try is None else first_try
                if now - first_try < GIVE_UP_S:
                    log.debug("release of %s at %s failed (%s); trying again", transfer_id, address, e)
                    self._failing[address] = now + RETRY_S
                    self._push(now + RETRY_S, address, transfer_id, first_try)
                else:
                    log.info("release of hand-off %s failed (%s); the prefiller's TTL frees it", transfer_id, e)

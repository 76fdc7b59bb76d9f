"""The cache server's client, for connectors: pooled connections, every failure a miss.

A cache that is down, slow or broken must never fail a request: lookups then report 0, gets stop
at the first chunk that did not arrive whole and verified, puts are dropped, each logged once per
reason so a dead cache does not flood the log. After a failure the cache is skipped for
`retry_after_s` (every call a miss at once), so a cache that hangs costs one timeout, not one per
request: lookups run on vLLM's scheduler thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pdrun import transfer
from pdrun.transfer import ConnectionPool, TransferError
from pdrun.transfer.wire import Header

log = logging.getLogger("pdrun.storage")


class CacheClient:
    def __init__(
        self,
        address: str,
        connect: Callable[[str], transfer.Connection] | None = None,
        retry_after_s: float = 0.0,
    ):
        self.address = address
        self.pool = ConnectionPool(connect or transfer.connect)
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, e: Exception) -> None:
        reason = f"{what}: {type(e).__name__}"
        with self._lock:
            self._down_until = time.monotonic() + self.retry_after_s
            first = reason not in self._warned
            self._warned.add(reason)
        if first:
            skip = f"; skipping it for {self.retry_after_s:g} s after each failure" if self.retry_after_s else ""
            log.warning("cache %s %s failed, treating it as a miss%s: %s", self.address, what, skip, e)

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading `keys` the cache holds (0 when it cannot say)."""
        if not keys or not self._available():
            return 0
        try:
            with self.pool.connection(self.address) as conn:
                return int(conn.call("lookup", meta={"keys": [k.hex() for k in keys]}).meta.get("count", 0))
        except (TransferError, OSError) as e:
            self._failed("lookup", e)
            return 0

    def fetch(
        self,
        keys: Sequence[bytes],
        each: Callable[[Header, Any], None],
        sink: Callable[[Header], Any] | None = None,
    ) -> int:
        """Stream the leading chunks the cache has: `each(header, payload)` for every one that
        arrived whole and checksum-verified (in the buffer `sink(header)` gave), in order. Returns
        how many; a transport failure ends the run early. What `each` raises propagates."""
        if not keys or not self._available():
            return 0
        n = 0
        try:
            with self.pool.connection(self.address) as conn:
                for frame in conn.stream("get", meta={"keys": [k.hex() for k in keys]}, sink=sink):
                    if n >= len(keys) or frame.header.key != keys[n]:
                        raise transfer.ProtocolError("the cache answered with another chunk than asked")
                    each(frame.header, frame.payload)
                    n += 1
        except (TransferError, OSError) as e:
            self._failed("get", e)
        return n

    def get(
        self, keys: Sequence[bytes], sink: Callable[[Header], Any] | None = None
    ) -> list[tuple[bytes, Any, dict[str, Any]]]:
        """The leading chunks the cache has, as (key, payload, meta), each whole and checksum-verified."""
        got: list[tuple[bytes, Any, dict[str, Any]]] = []
        self.fetch(keys, lambda h, payload: got.append((h.key, payload, dict(h.meta))), sink)
        return got

    def put(self, key: bytes, data: Any, meta: dict[str, Any] | None = None) -> bool:
        if not self._available():
            return False
        try:
            with self.pool.connection(self.address) as conn:
                return bool(conn.call("put", key=key, meta={"meta": meta or {}}, payload=data).meta.get("stored"))
        except (TransferError, OSError) as e:
            self._failed("put", e)
            return False

    def local(self, quiet: bool = False) -> dict[str, Any] | None:
        """Where the server offers its tier through this host's memory (storage/local.py); None
        when it cannot say (logged unless `quiet`) or offers none."""
        try:
            with self.pool.connection(self.address) as conn:
                return dict(conn.call("local").meta) or None
        except (TransferError, OSError) as e:
            log.log(logging.DEBUG if quiet else logging.INFO, "cache %s: no shared-memory tier (%s)", self.address, e)
            return None

    def stats(self) -> dict[str, Any]:
        with self.pool.connection(self.address) as conn:
            return conn.call("stats").meta

    def close(self) -> None:
        self.pool.close()

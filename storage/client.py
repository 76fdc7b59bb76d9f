"""The cache server's client, for connectors: pooled connections, every failure a miss.

A cache that is down, slow or broken must never fail a request: lookups then report 0, gets stop
at the first chunk that did not arrive whole and verified, puts are dropped, each logged once per
reason so a dead cache does not flood the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import transfer
from transfer import ConnectionPool, TransferError
from transfer.wire import Header

log = logging.getLogger("storage")


class CacheClient:
    def __init__(self, address: str, connect: Callable[[str], transfer.Connection] | None = None):
        self.address = address
        self.pool = ConnectionPool(connect or transfer.connect)
        self._warned: set[str] = set()

    def _failed(self, what: str, e: Exception) -> None:
        reason = f"{what}: {type(e).__name__}"
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("cache %s %s failed, treating it as a miss: %s", self.address, what, e)

    def lookup(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        try:
            with self.pool.connection(self.address) as conn:
                return int(conn.call("lookup", meta={"keys": [k.hex() for k in keys]}).meta.get("count", 0))
        except (TransferError, OSError) as e:
            self._failed("lookup", e)
            return 0

    def get(
        self, keys: Sequence[bytes], sink: Callable[[Header], Any] | None = None
    ) -> list[tuple[bytes, Any, dict[str, Any]]]:
        """The leading chunks the cache has, as (key, payload, meta), each whole and checksum-verified."""
        got: list[tuple[bytes, Any, dict[str, Any]]] = []
        if not keys:
            return got
        try:
            with self.pool.connection(self.address) as conn:
                for frame in conn.stream("get", meta={"keys": [k.hex() for k in keys]}, sink=sink):
                    if frame.header.key != keys[len(got)]:
                        raise transfer.ProtocolError("the cache answered with another chunk than asked")
                    got.append((frame.header.key, frame.payload, dict(frame.header.meta)))
        except (TransferError, OSError, IndexError) as e:
            self._failed("get", e)
        return got

    def put(self, key: bytes, data: Any, meta: dict[str, Any] | None = None) -> bool:
        try:
            with self.pool.connection(self.address) as conn:
                return bool(conn.call("put", key=key, meta={"meta": meta or {}}, payload=data).meta.get("stored"))
        except (TransferError, OSError) as e:
            self._failed("put", e)
            return False

    def stats(self) -> dict[str, Any]:
        with self.pool.connection(self.address) as conn:
            return conn.call("stats").meta

    def close(self) -> None:
        self.pool.close()

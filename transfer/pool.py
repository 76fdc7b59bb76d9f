"""Connection reuse: one idle list per peer address, safe to share between threads."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pdrun.transfer.base import Connection


class ConnectionPool:
    """Hands out a connection per `with pool.connection(address)`; puts it back after a clean reply.

    A connection that failed or was left mid-reply is closed, never reused.
    """

    def __init__(self, connect: Callable[[str], Connection], max_idle_per_peer: int = 8):
        self._connect = connect
        self._max_idle = max_idle_per_peer
        self._idle: dict[str, list[Connection]] = defaultdict(list)
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self, address: str) -> Iterator[Connection]:
        conn = None
        while conn is None:
            with self._lock:
                idle = self._idle.get(address)
                conn = idle.pop() if idle else None
            if conn is None:
                conn = self._connect(address)
            elif conn.stale():  # the peer went away while it sat idle
                conn.close()
                conn = None
        try:
            yield conn
        finally:
            self._put_back(conn)

    def _put_back(self, conn: Connection) -> None:
        with self._lock:
            keep = not conn.broken and not self._closed and len(self._idle[conn.address]) < self._max_idle
            if keep:
                self._idle[conn.address].append(conn)
        if not keep:
            conn.close()

    def discard(self, address: str) -> None:
        """Close every idle connection to `address` (after the peer restarted, say)."""
        with self._lock:
            conns = self._idle.pop(address, [])
        for c in conns:
            c.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()

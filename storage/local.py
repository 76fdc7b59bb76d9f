"""The cache tier for instances on the server's own host: chunks move through the shared arena,
only small control messages go to the server, over a unix socket (pyzmq `ipc://`).

    where   {keys}                  -> {memory: leading keys in memory, total: ... in memory or on disk}
    read    {pid, keys}             -> {lease, slots: [[offset, nbytes, meta], ...]} leading chunks in memory, pinned
    reserve {pid, keys, sizes, metas, from_disk, order}
                                    -> {lease, slots: [offset, or -1 held or being written already, or -2 no room]}
                                       (from_disk: the instance fills them from the disk tier: counted as its hits;
                                       order: the prompt's chunks up to these, in order, kept so in the LRU)
    commit  {pid, lease, keys}      -> {} the listed keys are filled and served; the lease's others are freed
    release {pid, lease}            -> {held: whether the pins held until now (else the bytes may be another's)}
    touch   {keys}                  -> {} a prompt's chunks, in order, used again: the newest in the LRU
    forget  {keys}                  -> {} disk files a reader found damaged
    stats                           -> per-tier counters

A reader copies a pinned chunk out of its slot and then releases it: a slot is never reused while
pinned. A read lease not released within `lease_s` is unpinned (its release then answers held
false, and the reader treats what it copied as lost). A write lease is held until its instance
commits it or dies: a live instance might still be copying into it. The server checks the pids
behind its leases every second, so an instance killed mid-copy pins nothing for long.

Chunks on disk are read by the instance itself, from the server's disk tier directory, into a
slot it reserved and commits: the next reader finds them in memory.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from pdrun.storage.arena import Arena, pid_alive
from pdrun.storage.tiers import DiskChunk, DiskTier, Entry, TieredStore
from pdrun.transfer.errors import TransferError

log = logging.getLogger("pdrun.storage")
HELD, NO_ROOM = -1, -2
OPS = ("where", "read", "reserve", "commit", "release", "touch", "forget", "stats")
MAX_KEYS = 4096  # a 1M-token prompt at 256 tokens per chunk
MAX_MESSAGE_BYTES = 4 << 20

_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.Decoder(dict[str, Any]).decode


@dataclass
class Lease:
    pid: int
    write: bool
    entries: list[tuple[bytes, Entry]]
    deadline: float
    expired: bool = False
    order: list[bytes] = field(default_factory=list)  # a write's prompt chunks, in order (`TieredStore.stored`)


@dataclass
class LocalInfo:
    """What an instance needs to use the tier through its host's memory (the TCP `local` op)."""

    ipc: str
    arena: str
    size: int
    token: str  # hex of the arena's first bytes: proves the mapping is the server's memory
    disk: str | None = None


class LocalService:
    """Serves a TieredStore's arena to instances on this host; one thread answers every request."""

    def __init__(self, store: TieredStore, lease_s: float = 60.0, directory: str | None = None):
        self.store = store
        self.memory = store.memory
        self.lease_s = lease_s
        path = Path(directory or tempfile.gettempdir()) / f"pdrun-cache-{os.getpid()}-{uuid.uuid4().hex[:8]}.ipc"
        self.address = f"ipc://{path}"
        self._path = path
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        old = os.umask(0o077)  # the socket file owner-only, as the arena
        try:
            self._sock.bind(self.address)
        finally:
            os.umask(old)
        self._leases: dict[int, Lease] = {}
        self.requests: dict[str, int] = {}  # answered, by op
        self._lock = threading.Lock()  # the lease table: the service's thread, and `sweep` from anywhere
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pdrun-cache-local", daemon=True)
        self._thread.start()

    def info(self) -> LocalInfo:
        disk = self.store.disk
        return LocalInfo(
            ipc=self.address,
            arena=str(self.memory.arena.path),
            size=self.memory.arena.size,
            token=self.memory.arena.token.hex(),
            disk=str(disk.dir) if disk is not None and not disk.disabled else None,
        )

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        next_sweep = time.monotonic() + 1.0
        while not self._stop.is_set():
            if poller.poll(200):
                frames = self._sock.recv_multipart()
                try:
                    with self._lock:
                        reply = self.handle(_decode(frames[-1]))
                except (ValueError, TypeError, KeyError, msgspec.DecodeError) as e:
                    reply = {"error": f"{type(e).__name__}: {e}"}
                except Exception as e:  # one bad request never stops the service
                    log.exception("local cache request failed")
                    reply = {"error": f"{type(e).__name__}: {e}"}
                self._sock.send_multipart([*frames[:-1], _encode(reply)])
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + 1.0
        self._sock.close(0)
        self._ctx.term()

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if isinstance(op, str) and op in OPS:
            self.requests[op] = self.requests.get(op, 0) + 1
        if op == "where":
            memory, total = self.store.where(_keys(req))
            return {"memory": memory, "total": total}
        if op == "read":
            keys = _keys(req)
            pinned = self.memory.pin(keys)
            lease = self._lease(req, False, list(zip(keys, pinned, strict=False))) if pinned else 0
            return {"lease": lease, "slots": [[e.offset, e.nbytes, e.meta] for e in pinned]}
        if op == "reserve":
            return self._reserve(req)
        if op == "commit":
            return self._commit(req)
        if op == "release":
            lease = self._leases.pop(_int(req, "lease"), None)
            if lease is None or lease.write:
                return {"held": False}
            self._free(lease)
            return {"held": True}
        if op == "touch":
            self.store.touch(_keys(req))
            return {}
        if op == "forget":
            if self.store.disk is not None:
                for key in _keys(req):
                    self.store.disk.drop(key)
            return {}
        if op == "stats":
            return self.store.stats()
        raise ValueError(f"unknown op {op!r}")

    def _lease(
        self, req: dict[str, Any], write: bool, entries: list[tuple[bytes, Entry]], order: list[bytes] | None = None
    ) -> int:
        lease = next(self._ids)
        deadline = time.monotonic() + self.lease_s
        self._leases[lease] = Lease(_int(req, "pid"), write, entries, deadline, order=order or [])
        return lease

    def _reserve(self, req: dict[str, Any]) -> dict[str, Any]:
        keys, sizes, metas = _keys(req), req.get("sizes"), req.get("metas")
        if not isinstance(sizes, list) or not isinstance(metas, list) or not len(keys) == len(sizes) == len(metas):
            raise ValueError("reserve needs 'sizes' and 'metas' lists as long as 'keys'")
        slots: list[int] = []
        entries: list[tuple[bytes, Entry]] = []
        for key, nbytes, meta in zip(keys, sizes, metas, strict=True):
            if not isinstance(nbytes, int) or nbytes <= 0 or not isinstance(meta, dict):
                raise ValueError("sizes must be positive ints and metas mappings")
            entry = self.memory.reserve(key, nbytes, meta)
            if entry is None:  # held, or being written by another request (held once it commits)
                slots.append(HELD if self.memory.knows(key) else NO_ROOM)
                continue
            entries.append((key, entry))
            slots.append(entry.offset)
            if req.get("from_disk") and self.store.disk is not None:
                self.store.disk.count_hit(nbytes)
        # The prompt's chunks before these too (stored in earlier steps): its head stays the newest.
        order = _keys(req, "order") if req.get("order") else keys
        self.store.touch(order)
        return {"lease": self._lease(req, True, entries, order) if entries else 0, "slots": slots}

    def _commit(self, req: dict[str, Any]) -> dict[str, Any]:
        lease = self._leases.pop(_int(req, "lease"), None)
        if lease is None or not lease.write:
            raise ValueError("no such write lease")
        done = set(_keys(req))
        committed = []
        for key, _ in lease.entries:
            if key in done and self.memory.commit(key):
                committed.append(key)
            else:
                self.memory.abort(key)
        self.store.stored(committed, lease.order)
        return {}

    def sweep(self) -> None:
        """Unpin read leases past their time; free every lease of an instance that is gone."""
        with self._lock:
            self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        alive: dict[int, bool] = {}
        for lid, lease in list(self._leases.items()):
            if lease.pid not in alive:
                alive[lease.pid] = pid_alive(lease.pid)
            if not alive[lease.pid]:
                del self._leases[lid]
                self._free(lease)
                log.info("freed a lease of %d chunks held by process %d, which is gone", len(lease.entries), lease.pid)
            elif not lease.write and now > lease.deadline:
                del self._leases[lid]
                self._free(lease)
                log.warning("process %d held a read lease over %g s: unpinned", lease.pid, self.lease_s)

    def _free(self, lease: Lease) -> None:
        if lease.write:
            for key, _ in lease.entries:
                self.memory.abort(key)
        else:
            self.memory.unpin([e for _, e in lease.entries])

    def leases(self) -> int:
        return len(self._leases)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._path.unlink(missing_ok=True)


def _keys(req: dict[str, Any], name: str = "keys") -> list[bytes]:
    keys = req.get(name)
    if not isinstance(keys, list) or len(keys) > MAX_KEYS or not all(isinstance(k, bytes) for k in keys):
        raise ValueError(f"{name!r} must be a list of at most {MAX_KEYS} byte strings")
    return keys


def _int(req: dict[str, Any], name: str) -> int:
    value = req.get(name)
    if not isinstance(value, int):
        raise ValueError(f"{name!r} must be an int")
    return value


@dataclass
class Slot:
    offset: int
    nbytes: int
    meta: dict[str, Any] = field(default_factory=dict)


class LocalError(Exception):
    """The local tier did not answer, or answered an error: the caller treats it as a miss."""


class LocalClient:
    """An instance's side: the arena mapped, requests over a socket per thread (a miss on failure)."""

    def __init__(self, info: LocalInfo, timeout_s: float = 2.0, mapped: bool = True):
        """`mapped`: keep the arena mapped (to copy chunks); else it is mapped only to prove that
        this host shares the server's memory, and let go (lookups alone keep no memory alive)."""
        self.info = info
        self.arena = Arena.attach(info.arena, info.size)
        if self.arena.token.hex() != info.token:
            self.arena.close()
            raise OSError(f"{info.arena} here is not the cache server's memory (another host)")
        if not mapped:
            self.arena.close()
        self.disk = Path(info.disk) if info.disk else None
        self.timeout_ms = int(timeout_s * 1000)
        self.pid = os.getpid()
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sockets: list[zmq.Socket[Any]] = []

    @classmethod
    def discover(cls, info: dict[str, Any] | None, timeout_s: float = 2.0, mapped: bool = True) -> LocalClient | None:
        """The local client for the server that answered `info` (its TCP `local` op), or None when
        that server is on another host or offers no local tier."""
        if not info:
            return None
        try:
            return cls(msgspec.convert(info, LocalInfo), timeout_s, mapped)
        except (OSError, ValueError, msgspec.ValidationError) as e:
            log.info("cache tier reached over the network, not through this host's memory: %s", e)
            return None

    def _socket(self) -> zmq.Socket[Any]:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            sock.connect(self.info.ipc)
            self._local.sock = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        sock = self._socket()
        try:
            sock.send(_encode({"op": op, "pid": self.pid, **fields}))
            reply = _decode(sock.recv())
        except zmq.ZMQError as e:
            # A REQ socket that missed its answer cannot ask again: the next call opens another.
            self._local.sock = None
            with self._lock:
                if sock in self._sockets:
                    self._sockets.remove(sock)
            sock.close(0)
            raise LocalError(f"cache server {self.info.ipc} did not answer {op}: {e}") from None
        if "error" in reply:
            raise LocalError(f"cache server refused {op}: {reply['error']}")
        return reply

    def where(self, keys: Sequence[bytes]) -> tuple[int, int]:
        reply = self.call("where", keys=list(keys))
        return int(reply["memory"]), int(reply["total"])

    def read(self, keys: Sequence[bytes]) -> tuple[int, list[Slot]]:
        reply = self.call("read", keys=list(keys))
        return int(reply["lease"]), [Slot(o, n, m) for o, n, m in reply["slots"]]

    def reserve(
        self,
        keys: Sequence[bytes],
        sizes: Sequence[int],
        metas: Sequence[dict[str, Any]],
        from_disk: bool = False,
        order: Sequence[bytes] = (),
    ) -> tuple[int, list[int]]:
        """Slots for `keys`; `order`: the prompt's chunks up to these, in order (default: `keys`),
        which the tier keeps so that the prompt's head is evicted last."""
        fields: dict[str, Any] = {"keys": list(keys), "sizes": list(sizes), "metas": list(metas)}
        if order:
            fields["order"] = list(order)
        reply = self.call("reserve", from_disk=from_disk, **fields)
        return int(reply["lease"]), list(reply["slots"])

    def commit(self, lease: int, keys: Sequence[bytes]) -> None:
        self.call("commit", lease=lease, keys=list(keys))

    def release(self, lease: int) -> bool:
        return bool(self.call("release", lease=lease)["held"])

    def touch(self, keys: Sequence[bytes]) -> None:
        """`keys`, a prompt's chunks in order, were used again: the newest, its head evicted last."""
        self.call("touch", keys=list(keys))

    def disk_chunk(self, key: bytes) -> DiskChunk | None:
        """Chunk `key` in the server's disk tier, to be read into a slot (`DiskChunk.read_into`);
        None when it is not there, or damaged (then the server is told to drop it)."""
        if self.disk is None:
            return None
        try:
            return DiskChunk.open(DiskTier.path_in(self.disk, key), key)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TransferError) as e:
            self.damaged(key, e)
            return None

    def damaged(self, key: bytes, e: Exception) -> None:
        log.warning("dropping cache file of chunk %s: %s", key.hex(), e)
        with contextlib.suppress(LocalError):
            self.call("forget", keys=[key])

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close(0)
            self._sockets.clear()
        self._ctx.term()
        self.arena.close()

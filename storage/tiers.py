"""Where chunks are kept: memory over disk, each with a byte budget and LRU eviction.

A chunk is an opaque payload (the KV of `chunk_size` tokens) under its chained key, with a little
metadata (layout, token count) that must come back with it. Readers get copies, made under the
tier's lock, so a chunk evicted or replaced meanwhile never reaches them half-written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transfer.errors import TransferError
from transfer.wire import PREFIX, Header, checksum, decode_header, decode_prefix, encode_header, verify

log = logging.getLogger("storage")
Buffer = Any  # a writable bytes-like object: bytearray, or a pinned torch tensor's memory


@dataclass
class Chunk:
    data: bytes | bytearray | memoryview
    meta: dict[str, Any] = field(default_factory=dict)
    digest: int | None = None  # xxh3-64 of data when known (verified on its way in), sent on as is


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    evictions: int = 0
    dropped_corrupt: int = 0
    entries: int = 0
    bytes_used: int = 0


def leading(keys: Sequence[bytes], present: Callable[[bytes], bool]) -> int:
    """How many of the first keys are present: a prefix hit is only as long as its unbroken run."""
    n = 0
    while n < len(keys) and present(keys[n]):
        n += 1
    return n


class ChunkStore(Protocol):
    def lookup(self, keys: Sequence[bytes]) -> int: ...
    def get(self, key: bytes) -> Chunk | None: ...
    def put(self, key: bytes, data: Any, meta: dict[str, Any] | None = None, digest: int | None = None) -> bool: ...
    def stats(self) -> dict[str, dict[str, int]]: ...


class BufferPool:
    """Reuses the buffers of evicted chunks for new ones of the same size: no allocation per chunk
    once warm. On CUDA hosts `allocate` gives pinned memory, so loads to the GPU copy at full speed."""

    def __init__(self, allocate: Callable[[int], Buffer] | None = None, keep_bytes: int = 1 << 30):
        self.allocate = allocate or bytearray
        self.keep_bytes = keep_bytes
        self.free: dict[int, list[Buffer]] = {}
        self.free_bytes = 0

    def take(self, nbytes: int) -> Buffer:
        spare = self.free.get(nbytes)
        if spare:
            self.free_bytes -= nbytes
            return spare.pop()
        return self.allocate(nbytes)

    def give(self, buf: Buffer, nbytes: int) -> None:
        if self.free_bytes + nbytes <= self.keep_bytes:
            self.free.setdefault(nbytes, []).append(buf)
            self.free_bytes += nbytes


class MemoryTier:
    def __init__(self, budget_bytes: int, pool: BufferPool | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"memory tier budget must be > 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self.pool = pool or BufferPool(keep_bytes=min(budget_bytes // 8, 1 << 30))
        self._chunks: OrderedDict[bytes, tuple[Buffer, int, dict[str, Any], int | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._stats = TierStats()

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._chunks

    def lookup(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            return leading(keys, self._chunks.__contains__)

    def get(self, key: bytes, into: Callable[[int], Buffer] | None = None) -> Chunk | None:
        """A copy of the chunk: into the buffer `into(nbytes)` gives, if given, so a caller that
        reuses one buffer allocates nothing per chunk."""
        with self._lock:
            entry = self._chunks.get(key)
            if entry is None:
                self._stats.misses += 1
                return None
            self._chunks.move_to_end(key)
            buf, nbytes, meta, digest = entry
            self._stats.hits += 1
            self._stats.bytes_out += nbytes
            src = memoryview(buf).cast("B")[:nbytes]
            if into is None:
                return Chunk(bytes(src), dict(meta), digest)
            dst = memoryview(into(nbytes)).cast("B")[:nbytes]
            dst[:] = src
            return Chunk(dst, dict(meta), digest)

    def put(self, key: bytes, data: Any, meta: dict[str, Any] | None = None, digest: int | None = None) -> bool:
        src = memoryview(data).cast("B")
        nbytes = src.nbytes
        if nbytes > self.budget:
            return False
        with self._lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._release(old)
            while self._stats.bytes_used + nbytes > self.budget:
                _, victim = self._chunks.popitem(last=False)
                self._release(victim)
                self._stats.evictions += 1
            buf = self.pool.take(nbytes)
            memoryview(buf).cast("B")[:nbytes] = src
            self._chunks[key] = (buf, nbytes, dict(meta or {}), digest)
            self._stats.puts += 1
            self._stats.bytes_in += nbytes
            self._stats.bytes_used += nbytes
            self._stats.entries = len(self._chunks)
        return True

    def _release(self, entry: tuple[Buffer, int, dict[str, Any], int | None]) -> None:
        buf, nbytes, _, _ = entry
        self._stats.bytes_used -= nbytes
        self._stats.entries = len(self._chunks)
        self.pool.give(buf, nbytes)

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"memory": dict(vars(self._stats))}


class DiskTier:
    """One file per chunk, `<dir>/<key[:1] hex>/<key hex>.chunk`: the wire format's header (key,
    length, xxh3-64 checksum, meta) then the payload. Written to a temporary name, fsync'd and
    renamed, so a crash leaves either the whole chunk or none. The index is rebuilt by scanning at
    start (oldest first for LRU). A file that is truncated, has a flipped byte or the wrong key is
    deleted when read, never served. A directory that cannot be written, or fills up, turns the
    tier off with a warning; the memory tier goes on alone."""

    SUFFIX = ".chunk"

    def __init__(self, directory: str | os.PathLike[str], budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError(f"disk tier budget must be > 0 bytes, got {budget_bytes}")
        self.dir = Path(directory)
        self.budget = budget_bytes
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, oldest first
        self._lock = threading.Lock()
        self._stats = TierStats()
        self.disabled: str | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            self._disable(f"cannot write to {self.dir}: {e.strerror or e}")
            return
        self._scan()

    def _disable(self, reason: str) -> None:
        if self.disabled is None:
            log.warning("disk cache tier off, memory only from now on: %s", reason)
        self.disabled = reason

    def _path(self, key: bytes) -> Path:
        h = key.hex()
        return self.dir / h[:2] / f"{h}{self.SUFFIX}"

    def _scan(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        for p in self.dir.glob("*/*"):
            try:
                if p.name.endswith(".tmp"):
                    p.unlink()  # a write that never finished
                elif p.name.endswith(self.SUFFIX):
                    st = p.stat()
                    found.append((st.st_mtime, bytes.fromhex(p.name[: -len(self.SUFFIX)]), st.st_size))
            except (OSError, ValueError):
                continue
        for _, key, size in sorted(found):
            self._index[key] = size
            self._stats.bytes_used += size
        self._stats.entries = len(self._index)
        self._evict_over_budget()
        if found:
            log.info("disk cache tier %s: %d chunks, %d bytes", self.dir, len(self._index), self._stats.bytes_used)

    def lookup(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            return leading(keys, self._index.__contains__)

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def get(self, key: bytes) -> Chunk | None:
        with self._lock:
            if key not in self._index:
                self._stats.misses += 1
                return None
            self._index.move_to_end(key)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                raw = f.read()
            header, payload = self._parse(raw, key)
        except (OSError, TransferError, ValueError) as e:
            log.warning("dropping cache file %s: %s", path.name, e)
            self._forget(key, corrupt=True)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with self._lock:
            self._stats.hits += 1
            self._stats.bytes_out += header.nbytes
        return Chunk(payload, dict(header.meta), header.checksum)

    @staticmethod
    def _parse(raw: bytes, key: bytes) -> tuple[Header, memoryview]:
        view = memoryview(raw)
        if len(raw) < PREFIX.size:
            raise ValueError(f"truncated: {len(raw)} bytes")
        hlen = decode_prefix(raw[: PREFIX.size])
        header = decode_header(raw[PREFIX.size : PREFIX.size + hlen], max_payload=1 << 40)
        payload = view[PREFIX.size + hlen :]
        if header.key != key:
            raise ValueError("the file holds another key")
        if payload.nbytes != header.nbytes:
            raise ValueError(f"truncated: {payload.nbytes} of {header.nbytes} payload bytes")
        if header.checksum is None:
            raise ValueError("no checksum")
        verify(header, payload)
        return header, payload

    def put(self, key: bytes, data: Any, meta: dict[str, Any] | None = None, digest: int | None = None) -> bool:
        if self.disabled:
            return False
        payload = memoryview(data).cast("B")
        head = encode_header(
            Header(
                op="chunk",
                key=key,
                nbytes=payload.nbytes,
                checksum=checksum(payload) if digest is None else digest,
                meta=meta or {},
            )
        )
        size = len(head) + payload.nbytes
        if size > self.budget:
            return False
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._disable(f"writing {path.name}: {e.strerror or e}")
            return False
        with self._lock:
            old = self._index.pop(key, None)
            self._stats.bytes_used += size - (old or 0)
            self._index[key] = size
            self._stats.puts += 1
            self._stats.bytes_in += payload.nbytes
            self._stats.entries = len(self._index)
        self._evict_over_budget()
        return True

    def _evict_over_budget(self) -> None:
        while True:
            with self._lock:
                if self._stats.bytes_used <= self.budget or not self._index:
                    return
                key, size = self._index.popitem(last=False)
                self._stats.bytes_used -= size
                self._stats.evictions += 1
                self._stats.entries = len(self._index)
            with contextlib.suppress(OSError):
                self._path(key).unlink()

    def _forget(self, key: bytes, corrupt: bool = False) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._stats.bytes_used -= size
                self._stats.entries = len(self._index)
            if corrupt:
                self._stats.dropped_corrupt += 1

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"disk": dict(vars(self._stats))}


class TieredStore:
    """Memory over disk: puts land in memory and are written to disk behind, off the caller's
    thread; gets try memory, then disk, and promote what disk had."""

    def __init__(self, memory: MemoryTier, disk: DiskTier | None = None, write_queue_bytes: int | None = None):
        self.memory = memory
        self.disk = disk
        # Copies waiting for the disk are bounded in bytes: a put waits up to write_wait_s for room
        # (a burst is paced by the disk), then gives up the disk copy (memory still has the chunk).
        self.write_queue_bytes = write_queue_bytes or min(max(memory.budget // 4, 1 << 26), 1 << 30)
        self.write_wait_s = 1.0
        self._queued = 0
        self._queued_cond = threading.Condition()
        self._writes: queue.Queue[tuple[bytes, bytes, dict[str, Any], int | None] | None] = queue.Queue()
        self.write_behind_dropped = 0
        self._writer: threading.Thread | None = None
        if disk is not None:
            self._writer = threading.Thread(target=self._write_behind, name="pdrun-cache-writer", daemon=True)
            self._writer.start()

    def lookup(self, keys: Sequence[bytes]) -> int:
        return leading(keys, lambda k: k in self.memory or (self.disk is not None and k in self.disk))

    def get(self, key: bytes, into: Callable[[int], Buffer] | None = None) -> Chunk | None:
        """The chunk from memory (copied into `into(nbytes)` if given), else from disk, promoted."""
        chunk = self.memory.get(key, into)
        if chunk is None and self.disk is not None:
            chunk = self.disk.get(key)
            if chunk is not None:
                self.memory.put(key, chunk.data, chunk.meta, chunk.digest)
        return chunk

    def put(self, key: bytes, data: Any, meta: dict[str, Any] | None = None, digest: int | None = None) -> bool:
        stored = self.memory.put(key, data, meta, digest)
        if self.disk is not None and not self.disk.disabled:
            src = memoryview(data).cast("B")
            limit = max(self.write_queue_bytes, src.nbytes)
            with self._queued_cond:
                room = self._queued_cond.wait_for(lambda: self._queued + src.nbytes <= limit, self.write_wait_s)
                if room:
                    self._queued += src.nbytes
                else:
                    self.write_behind_dropped += 1  # the disk is behind: memory still has it
            if room:
                self._writes.put((key, bytes(src), dict(meta or {}), digest))
            stored = True
        return stored

    def _write_behind(self) -> None:
        assert self.disk is not None
        while (item := self._writes.get()) is not None:
            key, data, meta, digest = item
            try:
                if key not in self.disk:
                    self.disk.put(key, data, meta, digest)
            finally:
                with self._queued_cond:
                    self._queued -= len(data)
                    self._queued_cond.notify_all()
                self._writes.task_done()
        self._writes.task_done()

    def flush(self) -> None:
        """Wait until every write behind so far is on disk."""
        if self._writer is not None:
            self._writes.join()

    def close(self) -> None:
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join()
            self._writer = None

    def stats(self) -> dict[str, dict[str, int]]:
        out = self.memory.stats()
        if self.disk is not None:
            out |= self.disk.stats()
            out["disk"]["write_behind_dropped"] = self.write_behind_dropped
        return out

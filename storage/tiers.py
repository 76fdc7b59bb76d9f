"""Where chunks are kept: memory over disk, each with a byte budget and LRU eviction.

A chunk is an opaque payload (the KV of `chunk_size` tokens) under its chained key, with a little
metadata (layout, token count) that must come back with it. A key names its bytes: a chunk is
stored once, never replaced. The memory tier's chunks live in a shared-memory arena
(storage/arena.py); readers get copies made under the tier's lock, or pin chunks and read them in
place, so a chunk evicted meanwhile never reaches them half-written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdrun.storage.arena import PAGE, Arena
from pdrun.transfer.errors import TransferError
from pdrun.transfer.wire import PREFIX, Header, checksum, decode_header, decode_prefix, encode_header, verify

log = logging.getLogger("pdrun.storage")
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


def _touch(lru: OrderedDict[bytes, Any], keys: Sequence[bytes]) -> None:
    """Move `keys` (in order) to the recent end of `lru`, the first of them the most recent."""
    for key in reversed(keys):
        if key in lru:
            lru.move_to_end(key)


def leading(keys: Sequence[bytes], present: Callable[[bytes], bool]) -> int:
    """How many of the first keys are present: a prefix hit is only as long as its unbroken run."""
    n = 0
    while n < len(keys) and present(keys[n]):
        n += 1
    return n


@dataclass
class Entry:
    """A chunk in the arena: readable once committed; never evicted while pinned (read or written)."""

    offset: int
    nbytes: int
    meta: dict[str, Any]
    digest: int | None = None
    committed: bool = True
    pins: int = 0
    unsaved: bool = False  # waits for the disk: evicted only when nothing else can be


class MemoryTier:
    """Chunks in an arena (storage/arena.py), LRU over those neither pinned nor being written. A
    prompt's chunks used together are ordered so that its first chunk is evicted last: a prefix
    under pressure loses its tail, and what stays still serves (a tail without its head serves no
    one).

    Besides whole-chunk `put` and `get` (copies, made under the tier's lock), a writer may
    `reserve` a slot, fill it itself and `commit` it, and a reader may `pin` chunks and read their
    slots in place: the same-host instances move chunks this way, without a copy by the server."""

    def __init__(self, budget_bytes: int, arena: Arena | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"memory tier budget must be > 0 bytes, got {budget_bytes}")
        self.arena = arena or Arena.create(budget_bytes + PAGE)
        self.budget = self.arena.size - PAGE
        self._chunks: OrderedDict[bytes, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._stats = TierStats()

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return self._has(key)

    def knows(self, key: bytes) -> bool:
        """Whether the key is held or being written (reserved, not yet committed)."""
        with self._lock:
            return key in self._chunks

    def _has(self, key: bytes) -> bool:
        entry = self._chunks.get(key)
        return entry is not None and entry.committed

    def lookup(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            return leading(keys, self._has)

    def touch(self, keys: Sequence[bytes]) -> None:
        """`keys`, a prompt's chunks in order, were just used: now the most recent, the first of
        them evicted last."""
        with self._lock:
            _touch(self._chunks, keys)

    def get(self, key: bytes, into: Callable[[int], Buffer] | None = None) -> Chunk | None:
        """A copy of the chunk: into the buffer `into(nbytes)` gives, if given, so a caller that
        reuses one buffer allocates nothing per chunk."""
        with self._lock:
            entry = self._chunks.get(key)
            if entry is None or not entry.committed:
                self._stats.misses += 1
                return None
            self._chunks.move_to_end(key)
            self._stats.hits += 1
            self._stats.bytes_out += entry.nbytes
            src = self.arena.view(entry.offset, entry.nbytes)
            if into is None:
                return Chunk(bytes(src), dict(entry.meta), entry.digest)
            dst = memoryview(into(entry.nbytes)).cast("B")[: entry.nbytes]
            dst[:] = src
            return Chunk(dst, dict(entry.meta), entry.digest)

    def put(self, key: bytes, data: Any, meta: dict[str, Any] | None = None, digest: int | None = None) -> bool:
        """Store a copy of `data`; True also when the key is already held (a key names its bytes)."""
        src = memoryview(data).cast("B")
        entry = self.reserve(key, src.nbytes, meta, digest)
        if entry is None:
            return key in self
        self.arena.view(entry.offset, entry.nbytes)[:] = src
        self.commit(key)
        return True

    def reserve(
        self, key: bytes, nbytes: int, meta: dict[str, Any] | None = None, digest: int | None = None
    ) -> Entry | None:
        """A slot for the caller to fill, then `commit` (or `abort`); None when the key is held or
        being written already, or no slot can be freed."""
        with self._lock:
            if key in self._chunks or nbytes > self.budget:
                return None
            offset = self._allocate(nbytes)
            if offset is None:
                return None
            entry = Entry(offset, nbytes, dict(meta or {}), digest, committed=False, pins=1)
            self._chunks[key] = entry
            self._stats.bytes_used += nbytes
            self._stats.entries = len(self._chunks)
            return entry

    def _allocate(self, nbytes: int) -> int | None:
        """A free slot, evicting the least recently used chunks nobody pins until one is: those
        already on disk (or with no disk behind) first, and of those the ones of the same size
        (their slots fit)."""
        offset = self.arena.alloc(nbytes)
        for unsaved, same_size in ((False, True), (False, False), (True, True), (True, False)):
            if offset is not None:
                return offset
            for key in list(self._chunks):
                entry = self._chunks[key]
                if entry.pins or entry.unsaved != unsaved or (same_size and entry.nbytes != nbytes):
                    continue
                self._drop(key)
                self._stats.evictions += 1
                offset = self.arena.alloc(nbytes)
                if offset is not None:
                    return offset
        return offset

    def _drop(self, key: bytes) -> None:
        entry = self._chunks.pop(key)
        self.arena.free(entry.offset, entry.nbytes)
        self._stats.bytes_used -= entry.nbytes
        self._stats.entries = len(self._chunks)

    def commit(self, key: bytes) -> bool:
        """The reserved slot is filled: the chunk is served from now on."""
        with self._lock:
            entry = self._chunks.get(key)
            if entry is None or entry.committed:
                return False
            entry.committed, entry.pins = True, entry.pins - 1
            self._stats.puts += 1
            self._stats.bytes_in += entry.nbytes
            return True

    def abort(self, key: bytes) -> None:
        """A reservation that will not be filled: its slot is free again."""
        with self._lock:
            entry = self._chunks.get(key)
            if entry is not None and not entry.committed:
                self._drop(key)

    def pin(self, keys: Sequence[bytes], count: bool = True) -> list[Entry]:
        """The leading committed chunks of `keys`, pinned (not evicted) until `unpin`ned; counted
        as hits and misses unless the tier pins them for itself (`count` false)."""
        pinned: list[Entry] = []
        with self._lock:
            for key in keys:
                entry = self._chunks.get(key)
                if entry is None or not entry.committed:
                    self._stats.misses += count
                    break
                entry.pins += 1
                if count:
                    self._stats.hits += 1
                    self._stats.bytes_out += entry.nbytes
                pinned.append(entry)
            if count:
                _touch(self._chunks, keys[: len(pinned)])
        return pinned

    def unpin(self, entries: Sequence[Entry]) -> None:
        with self._lock:
            for entry in entries:
                entry.pins -= 1

    def has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` fit without evicting a chunk that waits for the disk."""
        with self._lock:
            if self.arena.used + nbytes <= self.budget:
                return True
            return any(not e.pins and not e.unsaved and e.nbytes >= nbytes for e in self._chunks.values())

    def mark_unsaved(self, key: bytes, unsaved: bool) -> None:
        """Whether the chunk still waits for its disk copy (kept over chunks that do not)."""
        with self._lock:
            entry = self._chunks.get(key)
            if entry is not None:
                entry.unsaved = unsaved

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"memory": dict(vars(self._stats))}

    def close(self) -> None:
        self.arena.close()


@dataclass
class DiskChunk:
    """A chunk file's header, read so that its payload can go straight into a buffer of its size."""

    path: Path
    header: Header
    offset: int  # where the payload starts

    @classmethod
    def open(cls, path: Path, key: bytes) -> DiskChunk:
        with open(path, "rb") as f:
            prefix = f.read(PREFIX.size)
            if len(prefix) < PREFIX.size:
                raise ValueError(f"truncated: {len(prefix)} bytes")
            hlen = decode_prefix(prefix)
            header = decode_header(f.read(hlen), max_payload=1 << 40)
        if header.key != key:
            raise ValueError("the file holds another key")
        if header.checksum is None:
            raise ValueError("no checksum")
        return cls(path, header, PREFIX.size + hlen)

    def read_into(self, into: memoryview) -> None:
        """The payload into `into` (header.nbytes long), verified; ValueError or TransferError if damaged."""
        with open(self.path, "rb") as f:
            stored = os.fstat(f.fileno()).st_size - self.offset
            f.seek(self.offset)
            got = f.readinto(into)
        if got != self.header.nbytes or stored != self.header.nbytes:
            raise ValueError(f"truncated: {stored} of {self.header.nbytes} payload bytes")
        verify(self.header, into)


PROBE_BYTES = 1 << 20  # what a disk tier writes to learn it takes writes: a full disk refuses it


class DiskTier:
    """One file per chunk, `<dir>/<key[:1] hex>/<key hex>.chunk`: the wire format's header (key,
    length, xxh3-64 checksum, meta) then the payload. Written to a temporary name, fsync'd and
    renamed, so a crash leaves either the whole chunk or none. The index is rebuilt by scanning at
    start (oldest first for LRU). A file that is truncated, has a flipped byte or the wrong key is
    deleted when read, never served. A directory that cannot be written, or fills up, turns the
    tier off with a warning; the memory tier goes on alone, and every `retry_s` a write is tried
    again: the tier is back on once the directory takes writes."""

    SUFFIX = ".chunk"

    def __init__(self, directory: str | os.PathLike[str], budget_bytes: int, retry_s: float = 10.0):
        if budget_bytes <= 0:
            raise ValueError(f"disk tier budget must be > 0 bytes, got {budget_bytes}")
        self.dir = Path(directory)
        self.budget = budget_bytes
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, oldest first
        self._lock = threading.Lock()
        self._stats = TierStats()
        self.disabled: str | None = None
        self.retry_s = retry_s
        self._retry_at = 0.0
        if self._writable():
            self._scan()

    def _writable(self) -> bool:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # created owner-only: KV is the prompts
            probe = self.dir / f".probe-{uuid.uuid4().hex}"
            try:
                probe.write_bytes(b"x" * PROBE_BYTES)
            finally:
                with contextlib.suppress(OSError):
                    probe.unlink()
        except OSError as e:
            self._disable(f"cannot write to {self.dir}: {e.strerror or e}")
            return False
        return True

    def _disable(self, reason: str) -> None:
        if self.disabled is None:
            log.warning("disk cache tier off, memory only until a write succeeds (tried every %g s): %s",
                        self.retry_s, reason)  # fmt: skip
        self.disabled = reason
        self._retry_at = time.monotonic() + self.retry_s

    def retry(self) -> bool:
        """While the tier is off, a probe write every `retry_s` (from one thread: the store's
        writer); True once the directory takes writes again."""
        if self.disabled is None:
            return True
        if time.monotonic() < self._retry_at:
            return False
        self._retry_at = time.monotonic() + self.retry_s
        if not self._writable():
            return False
        log.warning("disk cache tier back on: %s takes writes again", self.dir)
        self.disabled = None
        return True

    def _path(self, key: bytes) -> Path:
        return self.path_in(self.dir, key)

    @classmethod
    def path_in(cls, directory: Path, key: bytes) -> Path:
        h = key.hex()
        return directory / h[:2] / f"{h}{cls.SUFFIX}"

    def count_hit(self, nbytes: int) -> None:
        """A chunk an instance on this host read from this tier's files itself."""
        with self._lock:
            self._stats.hits += 1
            self._stats.bytes_out += nbytes

    def drop(self, key: bytes) -> None:
        """A damaged file a reader found: deleted, never served."""
        self._forget(key, corrupt=True)
        with contextlib.suppress(OSError):
            self._path(key).unlink()

    def _scan(self) -> None:
        found: list[tuple[int, bytes, int]] = []
        for p in self.dir.glob("*/*"):
            try:
                if p.name.endswith(".tmp"):
                    p.unlink()  # a write that never finished
                elif p.name.endswith(self.SUFFIX):
                    st = p.stat()
                    found.append((st.st_mtime_ns, bytes.fromhex(p.name[: -len(self.SUFFIX)]), st.st_size))
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

    def touch(self, keys: Sequence[bytes]) -> None:
        """As `MemoryTier.touch`: a prefix's first chunk is the last of it evicted."""
        with self._lock:
            _touch(self._index, keys)

    def written(self, keys: Sequence[bytes]) -> None:
        """A prompt's chunks are on disk: touched, and their files' times set in the same order
        (the first chunk's the newest), which the scan at start reads back."""
        self.touch(keys)
        now = time.time_ns()
        for i, key in enumerate(keys):
            with contextlib.suppress(OSError):
                os.utime(self._path(key), ns=(now - 1000 * i, now - 1000 * i))

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
            chunk = DiskChunk.open(path, key)
            payload = memoryview(bytearray(chunk.header.nbytes))
            chunk.read_into(payload)
        except (OSError, TransferError, ValueError) as e:
            log.warning("dropping cache file %s: %s", path.name, e)
            self.drop(key)
            return None
        with self._lock:
            self._stats.hits += 1
            self._stats.bytes_out += chunk.header.nbytes
        return Chunk(payload, dict(chunk.header.meta), chunk.header.checksum)

    def put(self, key: bytes, data: Any, meta: dict[str, Any] | None = None, digest: int | None = None) -> bool:
        if self.disabled is not None:
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
            path.parent.mkdir(exist_ok=True, mode=0o700)
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
            return {"disk": dict(vars(self._stats), writable=int(self.disabled is None))}


class TieredStore:
    """Memory over disk: chunks land in memory and are written to disk behind, from the arena, by
    a thread paced by the disk; gets try memory, then disk, and promote what disk had. A chunk
    evicted from memory before its turn came is not on disk (counted: `write_behind_dropped`)."""

    def __init__(self, memory: MemoryTier, disk: DiskTier | None = None):
        self.memory = memory
        self.disk = disk
        # chunks to write, and the prompt's chunks in order (the disk's LRU order)
        self._writes: queue.Queue[tuple[list[bytes], list[bytes]] | None] = queue.Queue()
        self._written = threading.Condition()
        self.write_wait_s = 1.0  # a put waits this long for the disk before a chunk it waits for is evicted
        self.write_behind_dropped = 0
        self._writer: threading.Thread | None = None
        if disk is not None:
            self._writer = threading.Thread(target=self._write_behind, name="pdrun-cache-writer", daemon=True)
            self._writer.start()

    def _anywhere(self, key: bytes) -> bool:
        return key in self.memory or (self.disk is not None and key in self.disk)

    def lookup(self, keys: Sequence[bytes]) -> int:
        return leading(keys, self._anywhere)

    def where(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """(leading keys in memory, leading keys in memory or on disk)."""
        in_memory = self.memory.lookup(keys)
        return in_memory, in_memory + leading(keys[in_memory:], self._anywhere)

    def get(self, key: bytes, into: Callable[[int], Buffer] | None = None) -> Chunk | None:
        """The chunk from memory (copied into `into(nbytes)` if given), else from disk, promoted."""
        chunk = self.memory.get(key, into)
        if chunk is None and self.disk is not None:
            chunk = self.disk.get(key)
            if chunk is not None:
                self.memory.put(key, chunk.data, chunk.meta, chunk.digest)
        return chunk

    def put(self, key: bytes, data: Any, meta: dict[str, Any] | None = None, digest: int | None = None) -> bool:
        """Store a copy; with a disk behind, a burst is paced by the disk (each put waits up to
        `write_wait_s` for room that costs no chunk its disk copy)."""
        if self.disk is not None and self.disk.disabled is None:
            nbytes = memoryview(data).nbytes
            with self._written:
                self._written.wait_for(lambda: self.memory.has_room(nbytes), self.write_wait_s)
        stored = self.memory.put(key, data, meta, digest)
        if stored:
            self.stored([key], [key])
        return stored

    def touch(self, keys: Sequence[bytes]) -> None:
        """`keys`, a prompt's chunks in order, were just used (see `MemoryTier.touch`)."""
        self.memory.touch(keys)
        if self.disk is not None:
            self.disk.touch(keys)

    def stored(self, keys: Sequence[bytes], order: Sequence[bytes]) -> None:
        """`keys` were committed to memory: write them to disk behind; `order`, the prompt's chunks
        up to them in order, is the order the disk keeps them in."""
        if keys and self.disk is not None and self.disk.disabled is None:
            for key in keys:
                self.memory.mark_unsaved(key, True)
            self._writes.put((list(keys), list(order)))

    def _write_behind(self) -> None:
        assert self.disk is not None
        while True:
            try:
                item = self._writes.get(timeout=self.disk.retry_s)
            except queue.Empty:  # idle: the moment to learn whether a disk that was off takes writes
                self.disk.retry()
                continue
            if item is None:
                break
            keys, order = item
            try:
                for key in keys:  # in order: a prefix half written serves its written half
                    self._write(key)
                self.disk.written(order)
            finally:
                self._writes.task_done()
        self._writes.task_done()

    def _write(self, key: bytes) -> None:
        assert self.disk is not None
        try:
            if key in self.disk:
                self.memory.mark_unsaved(key, False)
                return
            pinned = self.memory.pin([key], count=False)
            if not pinned:
                self.write_behind_dropped += 1  # evicted from memory before the disk's turn
                return
            entry = pinned[0]
            try:
                self.disk.put(key, self.memory.arena.view(entry.offset, entry.nbytes), entry.meta, entry.digest)
            finally:
                self.memory.mark_unsaved(key, False)
                self.memory.unpin(pinned)
        except Exception:  # never let one chunk stop the writer
            log.exception("writing chunk %s to disk failed", key.hex())
        finally:
            with self._written:
                self._written.notify_all()

    def flush(self) -> None:
        """Wait until every write behind so far is on disk."""
        if self._writer is not None:
            self._writes.join()

    def close(self) -> None:
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join()
            self._writer = None
        self.memory.close()

    def stats(self) -> dict[str, dict[str, int]]:
        out = self.memory.stats()
        if self.disk is not None:
            out |= self.disk.stats()
            out["disk"]["write_behind_dropped"] = self.write_behind_dropped
        return out

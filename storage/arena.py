"""The memory tier's bytes: one shared-memory file that every instance on the host maps.

The cache server creates it (owner-only, in /dev/shm where there is one) and hands out slots of
it; instances map it once and copy chunks between their KV cache and its slots themselves (on a
GPU host they register it for DMA), so a chunk never crosses a socket on its own host. The first
page holds a random token: an instance that reads the token the server named over the network in
its own mapping knows it shares the server's memory (it runs on the same host).

Slots are handed out by size: a freed slot serves the next chunk of its size. A deployment's
chunks are all one size (the KV of `chunk_size` tokens of one model), so the arena does not
fragment; chunks of other sizes get slots while unused space remains.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger("pdrun.storage")
PAGE = 4096  # slots start on a page: DMA and O_DIRECT-friendly
TOKEN_BYTES = 16


def _round(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


PREFIX = "pdrun-arena-"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def remove_stale(directory: Path) -> None:
    """Delete the arenas of cache servers that died without removing theirs (their memory is
    not free until the file is gone)."""
    for path in directory.glob(f"{PREFIX}*"):
        pid = path.name.removeprefix(PREFIX).split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()
                log.info("removed %s, the cache arena of a process that is gone", path)


def default_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class Arena:
    """A mapped shared-memory file; `create` also allocates its slots (the server's copy)."""

    def __init__(self, path: Path, size: int, mapping: mmap.mmap, owner: bool):
        self.path = path
        self.size = size
        self._map = mapping
        self.owner = owner
        self._top = PAGE  # slots are carved from here up
        self._free: dict[int, list[int]] = {}
        self.used = 0

    @classmethod
    def create(cls, size: int, directory: str | os.PathLike[str] | None = None) -> Arena:
        if size <= PAGE:
            raise ValueError(f"arena size must be more than {PAGE} bytes, got {size}")
        where = Path(directory or default_dir())
        remove_stale(where)
        path = where / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Allocated now: a full /dev/shm then fails here, with its name, not later with a SIGBUS.
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise OSError(e.errno, f"cannot allocate a {size}-byte arena in {path.parent}: {e.strerror}") from None
        os.close(fd)
        arena = cls(path, size, mapping, owner=True)
        arena.view(0, TOKEN_BYTES)[:] = secrets.token_bytes(TOKEN_BYTES)
        return arena

    @classmethod
    def attach(cls, path: str | os.PathLike[str], size: int) -> Arena:
        """Map the arena another process created; OSError if it is not here (another host)."""
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != size:
                raise OSError(f"{path} is not the {size}-byte arena it was said to be")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(Path(path), size, mapping, owner=False)

    @property
    def token(self) -> bytes:
        return bytes(self.view(0, TOKEN_BYTES))

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"{nbytes} bytes at {offset} are outside the {self.size}-byte arena")
        return memoryview(self._map)[offset : offset + nbytes]

    def buffer(self) -> memoryview:
        """The whole mapping (for a DMA registration or a tensor view over it)."""
        return memoryview(self._map)

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free slot of `nbytes` (rounded up to a page), or None when there is none."""
        size = _round(max(nbytes, 1))
        spare = self._free.get(size)
        if spare:
            offset = spare.pop()
        elif self._top + size <= self.size:
            offset, self._top = self._top, self._top + size
        else:
            return None
        self.used += size
        return offset

    def free(self, offset: int, nbytes: int) -> None:
        size = _round(max(nbytes, 1))
        self._free.setdefault(size, []).append(offset)
        self.used -= size
        if self.used == 0:  # all free: slots of any size can be carved again
            self._free.clear()
            self._top = PAGE

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):  # a view still exported: the process exits anyway
            self._map.close()
        if self.owner:
            self.path.unlink(missing_ok=True)

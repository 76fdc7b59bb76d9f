"""The cache tier through this host's shared memory (storage/local.py): chunks go between the paged
KV cache and the server's arena by the instance's own copies, never through a socket.

Storing a step's chunks costs one request for their slots (chunks the tier holds already are not
copied again) and one copy per chunk out of the KV cache, queued behind the forward pass (on a GPU
on a side stream, into the arena registered for DMA); a thread commits the slots once the copies
are done. Loading pins the chunks in memory, copies them into the request's blocks and unpins
them: chunks in memory by copies the engine's thread queues (`start_load`, polled with `finish`:
no thread to wake, no lock to take in between), chunks only on disk read into a slot of their own
by a loader thread (the next reader finds them in memory), where the scheduler found that reading
pays.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pdrun.pd.chunkmeta import ChunkMeta
from pdrun.pd.codec import PagedKV, Ready
from pdrun.pd.loader import ChunkLoader
from pdrun.storage.local import HELD, NO_ROOM, LocalClient, LocalError

log = logging.getLogger(__name__)

# chunks (and bytes) stored, chunks held already, chunks dropped, and the seconds a batch took
OnStored = Callable[[int, int, int, int, float], None]


@dataclass
class TierLoad:
    """Copies out of the arena queued for one request; its chunks stay pinned until `finish`."""

    lease: int
    ready: Ready | None  # None: done already (off a GPU)
    chunks: int
    started: float

    def done(self) -> bool:
        return self.ready is None or bool(self.ready.query())


class SharedTier:
    def __init__(self, client: LocalClient, paged: PagedKV, on_stored: OnStored):
        self.client = client
        self.paged = paged
        self.on_stored = on_stored
        self.memory = torch.frombuffer(client.arena.buffer(), dtype=torch.uint8)
        self.registered = False
        if paged.device.type == "cuda":
            t0 = time.perf_counter()
            err = torch.cuda.cudart().cudaHostRegister(self.memory.data_ptr(), self.memory.numel(), 0)
            self.registered = int(err) == 0
            log.info(
                "cache tier arena %s (%d GiB) %s for DMA in %.1f s",
                client.arena.path,
                self.memory.numel() >> 30,
                "registered" if self.registered else f"NOT registered (cudaError {int(err)}): copies will be slower",
                time.perf_counter() - t0,
            )
        self.failed = False  # the server did not answer: the caller reconnects
        self._loads = 0  # loads copying out of the arena now
        self._idle = threading.Condition()
        self._commits: queue.Queue[tuple[int, list[bytes], int, Ready | None, int, int, float] | None] = queue.Queue()
        self._committer = threading.Thread(target=self._commit_loop, name="pdrun-tier-commit", daemon=True)
        self._committer.start()

    def slot(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.memory[offset : offset + nbytes]

    # -- stores --
    def store(self, chunks: Sequence[tuple[bytes, Sequence[int]]]) -> bool:
        """Copy chunks (key, block ids) out of the KV cache into slots of the arena, committed
        behind; the copies are queued now, on the engine's thread, before vLLM reuses the blocks.
        False, with nothing copied, if the server did not answer (`failed`: it may have restarted)."""
        if not chunks:
            return True
        layout = self.paged.describe()
        sizes = [self.paged.nbytes(len(ids)) for _, ids in chunks]
        metas = [ChunkMeta(layout, len(ids)).encode() for _, ids in chunks]
        t0 = time.perf_counter()
        try:
            lease, slots = self.client.reserve([k for k, _ in chunks], sizes, metas)
        except LocalError as e:
            log.warning("cache tier store not taken: %s", e)
            self.failed = True
            return False
        keys: list[bytes] = []
        copied = 0  # bytes
        ready = None
        held = sum(1 for o in slots if o == HELD)
        dropped = sum(1 for o in slots if o == NO_ROOM)
        try:
            for (key, ids), nbytes, offset in zip(chunks, sizes, slots, strict=True):
                if offset >= 0:
                    ready = self.paged.gather(ids, self.slot(offset, nbytes))
                    keys.append(key)
                    copied += nbytes
        except Exception:  # the slots not filled are freed by the commit
            log.exception("copying chunks out to the cache tier failed")
            dropped += sum(1 for o in slots if o >= 0) - len(keys)
        if lease:
            self._commits.put((lease, keys, copied, ready, held, dropped, t0))  # the last copy queued ends them all
        else:
            self.on_stored(0, 0, held, dropped, 0.0)
        return True

    def _commit_loop(self) -> None:
        while (item := self._commits.get()) is not None:
            lease, keys, copied, ready, held, dropped, t0 = item
            try:
                if ready is not None:
                    ready.synchronize()
                self.client.commit(lease, keys)
            except Exception as e:  # the server frees the slots when it sees this process gone
                log.warning("committing %d chunks to the cache tier failed: %s", len(keys), e)
                self.failed = True
                dropped, keys, copied = dropped + len(keys), [], 0
            self.on_stored(len(keys), copied, held, dropped, time.perf_counter() - t0)
            self._commits.task_done()
        self._commits.task_done()

    def flush(self) -> None:
        self._commits.join()

    # -- loads --
    def start_load(self, keys: Sequence[bytes], loader: ChunkLoader) -> TierLoad:
        """Pin the leading chunks of `keys` the arena holds and queue their copies into the
        loader's blocks; the caller polls the load and ends it with `finish`."""
        t0 = time.perf_counter()
        try:
            lease, slots = self.client.read(keys)
        except LocalError:
            self.failed = True
            raise
        try:
            for slot in slots:
                loader.check(loader.chunks[loader.next], slot.meta, slot.nbytes)
                loader.place_from(self.slot(slot.offset, slot.nbytes))
            ready = loader.ready()
        except Exception:
            loader.settle()  # nothing reads the slots any more once the lease goes
            if lease:
                self.client.release(lease)
            raise
        with self._idle:
            self._loads += 1
        return TierLoad(lease, ready, len(slots), t0)

    def finish(self, load: TierLoad) -> bool:
        """Unpin a started load's chunks once its copies are done; whether they were pinned
        throughout (if not, what was copied may be another chunk's bytes)."""
        try:
            return self.client.release(load.lease) if load.lease else True
        except LocalError:
            self.failed = True
            return False
        finally:
            with self._idle:
                self._loads -= 1
                self._idle.notify_all()

    def load(self, keys: Sequence[bytes], loader: ChunkLoader, from_disk: bool) -> tuple[int, float]:
        """Place the chunks of `keys` (the loader's remaining chunks) that the tier holds, in order:
        those in memory, then (`from_disk`) those on disk. Returns the chunks read from disk and
        the seconds that took; the loader's progress says how far it got."""
        with self._idle:
            self._loads += 1
        try:
            return self._load(keys, loader, from_disk)
        except LocalError:
            self.failed = True
            raise
        finally:
            with self._idle:
                self._loads -= 1
                self._idle.notify_all()

    def _load(self, keys: Sequence[bytes], loader: ChunkLoader, from_disk: bool) -> tuple[int, float]:
        first, done, nbytes = loader.next, loader.done, loader.nbytes
        lease, slots = self.client.read(keys)
        try:
            for slot in slots:
                loader.check(loader.chunks[loader.next], slot.meta, slot.nbytes)
                loader.place_from(self.slot(slot.offset, slot.nbytes))
            loader.settle()
        finally:
            held = self.client.release(lease) if lease else True
        if not held:  # unpinned while copying: those bytes may be another chunk's
            loader.rewind(first, done, nbytes)
            raise LocalError("the cache server unpinned chunks before they were copied")
        read, t0 = 0, time.perf_counter()
        if from_disk and self.client.disk is not None:
            for key in keys[len(slots) :]:
                if not self._load_file(key, loader):
                    break
                read += 1
        return read, time.perf_counter() - t0

    def _load_file(self, key: bytes, loader: ChunkLoader) -> bool:
        chunk = self.client.disk_chunk(key)
        if chunk is None:
            return False
        nbytes = chunk.header.nbytes
        loader.check(loader.chunks[loader.next], chunk.header.meta, nbytes)
        lease, (offset,) = self.client.reserve([key], [nbytes], [dict(chunk.header.meta)], from_disk=True)
        # No slot (or another instance is reading it in now): into a buffer of this load's own.
        buf = self.slot(offset, nbytes) if offset >= 0 else torch.empty(nbytes, dtype=torch.uint8)
        try:
            chunk.read_into(memoryview(buf.numpy()))
        except Exception as e:
            self.client.damaged(key, e)
            if lease:
                self.client.commit(lease, [])
            return False
        loader.place_from(buf)
        loader.settle()
        if lease:
            self.client.commit(lease, [key])
        return True

    def retire(self, timeout_s: float = 60.0) -> None:
        """Close once no copy uses the arena any more (the server it belongs to was replaced)."""
        self.flush()
        with self._idle:
            self._idle.wait_for(lambda: self._loads == 0, timeout_s)
        self.close()

    def close(self) -> None:
        self._commits.put(None)
        self._committer.join(timeout=5)
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.memory.data_ptr())
        del self.memory
        self.client.close()


class TierLink:
    """A worker's way to the tier through its host's shared memory: the `current` SharedTier, or
    None from `get` while it is skipped after a failure (`retry_s`); then the server is asked again
    where its tier is (`reconnect`): a restarted server has another arena, and the old one is let
    go once no copy uses it."""

    def __init__(self, current: SharedTier | None, reconnect: Callable[[], LocalClient | None], retry_s: float):
        self.current = current
        self._reconnect = reconnect
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._retry_at = 0.0

    def get(self) -> SharedTier | None:
        with self._lock:
            tier = self.current
            if tier is None or not tier.failed:
                return tier
            if time.monotonic() < self._retry_at:
                return None
            self._retry_at = time.monotonic() + self._retry_s
            fresh = self._reconnect()
            if fresh is None:
                return None
            if fresh.info.token == tier.client.info.token:  # the same server: it failed a call, not died
                fresh.close()
                tier.failed = False
                return tier
            self.current = SharedTier(fresh, tier.paged, tier.on_stored)
            threading.Thread(target=tier.retire, name="pdrun-tier-retire", daemon=True).start()
            log.info("cache tier restarted: now through its new arena %s", fresh.info.arena)
            return self.current

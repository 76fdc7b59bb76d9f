"""The cache tier through this host's shared memory (storage/local.py): chunks go between the paged
KV cache and the server's arena by the instance's own copies, never through a socket.

Storing a step's chunks costs one request for their slots (chunks the tier holds already are not
copied again) and one copy per chunk out of the KV cache, queued behind the forward pass (on a GPU
on a side stream, into the arena registered for DMA); a thread commits the slots once the copies
are done. Chunks the tier said it held within HELD_FOR_S (a warm request recomputes its prompt's
last chunk) cost no request on the engine's thread: that thread only tells the server, behind, that
the prompt was used again. Loading pins the chunks in memory, copies them into the request's blocks
and unpins them: chunks in memory by copies the engine's thread queues (`start_load`, polled with `finish`:
no thread to wake, no lock to take in between), chunks only on disk read into a slot of their own
by a loader thread (the next reader finds them in memory), where the scheduler found that reading
pays.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from pdrun.pd.chunkmeta import ChunkMeta
from pdrun.pd.codec import PagedKV, Ready
from pdrun.pd.loader import ChunkLoader
from pdrun.storage.local import HELD, MAX_KEYS, NO_ROOM, LocalClient, LocalError

log = logging.getLogger(__name__)

# chunks (and bytes) stored, chunks held already, chunks the tier had no room for, chunks whose
# copy or commit failed, and the seconds a batch took
OnStored = Callable[[int, int, int, int, int, float], None]

# How long a chunk the tier said it holds (or took) is taken to be held still, and not offered again:
# should the tier evict it meanwhile, it is missing until a store after that.
HELD_FOR_S = 2.0


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
            with torch.cuda.device(paged.device):  # this worker's GPU, whichever thread maps a new arena
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
        self._users = 0  # threads between `enter` and `leave`, and loads copying out of the arena now
        self._idle = threading.Condition()
        self._held: OrderedDict[bytes, float] = OrderedDict()  # chunks the tier said it holds lately, and when
        self._held_lock = threading.Lock()
        self._commits: queue.Queue[Callable[[], None] | None] = queue.Queue()  # work behind the engine's thread
        self._committer = threading.Thread(target=self._commit_loop, name="pdrun-tier-commit", daemon=True)
        self._committer.start()

    def slot(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.memory[offset : offset + nbytes]

    def enter(self) -> None:
        """A thread about to use the arena: it stays mapped until the matching `leave`."""
        with self._idle:
            self._users += 1

    def leave(self) -> None:
        with self._idle:
            self._users -= 1
            self._idle.notify_all()

    # -- stores --
    def store(self, chunks: Sequence[tuple[bytes, Sequence[int]]], order: Sequence[bytes] = ()) -> bool:
        """Copy chunks (key, block ids) out of the KV cache into slots of the arena, committed
        behind; the copies are queued now, on the engine's thread, before vLLM reuses the blocks.
        `order`: the prompts' chunks up to these, in order (see `LocalClient.reserve`). False, with
        nothing copied, if the server did not answer (`failed`: it may have restarted)."""
        if not chunks:
            return True
        order = order if len(order) <= MAX_KEYS else ()  # a prompt past the limit: these chunks' order only
        known = self._held_lately([k for k, _ in chunks])
        if len(known) == len(chunks):
            self._commits.put(functools.partial(self._touch, list(order) or [k for k, _ in chunks]))
            self.on_stored(0, 0, len(known), 0, 0, 0.0)
            return True
        chunks = [c for c in chunks if c[0] not in known]
        layout = self.paged.describe()
        sizes = [self.paged.nbytes(len(ids)) for _, ids in chunks]
        metas = [ChunkMeta(layout, len(ids)).encode() for _, ids in chunks]
        t0 = time.perf_counter()
        try:
            lease, slots = self.client.reserve([k for k, _ in chunks], sizes, metas, order=order)
        except LocalError as e:
            log.warning("cache tier store not taken: %s", e)
            self.failed = True
            return False
        keys: list[bytes] = []
        copied = 0  # bytes
        ready = None
        held = len(known) + sum(1 for o in slots if o == HELD)
        self._now_held([k for (k, _), o in zip(chunks, slots, strict=True) if o == HELD])
        no_room = sum(1 for o in slots if o == NO_ROOM)
        failed = 0
        try:
            for (key, ids), nbytes, offset in zip(chunks, sizes, slots, strict=True):
                if offset >= 0:
                    ready = self.paged.gather(ids, self.slot(offset, nbytes))
                    keys.append(key)
                    copied += nbytes
        except Exception:  # the slots not filled are freed by the commit
            log.exception("copying chunks out to the cache tier failed")
            failed = sum(1 for o in slots if o >= 0) - len(keys)
        if lease:  # the last copy queued ends them all
            self._commits.put(functools.partial(self._commit, lease, keys, copied, ready, held, no_room, failed, t0))
        else:
            self.on_stored(0, 0, held, no_room, failed, 0.0)
        return True

    def _held_lately(self, keys: Sequence[bytes]) -> set[bytes]:
        """Those of `keys` the tier said it holds within HELD_FOR_S."""
        recent = time.monotonic() - HELD_FOR_S
        with self._held_lock:
            while self._held and next(iter(self._held.values())) < recent:
                self._held.popitem(last=False)
            return {k for k in keys if k in self._held}

    def _now_held(self, keys: Sequence[bytes]) -> None:
        now = time.monotonic()
        with self._held_lock:
            for key in keys:
                self._held[key] = now
                self._held.move_to_end(key)

    def _commit(
        self, lease: int, keys: list[bytes], copied: int, ready: Ready | None, held: int, no_room: int, failed: int,
        t0: float,
    ) -> None:  # fmt: skip
        try:
            if ready is not None:
                ready.synchronize()
            self.client.commit(lease, keys)
            self._now_held(keys)
        except Exception as e:  # the server frees the slots when it sees this process gone
            log.warning("committing %d chunks to the cache tier failed: %s", len(keys), e)
            self.failed = True
            failed, keys, copied = failed + len(keys), [], 0
        self.on_stored(len(keys), copied, held, no_room, failed, time.perf_counter() - t0)

    def _touch(self, order: list[bytes]) -> None:
        """A prompt whose chunks the tier holds was used again: its chunks become the newest."""
        try:
            self.client.touch(order)
        except LocalError as e:
            log.warning("telling the cache tier a prompt was used again failed: %s", e)
            self.failed = True

    def _commit_loop(self) -> None:
        while (work := self._commits.get()) is not None:
            try:
                work()
            except Exception:  # never stops the commits behind it
                log.exception("cache tier work behind the engine's thread failed")
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
            lease, slots = self.client.read(keys) if keys else (0, [])
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
        self.enter()  # until `finish`: the copies read the arena
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
            self.leave()

    def load(self, keys: Sequence[bytes], loader: ChunkLoader, from_disk: bool) -> tuple[int, float]:
        """Place the chunks of `keys` (the loader's remaining chunks) that the tier holds, in order:
        those in memory, then (`from_disk`) those on disk. Returns the chunks read from disk and
        the seconds that took; the loader's progress says how far it got."""
        self.enter()
        try:
            return self._load(keys, loader, from_disk)
        except LocalError:
            self.failed = True
            raise
        finally:
            self.leave()

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
        """Close once no thread and no copy uses the arena any more (the server it belongs to was
        replaced): its memory is the old server's, freed once the last instance lets go of it."""
        with self._idle:
            self._idle.wait_for(lambda: self._users == 0, timeout_s)
        self.flush()
        self.close()

    def close(self) -> None:
        self._commits.put(None)
        self._committer.join(timeout=5)
        if self.registered:
            with torch.cuda.device(self.paged.device):
                torch.cuda.cudart().cudaHostUnregister(self.memory.data_ptr())
        del self.memory
        self.client.close()


class TierLink:
    """A worker's way to the tier through its host's shared memory: the `current` SharedTier, or
    None from `use` while it is skipped after a failure (`retry_s`); then the server is asked again
    where its tier is (`reconnect`): a restarted server has another arena, and the old one is let
    go once no thread or copy uses it. With `watch`, a restarted server is found without waiting
    for a failure: an idle instance does not keep the old arena's memory alive beside the new."""

    def __init__(self, current: SharedTier | None, reconnect: Callable[[], LocalClient | None], retry_s: float):
        self.current = current
        self._reconnect = reconnect
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._watch: ArenaWatch | None = None

    @contextlib.contextmanager
    def use(self) -> Iterator[SharedTier | None]:
        """The current tier (None while it is skipped), kept mapped until the block ends (a
        store's copies are queued into it there): a restart found meanwhile retires it only after."""
        with self._lock:
            tier = self._get()
            if tier is not None:
                tier.enter()
        try:
            yield tier
        finally:
            if tier is not None:
                tier.leave()

    def _get(self) -> SharedTier | None:
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
        self._swap(tier, SharedTier(fresh, tier.paged, tier.on_stored))
        return self.current

    def _swap(self, old: SharedTier, new: SharedTier) -> None:
        self.current = new
        threading.Thread(target=old.retire, name="pdrun-tier-retire", daemon=True).start()
        log.info("cache tier restarted: now through its new arena %s", new.client.info.arena)

    def watch(self, token_now: Callable[[], str | None], interval_s: float) -> None:
        """Move to a restarted server's arena as soon as `token_now` (the server's, asked every
        `interval_s`) names another, not at the next use that fails."""
        self._watch = ArenaWatch(token_now, self._token, self._replaced, interval_s)

    def _token(self) -> str | None:
        tier = self.current
        return None if tier is None or tier.failed else tier.client.info.token

    def _replaced(self) -> None:
        """The watch found another arena: mapped (and registered for DMA, which takes seconds for
        a large arena) outside the lock, so the engine's stores and loads go on meanwhile."""
        tier = self.current
        fresh = self._reconnect() if tier is not None else None
        if tier is None or fresh is None:
            return
        new = SharedTier(fresh, tier.paged, tier.on_stored)
        with self._lock:
            if self.current is tier and fresh.info.token != tier.client.info.token:
                self._swap(tier, new)
                return
        new.close()  # another thread moved first, or the server answered for the old arena

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self.current is not None:
            self.current.close()


class ArenaWatch:
    """Every `interval_s`, asks which arena the cache server serves now (`token_now`: its token,
    None when it does not answer) and calls `replaced` when it is not `current()`'s (None: nothing
    to compare, as while the tier is skipped after a failure)."""

    def __init__(
        self,
        token_now: Callable[[], str | None],
        current: Callable[[], str | None],
        replaced: Callable[[], None],
        interval_s: float,
    ):
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    ours = current()
                    theirs = token_now() if ours is not None else None
                    if theirs is not None and theirs != ours:
                        replaced()
                except Exception:  # never this thread's end: asked again next time
                    log.debug("cache tier watch failed", exc_info=True)

        threading.Thread(target=loop, name="pdrun-tier-watch", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

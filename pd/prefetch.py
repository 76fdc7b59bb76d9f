"""A prompt's prefix copied out of the cache tier's arena into the GPU before vLLM sees the request
(`cache_prefetch_gb`), on the proxy's hint.

The proxy sends a decoder-only completion's body to the worker of the instance it picked the moment
it picks it (a zmq PUSH, never waited for). The worker reads the prompt's token ids out of it (a
completion given as text or anything vLLM would refuse is no hint), names the prompt's chunks as the
scheduler will (pd/keys.py), pins the leading ones the arena holds and copies them into a pool of
device memory on a stream of its own, while vLLM's front end still parses and tokenizes the
request. When the scheduler then loads the prefix, the chunks found here are scattered from device
memory (their copies waited for on the GPU, not on the host) and only the rest comes from the
arena: the bus's time overlaps the front end's instead of following it.

A hint costs a read of the tier's index, and where the arena holds the prefix copies over the bus,
IN_FLIGHT at a time, skipping the head vLLM's own cache holds: the scheduler beside this worker
tells it, at each lookup and as each request finishes, the deepest chunk vLLM's cache holds of that
prompt (`vllm_holds`; the chunks' keys are chained, so that key names the whole head), which stops
a hint under way there and spares the hints of later prompts that begin with that head, for
COPY_TTL_S and until vLLM has since computed as many tokens as its cache holds besides that head
(they may have evicted it). A copy no load takes within COPY_TTL_S is dropped. A full pool gives no
copy up for a later hint's: vLLM schedules requests in the order they came, so the earlier hint's
copies are the ones wanted first (the later request loads what was not copied from the arena, as
without a hint). A copy is used only once its pins were confirmed held throughout; a load that took
it waits for that (microseconds after its copy), and one whose pins were not is recomputed, never
served.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch
import zmq

from pdrun.pd.codec import PagedKV, Ready
from pdrun.pd.keys import chained_keys, rank_key, salted
from pdrun.pd.plan import tier_reach
from pdrun.pd.stats import StatsCounter
from pdrun.pd.tier import TierLink
from pdrun.storage.local import LocalError

log = logging.getLogger(__name__)

POLL_MS = 200  # how soon the hint thread sees `close`
CHECK_WAIT_S = 5.0  # longest a load waits to hear that the pins of its copies held
QUEUED_WAIT_S = 0.05  # longest a load waits for a hint under way to queue its copies
# Copies a hint keeps crossing the bus at once: enough to keep it busy, few enough that the engine's
# own small copies to the GPU (a step's inputs) never wait behind a whole prompt's.
IN_FLIGHT = 4
# A copy no load took this long after its hint was not needed (vLLM's cache held the prefix, or the
# request went elsewhere): it is dropped, not kept as a second cache beside vLLM's own. Also how long
# a head vLLM's cache held is taken to be held still.
COPY_TTL_S = 1.0

# This process's pools by hint port: the scheduler beside the worker (one worker, one process) tells
# its pool what vLLM's own cache holds.
_POOLS: dict[int, Prefetch] = {}


class _Hinted(msgspec.Struct):
    """What a hint reads of the completion request it carries."""

    prompt: Any = None
    cache_salt: Any = None


@dataclass
class Fetched:
    """One chunk's copy in the pool."""

    key: bytes
    slot: int
    data: torch.Tensor  # the chunk's bytes, as in the arena
    meta: dict[str, Any]
    copied: torch.cuda.Event | None  # None: copied already (off a GPU)
    made: float = field(default_factory=time.monotonic)
    checked: threading.Event = field(default_factory=threading.Event)
    held: bool = False  # its pins held until the copy was done (set before `checked`)


class Prefetch:
    def __init__(
        self,
        paged: PagedKV,
        tiers: TierLink,
        seed: bytes,
        chunk_size: int,
        rank: int,
        budget_bytes: int,
        port: int,
        stats: StatsCounter,
    ):
        self.paged = paged
        self.stats = stats
        self.tiers = tiers
        self.seed = seed
        self.chunk_size = chunk_size
        self.rank = rank
        self.slot_bytes = paged.nbytes(-(-chunk_size // paged.block_size))
        self.slots = slots = budget_bytes // self.slot_bytes
        if slots < 1:
            raise ValueError(
                f"a pool of {budget_bytes / (1 << 30):.3g} GiB holds no chunk ({self.slot_bytes >> 20} MiB each)"
            )
        self.pool = paged.device_buffer(slots * self.slot_bytes)
        self._free = list(range(slots))
        self._draining: list[tuple[list[int], Ready | None]] = []  # slots a load still reads, until it is done
        self._copies: OrderedDict[bytes, Fetched] = OrderedDict()  # by key, oldest first
        self._coming: set[bytes] = set()  # keys the hint under way is yet to queue the copies of
        self._hurry = False  # a load waits for them: queue the rest at once
        # Keys of the deepest chunks vLLM's cache held of the prompts it looked up lately, and when:
        # a hint copies nothing up to such a chunk. `_marks` counts them, for a hint to see a new one.
        self._vllm_held: dict[bytes, tuple[float, int]] = {}  # key -> when, and `computed` by which it lapses
        self._marks = 0
        self.computed = 0  # tokens vLLM's steps computed so far (set by the scheduler beside this worker)
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # notified as copies are queued
        self._stream = torch.cuda.Stream(paged.device) if paged.device.type == "cuda" else None
        self._closing = threading.Event()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self.port = port
        self._socket.bind(f"tcp://127.0.0.1:{port}")
        self._thread = threading.Thread(target=self._serve, name="pdrun-prefetch", daemon=True)
        self._thread.start()
        _POOLS[port] = self
        log.info("cache tier prefetch: %d chunks (%.1f GiB) of %s memory, hints on 127.0.0.1:%d",
                 slots, slots * self.slot_bytes / (1 << 30), paged.device, port)  # fmt: skip

    @staticmethod
    def on_port(port: int | None) -> Prefetch | None:
        """The pool of this process that takes hints on `port`, if any."""
        return _POOLS.get(port) if port is not None else None

    # -- the hint thread --
    def _serve(self) -> None:
        if self._stream is not None:
            torch.cuda.set_device(self.paged.device)
        while not self._closing.is_set():
            if not self._socket.poll(POLL_MS):
                continue
            try:
                self.hint_request(self._socket.recv(zmq.NOBLOCK))
            except Exception:  # a tier gone: the load goes to the arena as usual
                log.debug("prefetch hint dropped", exc_info=True)

    def hint_request(self, request: bytes) -> int:
        """Copy in what the arena holds of the prompt of the completion `request` (its JSON body);
        the number of chunks copied. A prompt given as text, or anything but token ids, is no hint
        (vLLM answers the request with why)."""
        try:
            body = msgspec.json.decode(request, type=_Hinted)
            if not isinstance(body.prompt, list) or not body.prompt or not isinstance(body.cache_salt, str | None):
                return 0
            tokens = array("I", body.prompt)
        except (msgspec.DecodeError, TypeError, OverflowError):
            return 0
        return self.hint(body.cache_salt, tokens)

    def hint(self, salt: str | None, tokens: Sequence[int]) -> int:
        """Copy in the leading chunks of the prompt `tokens` the arena holds; the number of chunks
        copied."""
        t0 = time.perf_counter()
        chunks, _ = tier_reach(len(tokens), self.chunk_size, self.paged.block_size)  # as the scheduler's lookup
        keys = chained_keys(salted(self.seed, salt), self.chunk_size, tokens[: chunks * self.chunk_size])
        keys = [rank_key(k, self.rank) for k in keys]
        want: list[bytes] = []  # the first run of chunks not copied in yet
        with self._lock:
            self._drop_stale()
            held = 0  # of the prompt's head, copied in already
            for key in keys[self._past_vllms(keys) :]:
                if key in self._copies:
                    if want:
                        break
                    self._copies.move_to_end(key)
                    held += 1
                else:
                    want.append(key)
            want = want[: self.slots - held]  # a prompt longer than the pool keeps its head
            self._coming, self._hurry = set(want), False
        copied = 0
        try:
            copied = self._copy_in(want, keys)
            return copied
        finally:
            with self._queued:
                self._coming = set()
                self._queued.notify_all()
            log.debug("hint at %.4f: %d of %d chunks copied in (%d held already) in %.1f ms",
                      t0, copied, len(keys), held, (time.perf_counter() - t0) * 1e3)  # fmt: skip

    def _copy_in(self, want: list[bytes], keys: list[bytes]) -> int:
        if not want:
            return 0
        with self.tiers.use() as tier:
            if tier is None:
                return 0
            with self._queued:
                room = self._room(len(want))
                want = want[: len(room)]
                self._coming.intersection_update(want)  # a load waits for no chunk that has no room
                self._queued.notify_all()
            if not want:
                return 0
            try:
                lease, slots = tier.client.read(want)  # the arena stays mapped until the block ends
            except BaseException:
                with self._lock:
                    self._free += room
                raise
            fetched: list[Fetched] = []
            try:
                with self._queued:
                    for key, slot, at in zip(want, slots, room, strict=False):
                        data = self.pool[at * self.slot_bytes : at * self.slot_bytes + slot.nbytes]
                        fetched.append(Fetched(key, at, data, dict(slot.meta), None))
                    self._free += room[len(fetched) :]
                    self._coming.intersection_update(f.key for f in fetched)  # the arena's leading run only
                    self._queued.notify_all()
                crossing: deque[torch.cuda.Event] = deque()
                skipped: set[int] = set()
                first = keys.index(want[0])  # `want` is a run of the prompt's chunks
                seen, past = -1, 0
                with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                    for i, (f, slot) in enumerate(zip(fetched, slots, strict=False)):
                        if self._marks != seen:  # the scheduler told of a head vLLM's cache holds
                            seen, past = self._marks, self._past_vllms(keys)
                        if first + i < past:  # vLLM's cache holds it now
                            with self._queued:
                                self._free.append(f.slot)
                                self._coming.discard(f.key)
                                self._queued.notify_all()
                            skipped.add(i)
                            continue
                        if len(crossing) >= IN_FLIGHT and not self._hurry:
                            crossing.popleft().synchronize()
                        f.data.copy_(tier.slot(slot.offset, slot.nbytes), non_blocking=True)
                        f.copied = self._copied()
                        if f.copied is not None:
                            crossing.append(f.copied)
                        with self._queued:
                            self._copies[f.key] = f
                            self._coming.discard(f.key)
                            self._queued.notify_all()
                fetched = [f for i, f in enumerate(fetched) if i not in skipped]
                for event in crossing:
                    event.synchronize()
            finally:
                held = False
                with contextlib.suppress(LocalError):
                    held = tier.client.release(lease) if lease else True
                for f in fetched:
                    f.held = held
                    f.checked.set()
        self.stats.add(cache_prefetch_copied_tokens=len(fetched) * self.chunk_size)
        return len(fetched)

    def _past_vllms(self, keys: list[bytes]) -> int:
        """How many of the leading `keys` vLLM's cache held lately (their deepest told by the scheduler)."""
        recent, computed = time.monotonic() - COPY_TTL_S, self.computed
        for i in range(len(keys) - 1, -1, -1):
            when, lapses = self._vllm_held.get(keys[i], (0.0, 0))
            if when > recent and computed < lapses:
                return i + 1
        return 0

    def _copied(self) -> torch.cuda.Event | None:
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def _room(self, n: int) -> list[int]:
        """Up to `n` free slots: those loads are done reading and those of copies no load took in
        time; a copy still awaiting its load keeps its slot (lock held)."""
        still = []
        for slots, reading in self._draining:
            if reading is None or reading.query():
                self._free += slots
            else:
                still.append((slots, reading))
        self._draining = still
        self._drop_stale()
        room, self._free = self._free[:n], self._free[n:]
        return room

    def _drop_stale(self) -> None:
        """Free the copies no load took in time (lock held)."""
        stale = time.monotonic() - COPY_TTL_S
        for f in [f for f in self._copies.values() if f.made < stale and f.checked.is_set()]:
            del self._copies[f.key]
            self._free.append(f.slot)

    # -- the engine's thread --
    def vllm_holds(self, deepest: bytes, room_besides: int) -> None:
        """vLLM's cache holds a prompt's chunks up to and including the one keyed `deepest`, and
        room for `room_besides` tokens more: a hint copying them stops there (what it copied ages out
        unused), and one for a prompt with that head copies only what follows it, for COPY_TTL_S and
        until vLLM has computed `room_besides` tokens more."""
        now = time.monotonic()
        with self._lock:
            self._vllm_held = {k: m for k, m in self._vllm_held.items() if m[0] > now - COPY_TTL_S}
            self._vllm_held[rank_key(deepest, self.rank)] = (now, self.computed + room_besides)
            self._marks += 1

    def take(self, keys: Sequence[bytes]) -> list[Fetched]:
        """The copies of the leading `keys` held here, now the caller's: it scatters them after
        their `copied`, checks them with `good` and hands them back with `done_with`."""
        taken: list[Fetched] = []
        deadline = time.monotonic() + QUEUED_WAIT_S
        for key in keys:
            with self._queued:
                while key in self._coming and key not in self._copies:  # the hint under way copies it now
                    self._hurry = True
                    if not self._queued.wait(deadline - time.monotonic()):
                        break
                f = self._copies.pop(key, None)
            if f is not None and time.monotonic() - f.made > COPY_TTL_S:
                self.done_with([f])
                f = None
            if f is None:
                break
            taken.append(f)
        log.debug("load at %.4f: %d of %d chunks copied in ahead", time.perf_counter(), len(taken), len(keys))
        return taken

    @staticmethod
    def good(taken: Sequence[Fetched]) -> bool:
        """Whether the taken copies' pins held throughout their copies (else their bytes may be another chunk's)."""
        return all(f.checked.wait(CHECK_WAIT_S) and f.held for f in taken)

    def done_with(self, taken: Sequence[Fetched], reading: Ready | None = None) -> None:
        """The taken copies' slots are free once `reading` (what reads them; None: nothing now) is done."""
        if taken:
            with self._lock:
                self._draining.append(([f.slot for f in taken], reading))

    def close(self) -> None:
        if _POOLS.get(self.port) is self:
            del _POOLS[self.port]
        self._closing.set()
        self._thread.join(timeout=5)
        self._socket.close(0)
        self._context.term()

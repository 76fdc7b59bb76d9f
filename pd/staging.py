"""The producer's staging pool: chunk buffers waiting for decoders to pull them.

A prefiller copies each finished chunk of a hand-off out of its paged KV cache into a buffer here
(so its blocks are free again at once) and serves the buffers over its transfer endpoint. Each
buffer is referenced by the transfers (requests) that handed it off; a decoder releases its
transfer after pulling, and a transfer nobody released expires after `ttl_s`. Unreferenced buffers
stay as a small cache until their room is needed. Under memory pressure the least recently used
buffers go first, unreferenced ones before referenced ones. While hand-offs that decoders are yet
to pull hold the room a new chunk needs, the chunk waits for their releases, up to `wait_s`: the
prefiller pauses rather than evict what a decoder is about to pull. Past that (a decoder that never
comes), the oldest referenced buffers go, and their decoder prefills locally instead. The scheduler
keeps it from coming to that: it admits a prefill only while its hand-off fits (pd/staging_room.py),
told the pool's room and the transfers let go (`take_let_go`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pdrun.pd.chunkmeta import LayerMeta, RunMeta
from pdrun.pd.codec import Ready
from pdrun.pd.params import MAX_FRAME_CHUNKS, MAX_HANDOFF_KEYS
from pdrun.storage.server import keys_from
from pdrun.transfer import Frame, Header, Service

log = logging.getLogger(__name__)

GONE_KEPT = 4096  # released transfers remembered, so that one is reported let go once


@dataclass
class Staged:
    buffer: torch.Tensor  # flat uint8, in host or GPU memory
    blocks: int
    transfers: set[str] = field(default_factory=set)
    ready: Ready | None = None  # the copy into `buffer` may still be running until this is done

    def payload(self) -> Any:
        """The bytes to send, once the copy that fills them is done: a GPU buffer as is (the ucx
        transport moves device memory), a host one as a memoryview."""
        self._filled()
        return self.buffer if self.buffer.is_cuda else memoryview(self.buffer.numpy())

    def layer(self, index: int, layers: int) -> torch.Tensor:
        """Layer `index` of the chunk (a chunk is layer-major), once the copy that fills it is done."""
        self._filled()
        size = self.buffer.numel() // layers
        return self.buffer[index * size : (index + 1) * size]

    def _filled(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


def host_allocator(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class StagingPool:
    def __init__(
        self,
        budget_bytes: int,
        ttl_s: float,
        allocate: Callable[[int], torch.Tensor] = host_allocator,
        wait_s: float = 0.0,
    ):
        self.budget = budget_bytes
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self._allocate = allocate
        self._entries: OrderedDict[bytes, Staged] = OrderedDict()  # least recently used first
        self._transfers: dict[str, tuple[set[bytes], float]] = {}
        self._handed: set[str] = set()  # transfers whose request finished: a decoder will pull them
        self._bytes = 0
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self.evicted_referenced = 0
        self.waited_s = 0.0  # time chunks waited for room
        self._let_go: list[str] = []  # transfers that hold no room any more, since `take_let_go`
        self._gone: OrderedDict[str, None] = OrderedDict()  # the latest transfers released (reported once)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def held(self) -> int:
        """Hand-offs staged and not yet released (nor expired)."""
        with self._lock:
            self._expire(time.monotonic())
            return len(self._transfers)

    def stage(
        self, transfer: str, key: bytes, blocks: int, nbytes: int, fill: Callable[[torch.Tensor], Ready | None]
    ) -> bool:
        """Make chunk `key` available under `transfer`, calling `fill(buffer)` unless it is already
        staged (fill may return what to wait for before the buffer is read). Returns False when it
        cannot fit the budget at all."""
        if self.reference(transfer, key):
            return True
        buf = self.allocate(nbytes)
        if buf is None:
            return False
        self.commit(transfer, key, blocks, buf, fill(buf))
        return True

    def reference(self, transfer: str, key: bytes) -> bool:
        """If chunk `key` is staged, reference it under `transfer` too (True)."""
        with self._lock:
            self._expire(time.monotonic())
            entry = self._entries.get(key)
            if entry is None:
                return False
            self._entries.move_to_end(key)
            self._reference(transfer, key, entry)
            return True

    def allocate(self, nbytes: int) -> torch.Tensor | None:
        """A buffer for a chunk to `commit` once it is filled; None if the chunk cannot fit the budget."""
        if nbytes > self.budget:
            log.warning("a %d-byte chunk does not fit the %d-byte staging budget; not staged", nbytes, self.budget)
            return None
        return self._allocate(nbytes)

    def commit(self, transfer: str, key: bytes, blocks: int, buf: torch.Tensor, ready: Ready | None) -> Staged:
        """Serve `buf` (from `allocate`, being filled until `ready`) as chunk `key` under `transfer`:
        room is made for it first; a chunk staged meanwhile under the same key stays, `buf` is dropped."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._make_room(buf.numel())
                entry = Staged(buf, blocks, ready=ready)
                self._entries[key] = entry
                self._bytes += buf.numel()
            self._entries.move_to_end(key)
            self._reference(transfer, key, entry)
            return entry

    def get(self, key: bytes) -> Staged | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def release(self, transfer: str) -> None:
        with self._lock:
            self._release(transfer)

    def handed(self, transfer: str) -> None:
        """`transfer`'s request finished and was handed to a decoder, which will pull and release it."""
        with self._lock:
            if transfer in self._transfers:
                self._handed.add(transfer)
            elif transfer not in self._gone:  # nothing staged: it holds no room
                self._let_go.append(transfer)

    def take_let_go(self) -> list[str]:
        """The transfers released, expired or handed with nothing staged since the last call: the
        scheduler stops counting their room."""
        with self._lock:
            let_go, self._let_go = self._let_go, []
            return let_go

    def _reference(self, transfer: str, key: bytes, entry: Staged) -> None:
        entry.transfers.add(transfer)
        keys, _ = self._transfers.get(transfer, (set(), 0.0))
        keys.add(key)
        self._transfers[transfer] = (keys, time.monotonic() + self.ttl_s)

    def _release(self, transfer: str) -> None:
        if transfer in self._transfers:
            self._let_go.append(transfer)
            self._gone[transfer] = None  # its decoder may release it before the worker learns it was handed
            if len(self._gone) > GONE_KEPT:
                self._gone.popitem(last=False)
        keys, _ = self._transfers.pop(transfer, (set(), 0.0))
        self._handed.discard(transfer)
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.transfers.discard(transfer)
        self._released.notify_all()

    def _expire(self, now: float) -> None:
        for transfer in [t for t, (_, deadline) in self._transfers.items() if deadline < now]:
            log.info("staged transfer %s expired before any decoder released it", transfer)
            self._release(transfer)

    def _make_room(self, nbytes: int) -> None:
        self._evict(nbytes, referenced=False)
        if self._bytes + nbytes > self.budget and self.wait_s > 0 and self._awaited():
            # Decoders will release what they pull: wait for that rather than evict it.
            t0 = time.monotonic()
            deadline = t0 + self.wait_s
            while self._bytes + nbytes > self.budget and self._awaited() and time.monotonic() < deadline:
                self._released.wait(deadline - time.monotonic())
                self._expire(time.monotonic())
                self._evict(nbytes, referenced=False)
            self.waited_s += time.monotonic() - t0
        self._evict(nbytes, referenced=True)

    def _awaited(self) -> bool:
        """Whether chunks of handed-off transfers are staged: their decoders will release them."""
        return any(key in self._entries for t in self._handed for key in self._transfers.get(t, ((), 0))[0])

    def _evict(self, nbytes: int, referenced: bool) -> None:
        if self._bytes + nbytes <= self.budget:
            return
        for key in [k for k, e in self._entries.items() if bool(e.transfers) == referenced]:
            entry = self._entries.pop(key)
            self._bytes -= entry.buffer.numel()
            if referenced:
                self.evicted_referenced += 1
                log.warning(
                    "staging pool full (%d bytes): evicted a chunk still awaited by %s; "
                    "that decoder will prefill locally",
                    self.budget,
                    ", ".join(sorted(entry.transfers)),
                )
            if self._bytes + nbytes <= self.budget:
                return


def _back_to_back(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `b` starts where `a` ends, in the same allocation: the two can be sent as one."""
    return (
        a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.data_ptr() + a.numel() == b.data_ptr()
    )


def _joinable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether chunk buffer `b` can follow `a` in one frame: back to back, or both in one GPU's memory."""
    return _back_to_back(a, b) or (a.is_cuda and a.device == b.device)


def _not_staged(key: bytes) -> KeyError:
    return KeyError(f"chunk {key.hex()} is not staged here (expired, evicted or never produced)")


def _frame_chunks(meta: dict[str, Any]) -> int:
    most = meta.get("chunks_per_frame", 1)
    if not isinstance(most, int) or isinstance(most, bool) or not 1 <= most <= MAX_FRAME_CHUNKS:
        raise ValueError(f"'chunks_per_frame' must be an integer from 1 to {MAX_FRAME_CHUNKS}, got {most!r:.50}")
    return most


class StagingService(Service):
    """Serves a staging pool: "get" streams chunks in the order asked, a chunk a frame (or with
    "chunks_per_frame" N up to N adjacent ones that can travel as one), stopping with an error at
    the first one not staged; with "by_layer" (a decoder loading layer by layer), layer 0 of every
    chunk asked, then layer 1, ..., after checking that every chunk is staged: a frame per layer
    of a chunk, or with "whole_layers" per layer of all of them;
    "release" drops a transfer's references; "ping" names the layout, the chunks staged and the
    hand-offs held (not yet released)."""

    def __init__(
        self,
        pool: StagingPool,
        layout: str,
        on_served: Callable[[int], None] | None = None,
        layers: int | None = None,  # layers per chunk (a chunk is layer-major): needed for "by_layer"
    ):
        self.pool = pool
        self.layout = layout
        self.layers = layers
        self._on_served = on_served or (lambda nbytes: None)
        self._join_streams: dict[torch.device, torch.cuda.Stream] = {}

    def receive_buffer(self, header: Header) -> Any:
        raise ValueError("requests to a staging endpoint carry no payload")

    def handle(self, request: Header, payload: Any) -> Iterator[Frame]:
        if request.op == "get" and request.meta.get("by_layer"):
            keys = keys_from(request.meta, MAX_HANDOFF_KEYS)
            return (yield from self._by_layer(keys, bool(request.meta.get("whole_layers"))))
        if request.op == "get":
            keys = keys_from(request.meta, MAX_HANDOFF_KEYS)
            return (yield from self._in_frames(keys, _frame_chunks(request.meta)))
        if request.op == "release":
            transfer = request.meta.get("transfer")
            if not isinstance(transfer, str):
                raise ValueError("'transfer' must be a string")
            self.pool.release(transfer)
            return {}
        if request.op == "ping":
            return {"layout": self.layout, "staged": len(self.pool), "held": self.pool.held()}
        raise ValueError(f"unknown op {request.op!r} (this endpoint serves get, release, ping)")

    def _staged(self, key: bytes) -> Staged:
        entry = self.pool.get(key)
        if entry is None:
            raise _not_staged(key)
        return entry

    def _in_frames(self, keys: list[bytes], most: int) -> Iterator[Frame]:
        """The chunks in order, up to `most` adjacent ones in a frame where they can travel as one
        message: buffers that lie back to back as they are, others waiting in GPU memory joined
        there first (a copy of ~20 us per 32 MiB, where each frame costs either end a wait for the
        GIL). A join in host memory would be pageable, which UCX moves slowly: one chunk a frame.
        Stops with an error at the first chunk not staged, after a frame of those before it."""
        run: list[tuple[bytes, Staged]] = []
        missing = None
        for key in keys:
            entry = self.pool.get(key)
            if entry is None:
                missing = key
                break
            if run and (len(run) == most or not _joinable(run[-1][1].buffer, entry.buffer)):
                yield self._frame(run)
                run = []
            run.append((key, entry))
        if run:
            yield self._frame(run)
        if missing is not None:
            raise _not_staged(missing)
        return {"count": len(keys)}

    def _frame(self, run: list[tuple[bytes, Staged]]) -> Frame:
        parts = [entry.payload() for _, entry in run]  # each filled by now
        buffers = [entry.buffer for _, entry in run]
        if len(run) == 1:
            data = parts[0]
        elif all(_back_to_back(a, b) for a, b in itertools.pairwise(buffers)):
            whole = buffers[0].as_strided((sum(b.numel() for b in buffers),), (1,))
            data = whole if whole.is_cuda else memoryview(whole.numpy())
        else:
            data = self._joined(buffers)
        meta = RunMeta(self.layout, [entry.blocks for _, entry in run]).encode()
        self._on_served(sum(b.numel() for b in buffers))
        return Frame(Header(op="chunk", key=run[0][0], meta=meta), data)

    def _joined(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """`parts`, in one GPU's memory, copied into one buffer on a stream of this service's (not
        behind the engine's work), done before it returns: UCX reads it once handed over."""
        device = parts[0].device
        stream = self._join_streams.get(device)
        if stream is None:
            stream = self._join_streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            data = torch.cat(parts)
        stream.synchronize()
        return data

    def _by_layer(self, keys: list[bytes], whole_layers: bool) -> Iterator[Frame]:
        """Layer 0 of every chunk, then layer 1, ...: a frame per layer of a chunk (its slice of the
        chunk's buffer, sent as it lies), or with `whole_layers`, for chunks staged in GPU memory, a
        frame per layer of all of them, joined into one buffer first (a GPU copy of ~50 us per 64
        MiB, where each frame costs either end ~60 us of Python: a 16k-token prompt of an 8B model
        is 2048 frames of a layer of a chunk, or 32 joined)."""
        if not self.layers:
            raise ValueError("this endpoint does not serve chunks by layer")
        # All there, or an error before the first frame: the decoder computes at once.
        entries = [self._staged(key) for key in keys]
        # Joined on the GPU only: a join in host memory is pageable, which UCX moves into a GPU far
        # more slowly than the pinned staging buffers sent as they lie.
        whole_layers = whole_layers and all(e.buffer.is_cuda for e in entries)
        runs = [list(range(len(keys)))] if whole_layers else [[i] for i in range(len(keys))]
        for layer in range(self.layers):
            for run in runs:
                parts = [entries[i].layer(layer, self.layers) for i in run]
                meta = LayerMeta(self.layout, [entries[i].blocks for i in run], layer).encode()
                data = parts[0] if len(parts) == 1 else self._joined(parts)
                payload = data if data.is_cuda else memoryview(data.numpy())
                yield Frame(Header(op="chunk", key=keys[run[0]], meta=meta), payload)
                self._on_served(data.numel())
        return {"count": len(keys)}

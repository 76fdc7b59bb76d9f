"""Pulling a load job's chunks into the paged KV cache: from a prefiller's staging endpoint, over one
connection or several at once (lanes), each chunk received whole into a buffer and scattered.

A lane is a connection taking a contiguous share of the job's chunks; the job's progress is the
prefix of chunks placed without a gap, so a lane that fails leaves the ones before it useful and
the rest to the cache tier or to recomputation. One TCP connection is bound by one thread's
checksums and copies, so two lanes move more than one (docs/benchmarks.md).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from pdrun import transfer
from pdrun.pd import plan
from pdrun.pd.chunkmeta import ChunkMeta, RunMeta, frame_chunks, received
from pdrun.pd.codec import PagedKV, Ready
from pdrun.transfer import ConnectionPool, ProtocolError

COPY_IN_SLOTS = 4  # chunks from host memory crossing the bus or waiting to be scattered, per load


@dataclass
class TierPin:
    """Chunks of the cache tier's arena pinned by the scheduler for a load inside the step: the
    worker copies them in and releases the lease, and nothing can evict them in between."""

    lease: int
    token: str  # the arena's
    slots: list[tuple[int, int, dict[str, Any]]]  # (offset, nbytes, meta) of each chunk of the job, in order


@dataclass
class LoadJob:
    transfer: str  # the hand-off's id at the prefiller; "" for a load from the cache tier alone
    endpoints: list[str]  # the prefiller's, one per TP rank; [] for the cache tier alone
    chunks: list[plan.ChunkLoad]
    start: int  # tokens [start, end) are loaded into block_ids
    end: int
    block_ids: list[int]
    layerwise: bool = False  # loaded inside the forward pass, layer by layer (pd/layerwise.py)
    from_disk: int = 0  # of its chunks, how many the scheduler expects from the cache tier's disk
    pin: TierPin | None = None  # a load from the tier's arena inside the step (`layerwise` too)


class ChunkLoader:
    """Scatters the chunks of a load job into the paged KV cache in plan order, whatever their source:
    each frame (a chunk, or with `per_frame` > 1 up to that many adjacent chunks a prefiller sent joined)
    is received whole and verified into a buffer of its own (in GPU memory when `on_device`, as the
    ucx transport can fill it there; else in host memory), checked, then scattered. Frames holding
    up to `window` chunks (at least two frames) are received at once (ucx) into a ring of buffers,
    so that receiving goes on while earlier chunks are scattered.

    On a GPU the scatters are queued on the loader's own stream and not waited for one by one: a
    buffer is handed out again once the scatter that read it is done, and `settle` waits for the
    last one before anyone is told the blocks are loaded. With the Triton copies and chunks in GPU
    memory, the chunks that arrived are scattered `window` at a time (a frame at a time when frames
    join chunks) in one launch (the ring then has room for a batch besides the frames being
    received): a launch per chunk costs the loader thread, which also drives the receives, ~0.1 ms,
    enough to hold a GPU-to-GPU hand-off of 32 MiB chunks to half of what the wire moves. Each frame
    costs the threads moving it a wait for the GIL at either end, which a busy engine thread draws
    out: frames of several chunks are fewer such waits per byte."""

    def __init__(self, paged: PagedKV, job: LoadJob, on_device: bool = False, window: int = 1, per_frame: int = 1):
        self.paged = paged
        self.job = job
        self.layout = paged.describe()
        self.chunks = job.chunks
        self.asked = 0  # index into chunks of the next one a buffer is handed out for
        self.next = 0  # index into chunks of the next one to arrive; those before it are placed once settled
        self.done = job.start  # tokens [0, done) are in place once `settle` returns
        self.nbytes = 0
        self.error = ""
        self._queued = 0  # chunks whose scatter is queued: [_queued, next) wait for the next batch
        self._size = max(paged.nbytes(c.src_blocks) for c in job.chunks)
        self._rings: dict[bool, torch.Tensor] = {}
        self._reading: dict[int, Ready] = {}  # ring slot -> the scatter still reading its buffer
        self._frames: deque[int] = deque()  # chunks in each frame a buffer was handed out for, not yet arrived
        self._sunk = 0  # frames a buffer was handed out for, which picks the next ring slot
        self._slot_end: dict[int, int] = {}  # ring slot -> the end (chunk index) of the frame last put there
        self._at: dict[int, tuple[int, int]] = {}  # chunk index -> (ring slot, byte offset in the ring)
        self._copy_in_ring: torch.Tensor | None = None  # host chunks copied in beside the cache (place_from)
        self._copy_in_read: dict[int, Ready] = {}  # its slot -> the scatter that read it last
        self._stream: torch.cuda.Stream | None = None
        if paged.device.type == "cuda":
            self._stream = torch.cuda.Stream(paged.device)
            # Behind whatever the engine queued so far (the blocks' previous owner, if any).
            self._stream.wait_stream(torch.cuda.current_stream(paged.device))
        self._source(on_device, window, per_frame)

    def _source(self, on_device: bool, window: int, per_frame: int = 1) -> None:
        self.on_device = on_device
        self.window_chunks = window
        self.per_frame = per_frame
        self.window = window if per_frame == 1 else max(2, -(-window // per_frame))  # frames received at once
        self._batched = on_device and self.paged.block_copy == "triton"  # the ring beside the cache
        self.batch = (per_frame if per_frame > 1 else window) if self._batched else 1  # chunks placed in one launch
        left = len(self.chunks) - self.asked
        self._slots = min(self.window + -(-self.batch // per_frame), left) or 1
        self._slot_size = min(per_frame, left or 1) * self._size
        self._rings.pop(on_device, None)
        self._frames.clear()
        self._slot_end.clear()

    def _ring(self) -> torch.Tensor:
        ring = self._rings.get(self.on_device)
        if ring is None:
            allocate = self.paged.device_buffer if self.on_device else self.paged.host_buffer
            ring = self._rings[self.on_device] = allocate(self._slots * self._slot_size)
        return ring

    def remaining(self) -> list[plan.ChunkLoad]:
        return self.chunks[self.next :]

    def switch_source(self, on_device: bool, window: int = 1) -> None:
        """The rest comes from elsewhere (the cache tier): chunks asked for but not placed are asked again."""
        self.settle()
        self.asked = self.next
        self._source(on_device, window)

    def check(self, c: plan.ChunkLoad, meta: Any, nbytes: int) -> None:
        """A chunk that arrived for `c` (its `meta` and size) fits this cache; ProtocolError if not."""
        check_chunk(self.paged, self.layout, c, meta, nbytes)

    def sink(self, header: transfer.Header) -> Any:
        """The buffer a frame that is arriving goes into, once its chunks are checked against the plan."""
        frame = frame_chunks(header.meta)
        n = len(frame.blocks)
        if self.asked + n > len(self.chunks):
            raise ProtocolError("more chunks arrived than asked for")
        if not 0 < n <= self.per_frame:
            raise ProtocolError(f"a frame of {n} chunks arrived; at most {self.per_frame} were asked for in one")
        ours = self.chunks[self.asked : self.asked + n]
        _fits(self.paged, self.layout, ours, frame, header.nbytes)
        slot = self._sunk % self._slots
        if self._slot_end.get(slot, 0) > self._queued:  # the slot's last frame still waits for its batch
            self._flush()
        reading = self._reading.pop(slot, None)
        if reading is not None:
            reading.synchronize()
        at = slot * self._slot_size
        buf = self._ring()[at : at + header.nbytes]
        for i, c in enumerate(ours, self.asked):
            self._at[i] = (slot, at)
            at += self.paged.nbytes(c.src_blocks)
        self._sunk += 1
        self.asked += n
        self._slot_end[slot] = self.asked
        self._frames.append(n)
        return buf if buf.is_cuda else buf.numpy()

    def place(self, header: transfer.Header) -> None:
        """The oldest frame `sink` was asked for has arrived whole: scatter its chunks (queued, on a
        GPU), or keep them for the batch they belong to."""
        self.next += self._frames.popleft()
        self.done = self.chunks[self.next - 1].token_end
        self.nbytes += header.nbytes
        if self.next - self._queued >= self.batch or self.next == len(self.chunks):
            self._flush()

    def place_from(self, src: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """The next chunk's bytes are in `src` (the cache tier's shared memory, say), or will be
        once `after` is done: scatter them from there (queued, on a GPU: `src` must stay untouched
        until `settle` returns). From host
        memory with the Triton copies, each chunk is copied in on a stream of its own into a ring
        beside the cache and scattered from there on the loader's: the next chunk crosses the bus
        while this one is scattered, so loading runs at the bus's speed."""
        c = self.chunks[self.next]
        self._flush()
        if after is not None and self._stream is not None:
            self._stream.wait_event(after)
        ring_slot = None
        if self._stream is not None and not src.is_cuda and self.paged.block_copy == "triton":
            ring_slot = self.next % COPY_IN_SLOTS
            src = self._copied_in(src, ring_slot)
        reading = self.paged.scatter(c.block_ids, src, c.src_blocks, c.skip_blocks, stream=self._stream)
        if reading is not None and ring_slot is not None:
            self._copy_in_read[ring_slot] = reading
        self.next += 1
        self._queued = self.next
        self.asked = max(self.asked, self.next)
        self.done = c.token_end
        self.nbytes += src.numel()

    def _copied_in(self, src: torch.Tensor, slot: int) -> torch.Tensor:
        """`src` (host memory) copied into `slot` of the ring beside the cache, on the copy-in stream
        once the scatter that last read that slot is done; the loader's stream waits for it."""
        assert self._stream is not None
        ring = self._copy_in_ring
        if ring is None:
            ring = self._copy_in_ring = self.paged.device_buffer(COPY_IN_SLOTS * self._size)
            ring.record_stream(self._stream)
        buf = ring[slot * self._size : slot * self._size + src.numel()]
        copier = self.paged.copier_in()
        scattered = self._copy_in_read.get(slot)
        if scattered is not None:
            copier.wait_event(scattered)
        else:
            copier.wait_stream(self._stream)  # the ring is new: behind what the loader's stream queued
        with torch.cuda.stream(copier):
            buf.copy_(src, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(copier)
        ring.record_stream(copier)
        self._stream.wait_event(arrived)
        return buf

    def rewind(self, next_chunk: int, done: int, nbytes: int) -> None:
        """Forget the chunks placed since (`next_chunk`, `done`, `nbytes`): their bytes are not to be trusted."""
        self.settle()
        self.next = self._queued = self.asked = next_chunk
        self.done, self.nbytes = done, nbytes
        self._frames.clear()

    def _flush(self) -> None:
        """Queue the scatters of the chunks that arrived since the last ones queued."""
        first, last = self._queued, self.next
        if first == last:
            return
        ring = self._ring()
        if self._batched:  # one launch: each chunk's blocks, read from its place in the ring
            rows = []
            for i in range(first, last):
                c = self.chunks[i]
                rows += self.paged.copy_table(c.block_ids, c.skip_blocks, c.src_blocks, ring, self._at[i][1])
            reading = self.paged.scatter_table(rows, self._stream)
            if reading is not None:
                for i in range(first, last):
                    self._reading[self._at[i][0]] = reading
        else:
            for i in range(first, last):
                c, (slot, at) = self.chunks[i], self._at[i]
                src = ring[at : at + self.paged.nbytes(c.src_blocks)]
                reading = self.paged.scatter(c.block_ids, src, c.src_blocks, c.skip_blocks, stream=self._stream)
                if reading is not None:
                    self._reading[slot] = reading
        self._queued = last

    def ready(self) -> Ready | None:
        """Queue what waits for a batch and return what to wait for (None: done already, off a GPU):
        the blocks up to `done` are in place once it is."""
        self._flush()
        if self._stream is None:
            return None
        with torch.cuda.stream(self._stream):
            return self.paged.queued()

    def settle(self) -> None:
        """Queue what waits for a batch, then wait for the scatters queued so far: the blocks up to
        `done` are in place after this."""
        self._flush()
        if self._stream is not None:
            self._stream.synchronize()
        self._reading.clear()

    def split(self, lanes: int) -> list[ChunkLoader]:
        """This job as up to `lanes` loaders of contiguous shares of its chunks (itself when one)."""
        n = min(lanes, len(self.chunks))
        if n <= 1:
            return [self]
        shares, first = [], 0
        for i in range(n):
            last = first + (len(self.chunks) - first) // (n - i)
            start = self.chunks[first - 1].token_end if first else self.done
            part = self.chunks[first:last]
            job = LoadJob(self.job.transfer, self.job.endpoints, part, start, part[-1].token_end, self.job.block_ids)
            shares.append(ChunkLoader(self.paged, job, self.on_device, self.window_chunks, self.per_frame))
            first = last
        return shares

    def absorb(self, shares: list[ChunkLoader]) -> None:
        """Progress of the shares `split` gave, in order: placed up to the first gap. The shares
        scattered (and settled) their chunks from their own buffers: none is queued here again."""
        for share in shares:
            self.nbytes += share.nbytes
        for share in shares:
            self.next += share.next
            self.done = share.done
            if share.next < len(share.chunks):
                break
        self.asked = self._queued = self.next


def pull_share(conns: ConnectionPool, address: str, loader: ChunkLoader) -> None:
    """Stream the loader's chunks from the staging endpoint at `address` and place them in order."""
    try:
        with conns.connection(address) as conn:
            meta = {"keys": [c.key.hex() for c in loader.remaining()], "chunks_per_frame": loader.per_frame}
            for frame in conn.stream("get", meta=meta, sink=loader.sink, window=loader.window):
                expected = loader.remaining()[0].key
                if frame.header.key != expected:
                    raise ProtocolError(f"got chunk {frame.header.key.hex()}, expected {expected.hex()}")
                loader.place(frame.header)
    finally:
        loader.settle()
    if loader.done < loader.job.end:
        sent, asked = loader.done - loader.job.start, loader.job.end - loader.job.start
        raise ProtocolError(f"the prefiller sent {sent} of {asked} tokens")


def pull(conns: ConnectionPool, address: str, loader: ChunkLoader, lanes: int, pool: Executor | None) -> None:
    """Pull the whole job over `lanes` connections at once (the first in this thread, the others on
    `pool`); raises the first failing lane's error once every lane has stopped."""
    shares = loader.split(lanes if pool is not None else 1)
    if len(shares) == 1:
        pull_share(conns, address, loader)
        return
    assert pool is not None
    others = [pool.submit(pull_share, conns, address, share) for share in shares[1:]]
    errors: list[BaseException | None] = []
    try:
        pull_share(conns, address, shares[0])
        errors.append(None)
    except Exception as e:
        errors.append(e)
    errors += [f.exception() for f in others]
    loader.absorb(shares)
    first_error = next((e for e in errors if e is not None), None)
    if first_error is not None and loader.done < loader.job.end:
        raise first_error


def check_chunk(paged: PagedKV, layout: Any, c: plan.ChunkLoad, meta: Any, nbytes: int) -> None:
    """A chunk for `c` (its `meta` and size, as sent or as the tier holds it) fits this cache of
    `layout`; ProtocolError if not."""
    got = received(meta, ChunkMeta)
    _fits(paged, layout, [c], RunMeta(got.layout, [got.blocks]), nbytes)


def _fits(paged: PagedKV, layout: Any, ours: list[plan.ChunkLoad], frame: RunMeta, nbytes: int) -> None:
    """A frame for the chunks `ours` (its `frame` meta and size) fits this cache; ProtocolError if not."""
    blocks = [c.src_blocks for c in ours]
    if frame.layout != layout or frame.blocks != blocks:
        raise ProtocolError(
            f"chunk layout {frame.layout} x{frame.blocks} blocks does not match this instance's {layout} x{blocks}"
        )
    expected = sum(paged.nbytes(c.src_blocks) for c in ours)
    if nbytes != expected:
        raise ProtocolError(f"a frame of {nbytes} bytes, expected {expected}")

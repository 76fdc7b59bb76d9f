"""The hand-off layer by layer (`layerwise`), on both sides of it.

A prefiller (`LayerwiseSave`): vLLM calls the connector's `save_kv_layer` right after each
attention layer has run. That layer's blocks of every chunk the step finishes are copied into the
chunks' staging buffers there and then (one launch per layer with the Triton copies), so the
copies overlap the rest of the forward pass instead of following it; host-staged, each layer also
goes out to host memory on a side stream as soon as it is copied. The chunks are served once the
step is done (`wait_for_save`), where any layer no hook copied is copied too: vLLM skips the hooks
where it has no attention metadata (profiling runs), and then the step falls back to whole-chunk
copies.

A decoder (`LayerwiseLoad`): the request is scheduled at once, its hand-off loaded inside that
step's forward pass. The prefiller streams layer 0 of every chunk, then layer 1, ...; a layer is
placed as soon as all of it has arrived, and vLLM's `wait_for_layer_load`, called before each
attention layer, waits for that layer alone: the transfer of the later layers overlaps the
computation of the earlier ones. The price: the step's other requests wait with it, and a failed
hand-off is found out only after the step, whose output for the request vLLM then drops to
recompute its blocks (the cache tier is not asked: the layers already used cannot be patched).

A load from the cache tier's arena inside the step (`MappedLoad`, `cache_load_in_step`): chunks
the scheduler pinned, read by the GPU a layer per launch, each layer waited for the same way.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from pdrun import transfer
from pdrun.pd.chunkmeta import LayerMeta, received
from pdrun.pd.codec import LayerPart, PagedKV, Ready
from pdrun.pd.loader import LoadJob
from pdrun.pd.plan import ChunkSave
from pdrun.transfer import ConnectionPool, ProtocolError


class LayerwiseSave:
    """One step's chunks (each with the staging buffer it goes into), copied out layer by layer."""

    def __init__(self, paged: PagedKV, chunks: list[tuple[ChunkSave, torch.Tensor]]):
        self.paged = paged
        self.chunks = chunks
        self.copied = [False] * len(paged.layers)
        self.hooked = 0  # layers copied as vLLM computed them (the rest in `finish`)
        buffers = [buf for _, buf in chunks]
        # Host-staged: a layer lands beside the cache first, then goes out on the side stream.
        self._host = any(b.device != paged.device for b in buffers) and paged.device.type == "cuda"
        self._outs = [torch.empty_like(b, device=paged.device) for b in buffers] if self._host else buffers
        self._ids = [s.block_ids for s, _ in chunks]
        self._table = paged.gather_table(self._ids, self._outs) if chunks else None  # the same for every layer

    def layer(self, index: int) -> None:
        """Layer `index` was just computed: copy its blocks of every chunk out (queued on the
        current stream, behind the layer's attention)."""
        if not self.copied[index]:
            self._copy(range(index, index + 1))
            self.hooked += 1

    def finish(self) -> Ready | None:
        """The forward pass is queued: copy the layers no hook copied, and return what to wait for
        before the chunks are read."""
        missing = [i for i, done in enumerate(self.copied) if not done]
        while missing:  # in runs of consecutive layers: one launch (and one copy out per chunk) each
            n = next((k for k in range(1, len(missing)) if missing[k] != missing[0] + k), len(missing))
            self._copy(range(missing[0], missing[0] + n))
            missing = missing[n:]
        if self.paged.device.type != "cuda":
            return None
        if self._host:
            copier = self.paged.copier()
            for out in self._outs:
                out.record_stream(copier)  # not handed out again before its copy out is done
            with torch.cuda.stream(copier):
                return self.paged.queued()
        return self.paged.queued()

    def _copy(self, layers: range) -> None:
        for i in layers:
            self.copied[i] = True
        if not self.chunks:
            return
        self.paged.gather_layers(self._ids, self._outs, layers, self._table)
        if self._host:
            copier = self.paged.copier()
            copier.wait_stream(torch.cuda.current_stream(self.paged.device))
            with torch.cuda.stream(copier):
                for out, (_, buf) in zip(self._outs, self.chunks, strict=True):
                    per_layer = buf.numel() // len(self.copied)  # a chunk is [layers, blocks, ...]
                    part = slice(layers.start * per_layer, layers.stop * per_layer)
                    buf[part].copy_(out[part], non_blocking=True)


class LayerwiseLoad:
    """A decoder's hand-off received layer-major into a ring of buffers that each hold one layer of
    every chunk of the job, placed a layer at a time (one launch with the Triton copies). A frame
    holds one layer of one chunk or, with `whole_layers` (asked for when chunks land in GPU memory:
    a frame costs each end ~60 us of Python), of all of them; up to `window` frames are received at
    once (ucx), the ring has room for them besides the layer being placed: 2 + window layers with
    whole layers (an eighth of the hand-off for 32 layers and window 2), else 2 + window / chunks.
    `wait` is the forward pass's side, the rest the loading thread's."""

    def __init__(self, paged: PagedKV, job: LoadJob, on_device: bool = False, window: int = 1):
        self.paged = paged
        self.job = job
        self.layout = paged.describe()
        self.whole_layers = on_device
        self.window = 2 if on_device else window  # frames of a whole layer are large: two in flight
        self.layers = len(paged.layers)
        chunks = job.chunks
        self._sizes = [paged.nbytes(c.src_blocks) // self.layers for c in chunks]  # one layer of each
        self._offsets = [sum(self._sizes[:i]) for i in range(len(chunks))]
        self._layer_bytes = sum(self._sizes)
        per_frame = len(chunks) if self.whole_layers else 1
        self._slots = 2 + -(-self.window * per_frame // len(chunks))
        allocate = paged.device_buffer if on_device else paged.host_buffer
        self._ring = allocate(self._slots * self._layer_bytes)
        self.parts = self.layers * len(chunks)  # a layer of a chunk each
        self.asked = 0  # parts a buffer was handed out for
        self.arrived = 0
        self.nbytes = 0
        self.error = ""
        self.awaited = [False] * self.layers  # layers the forward pass waited for (vLLM's hooks ran)
        self._placed = [threading.Event() for _ in range(self.layers)]  # placed, or never will be
        self._ready: list[Ready | None] = [None] * self.layers
        self._reading: dict[int, Ready] = {}  # ring slot -> the placing of the layer in it
        self._tables: dict[int, torch.Tensor | None] = {}  # ring slot -> its Triton copy table (built once)
        self._stream: torch.cuda.Stream | None = None
        if paged.device.type == "cuda":
            self._stream = torch.cuda.Stream(paged.device)
            # Behind whatever the engine queued so far (the blocks' previous owner, if any).
            self._stream.wait_stream(torch.cuda.current_stream(paged.device))

    @property
    def complete(self) -> bool:
        return self.arrived == self.parts and not self.error

    def _part(self, layer: int, first: int, n: int = 1) -> torch.Tensor:
        """Layer `layer` of chunks first ... first + n - 1, in its ring slot."""
        at = (layer % self._slots) * self._layer_bytes + self._offsets[first]
        return self._ring[at : at + sum(self._sizes[first : first + n])]

    def sink(self, header: transfer.Header) -> Any:
        chunks = self.job.chunks
        layer, i = divmod(self.asked, len(chunks))
        meta = received(header.meta, LayerMeta)
        n = len(meta.blocks)
        want = [c.src_blocks for c in chunks[i : i + n]]
        if (
            self.asked >= self.parts
            or not n
            or (header.key, meta.layer, meta.layout, meta.blocks) != (chunks[i].key, layer, self.layout, want)
            or header.nbytes != sum(self._sizes[i : i + n])
        ):
            raise ProtocolError(
                f"got layer {meta.layer} of chunk {header.key.hex()} ({meta.layout}, blocks {meta.blocks}, "
                f"{header.nbytes} bytes), expected layer {layer} of chunk "
                f"{chunks[i].key.hex() if self.asked < self.parts else '-'} ({self.layout})"
            )
        reading = self._reading.pop(layer % self._slots, None)
        if reading is not None:  # the layer that had this slot is still being placed
            reading.synchronize()
        self.asked += n
        buf = self._part(layer, i, n)
        return buf if buf.is_cuda else buf.numpy()

    def place(self, header: transfer.Header) -> None:
        """The oldest frame asked for has arrived: once a layer is whole, place it."""
        self.arrived += len(header.meta["blocks"])  # checked by `sink`
        self.nbytes += header.nbytes
        chunks = self.job.chunks
        if self.arrived % len(chunks):
            return
        layer = self.arrived // len(chunks) - 1
        slot = layer % self._slots
        parts = [
            LayerPart(c.block_ids, self._part(layer, i), c.src_blocks, c.skip_blocks) for i, c in enumerate(chunks)
        ]
        table = self._tables.get(slot)
        if table is None and self._ring.device == self.paged.device:  # the same table for every layer in the slot
            table = self._tables[slot] = self.paged.layer_table(parts, self._stream)
        ready = self.paged.scatter_layer(layer, parts, self._stream, table)
        if ready is not None:
            self._reading[slot] = ready
        self._ready[layer] = ready
        self._placed[layer].set()

    def stop(self, error: str = "") -> None:
        """No more frames will come: the layers not placed are given up (the forward pass waits no
        longer), and once placing is done the ring may go."""
        if error and not self.error:
            self.error = error
        if self.arrived < self.parts and not self.error:
            self.error = f"the prefiller sent {self.arrived} of {self.parts} layers of chunks"
        if self._stream is not None:
            self._stream.synchronize()
        for placed in self._placed:
            placed.set()

    def wait(self, layer: int) -> None:
        """The forward pass is about to compute `layer`: wait until it is placed (on a GPU, the
        forward pass's stream waits for the copies, the host does not)."""
        self.awaited[layer] = True
        self._placed[layer].wait()
        ready = self._ready[layer]
        if isinstance(ready, torch.cuda.Event):
            torch.cuda.current_stream(self.paged.device).wait_event(ready)


class MappedLoad:
    """A load inside the step from whole chunks in this host's memory (the cache tier's arena),
    which the forward pass's layers wait for. Where the GPU maps that memory (registered for DMA)
    and the Triton copies run (`by_layer`), the GPU reads the chunks straight into the cache, one
    launch per layer, all queued when the step starts on a stream of the load's own, and each
    attention layer waits for its own layer's copy. Else every chunk is scattered whole at once
    (on CPU done before the forward pass starts; on a GPU each layer waits for them all). No
    thread: one queueing copies beside an engine thread busy in Python waits for the GIL at every
    copy and falls far behind the bus."""

    def __init__(
        self,
        paged: PagedKV,
        job: LoadJob,
        sources: list[torch.Tensor],
        by_layer: bool,
        after: list[torch.cuda.Event] | None = None,
    ):
        self.paged = paged
        self.job = job
        self.error = ""
        self.nbytes = sum(paged.nbytes(len(c.block_ids)) for c in job.chunks)
        self.awaited = [False] * len(paged.layers)
        self._copied: list[Ready | None] = []
        self._stream: torch.cuda.Stream | None = None
        if paged.device.type == "cuda":
            self._stream = torch.cuda.Stream(paged.device)
            self._stream.wait_stream(torch.cuda.current_stream(paged.device))  # the blocks' previous owner
            for event in after or ():  # sources still being copied in (pd/prefetch.py)
                self._stream.wait_event(event)
        if by_layer:
            rows = []
            for c, src in zip(job.chunks, sources, strict=True):
                rows += paged.copy_table(c.block_ids, c.skip_blocks, c.src_blocks, src)
            with torch.cuda.stream(self._stream):
                self._table = paged.device_table(rows)  # kept until the copies are done
                for layer in range(len(paged.layers)):
                    paged.scatter_mapped_layer(self._table, layer)
                    self._copied.append(paged.queued())
        else:
            ready = None
            for c, src in zip(job.chunks, sources, strict=True):
                ready = paged.scatter(c.block_ids, src, c.src_blocks, c.skip_blocks, self._stream)
            self._copied = [ready] * len(paged.layers)

    @property
    def complete(self) -> bool:
        return not self.error

    def wait(self, layer: int) -> None:
        """The forward pass is about to compute `layer`: its stream waits for that layer's copy."""
        self.awaited[layer] = True
        ready = self._copied[layer]
        if isinstance(ready, torch.cuda.Event):
            torch.cuda.current_stream(self.paged.device).wait_event(ready)

    def stop(self, error: str = "") -> None:
        """The step is done: so are the copies it waited for; the rest are waited for here."""
        self.error = self.error or error
        if self._copied and self._copied[-1] is not None:
            self._copied[-1].synchronize()


def pull_layers(conns: ConnectionPool, address: str, load: LayerwiseLoad) -> None:
    """Stream the load's chunks layer by layer from the staging endpoint at `address`, placing each
    layer once it is whole; whatever happens, `load` is stopped when this returns or raises."""
    error = ""
    try:
        with conns.connection(address) as conn:
            keys = [c.key.hex() for c in load.job.chunks]
            meta = {"keys": keys, "by_layer": True, "whole_layers": load.whole_layers}
            for frame in conn.stream("get", meta=meta, sink=load.sink, window=load.window):
                load.place(frame.header)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        load.stop(error)
    if not load.complete:
        raise ProtocolError(load.error)

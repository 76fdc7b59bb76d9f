"""Paged KV <-> contiguous chunk buffers.

vLLM hands every attention layer's KV cache to a connector as one tensor whose first dimension is
the block (0.26: FlashAttention `[B, H, N, 2D]` with an NHD or HND stride order; 0.32: a strided
`[B, H, N, C]` view per layer of one shared allocation; the CPU backend `[B, H, N, 2D]` whose
block interior is ISA-specific). What is inside a block is the attention backend's business, so
the codec never looks inside one: a chunk is the chunk's blocks, copied whole, for every layer,

    chunk = [layers, blocks of the chunk x kernel blocks per block, *block interior]

in the backend's own order. Both sides of a transfer must therefore use the same layout; `describe`
names it, it goes into the chunk key's fingerprint and into every chunk's header, and a mismatch is
refused rather than scattered.

When the attention kernel uses smaller blocks than the block manager (vLLM splits a manager block
into `ratio` kernel blocks), manager block b is kernel blocks b*ratio ... b*ratio + ratio - 1.

On CUDA, a gather is queued on the current stream (the forward pass's) and returns at once with an
event: whoever reads the chunk waits for that event, the engine does not. Later kernels that reuse
the blocks are queued behind it on the same stream, so freeing the blocks at once is safe. A gather
into host memory copies out on a side stream, behind the device-side gather: the forward pass goes
on meanwhile. A scatter is queued too, on the stream its caller names (a loader's own, off the
forward pass), and returns its event: the loader waits for it before it reuses the buffer or reports
the blocks loaded.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import torch

from pdrun.pd import kernels


class Ready(Protocol):
    """Something to wait for before a chunk's bytes are there (a CUDA event)."""

    def synchronize(self) -> None: ...

    def query(self) -> bool: ...


class LayerPart(NamedTuple):
    """One layer of a chunk (`src`: its bytes, the chunk holding `src_blocks` blocks), of which the
    blocks after the first `skip_blocks` go into cache blocks `block_ids`."""

    block_ids: Sequence[int]
    src: torch.Tensor
    src_blocks: int
    skip_blocks: int = 0


class LayoutError(ValueError):
    """The KV cache is not laid out in a way the codec can move."""


def _layer_order(name: str) -> list[object]:
    # "model.layers.10.self_attn.attn" sorts after "model.layers.9..."
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _check_range(block_ids: Sequence[int], src_blocks: int, skip_blocks: int) -> None:
    """Blocks skip_blocks ... skip_blocks + len(block_ids) - 1 must be in a chunk of src_blocks."""
    if skip_blocks < 0 or skip_blocks + len(block_ids) > src_blocks:
        raise LayoutError(f"cannot take {len(block_ids)} blocks after {skip_blocks} from a {src_blocks}-block chunk")


class PagedKV:
    """One model shard's paged KV cache, as the codec moves it."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int, block_size: int):
        if not kv_caches:
            raise LayoutError("no KV cache tensors were registered")
        layers: list[torch.Tensor] = []
        seen: dict[tuple[int, tuple[int, ...]], int] = {}
        self.layer_of: dict[str, int] = {}  # vLLM's layer name -> index into `layers`
        for name in sorted(kv_caches, key=_layer_order):
            t = kv_caches[name]
            ident = (t.data_ptr(), tuple(t.stride()))
            if ident not in seen:  # else a layer that shares another layer's cache: moved once
                seen[ident] = len(layers)
                layers.append(t)
            self.layer_of[name] = seen[ident]
        first = layers[0]
        for t in layers[1:]:
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise LayoutError(
                    f"layers differ in shape or dtype ({tuple(first.shape)} {first.dtype} vs "
                    f"{tuple(t.shape)} {t.dtype}): hybrid models are not supported"
                )
        if num_blocks <= 0 or first.shape[0] % num_blocks:
            raise LayoutError(
                f"the KV cache's first dimension ({first.shape[0]}) is not a multiple of the number "
                f"of blocks ({num_blocks}): not a block-major layout"
            )
        self.layers = layers
        self.ratio = first.shape[0] // num_blocks
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_shape = tuple(first.shape[1:])
        self.dtype = first.dtype
        self.device = first.device
        self._elems = math.prod(self.block_shape)
        self.bytes_per_block = len(layers) * self.ratio * self._elems * first.element_size()
        # The one-launch Triton copies (pd/kernels.py), where the layout allows them: PDRUN_BLOCK_COPY=torch
        # keeps torch's per-layer slices. (TRITON_INTERPRET=1 runs them on CPU tensors too: the tests.)
        layout = self._word_layout() if os.environ.get("PDRUN_BLOCK_COPY", "auto") != "torch" else None
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if layout is not None and not ((self.device.type == "cuda" or interpreted) and kernels.available()):
            layout = None
        self._words = layout[:2] if layout is not None else None
        self._memory_order = layout[2] if layout is not None else ""
        self._ptrs: torch.Tensor | None = None
        if layout is not None:
            self._ptrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64, device=self.device)
        self.block_copy = "triton" if layout is not None else "torch"
        self._copy_stream: torch.cuda.Stream | None = None
        self._in_stream: torch.cuda.Stream | None = None

    def _word_layout(self) -> tuple[int, int, str] | None:
        """(words of one kernel block of one layer, words from one block to the next, the block's
        byte order) when every layer's blocks are dense inside (their dims laid out as some order of
        a contiguous layout) and 8-byte aligned; else None. The byte order is "" when it is the
        logical one (the bytes are those torch's slices move), else the block's dims, outermost
        first, as they are in memory: vLLM's caches with a tokens-major memory order (NHD) behind
        a heads-first shape are moved as they lie, and say so in `describe`."""
        first, size = self.layers[0], self.layers[0].element_size()
        block, stride = self._elems * size, first.stride(0) * size
        if block % 8 or stride % 8 or stride < block:
            return None
        if any(t.stride() != first.stride() or t.data_ptr() % 8 for t in self.layers):
            return None
        inner = [(st, i) for i, (st, n) in enumerate(zip(first.stride()[1:], first.shape[1:], strict=True)) if n > 1]
        dense = 1
        for st, i in sorted(inner):
            if st != dense:
                return None
            dense *= first.shape[1 + i]
        in_memory = [i for _, i in sorted(inner, reverse=True)]
        logical = [i for _, i in inner]
        return block // 8, stride // 8, "" if in_memory == logical else "".join(map(str, in_memory))

    def describe(self) -> str:
        """The layout, as both sides of a transfer must agree on it."""
        dims = "x".join(str(d) for d in self.block_shape)
        dtype = str(self.dtype).removeprefix("torch.")
        order = f":mem{self._memory_order}" if self._memory_order else ""  # bytes as they lie (Triton copies)
        return f"L{len(self.layers)}:bs{self.block_size}:r{self.ratio}:{dims}:{dtype}{order}"

    def nbytes(self, n_blocks: int) -> int:
        return n_blocks * self.bytes_per_block

    def chunk_view(self, buf: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """`buf` (a flat uint8 tensor of `nbytes(n_blocks)` bytes) as [layers, kernel blocks, *interior]."""
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != self.nbytes(n_blocks):
            raise LayoutError(
                f"chunk buffer of {buf.numel()} {buf.dtype} elements does not hold {n_blocks} blocks "
                f"({self.nbytes(n_blocks)} bytes)"
            )
        return buf.view(self.dtype).view(len(self.layers), n_blocks * self.ratio, *self.block_shape)

    def block_index(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The kernel blocks of `block_ids`, as an index on the cache's device (see `to_device`)."""
        return self.to_device(self._kernel_blocks(block_ids))

    def _kernel_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(block_ids), dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise LayoutError(f"block ids out of range 0..{self.num_blocks - 1}: {list(block_ids)}")
        if self.ratio > 1:
            ids = (ids[:, None] * self.ratio + torch.arange(self.ratio)).reshape(-1)
        return ids

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A small host tensor (an index, a copy table) on the cache's device: on CUDA copied in
        from pinned memory on the current stream and not waited for (a pageable copy would wait
        for everything queued on that stream: the forward pass, or the scatters before it)."""
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def copy_table(
        self,
        block_ids: Sequence[int],
        first: int,
        chunk_blocks: int,
        buf: torch.Tensor,
        at: int = 0,
        one_layer: bool = False,
    ) -> list[tuple[int, int, int]]:
        """The rows of the Triton copies' table (pd/kernels.py) between cache blocks `block_ids` and
        the blocks `first ...` of a chunk of `chunk_blocks` blocks that starts `at` bytes into `buf`,
        one per kernel block. Rows of several chunks are copied in one launch (`device_table`).
        `one_layer`: `buf` holds one layer of the chunk (a layer-wise load), copied with a layer range."""
        assert self._words is not None
        words, r = self._words[0], self.ratio
        layer_words = 0 if one_layer else chunk_blocks * r * words
        start = buf.data_ptr() + at + first * r * words * 8
        if start % 8:
            raise LayoutError(f"chunk buffer at {start:#x} is not 8-byte aligned: the Triton copies move 8-byte words")
        rows = []
        for i, b in enumerate(block_ids):
            if not 0 <= b < self.num_blocks:
                raise LayoutError(f"block ids out of range 0..{self.num_blocks - 1}: {list(block_ids)}")
            rows += [(b * r + k, start + (i * r + k) * words * 8, layer_words) for k in range(r)]
        return rows

    def device_table(self, rows: list[tuple[int, int, int]]) -> torch.Tensor:
        """`copy_table` rows as the kernel reads them (on the cache's device, see `to_device`)."""
        return self.to_device(torch.tensor(rows, dtype=torch.long).view(-1, 3))

    def gather_table(self, block_ids: Sequence[Sequence[int]], outs: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The device table copying blocks `block_ids[c]` into the whole chunk buffer `outs[c]`, for
        every chunk c; None with torch's copies."""
        if self._words is None:
            return None
        rows = []
        for ids, out in zip(block_ids, outs, strict=True):
            rows += self.copy_table(ids, 0, len(ids), out)
        return self.device_table(rows)

    def _on(self, stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[object]:
        """Run on `stream` (a CUDA cache's; None: the current stream)."""
        return (
            torch.cuda.stream(stream) if self.device.type == "cuda" and stream is not None else contextlib.nullcontext()
        )

    def _runs(self, block_ids: Sequence[int], most: int = 4) -> list[tuple[int, int, int]] | None:
        """Block ids as runs of consecutive blocks, (first kernel block, offset in the chunk, kernel
        blocks), when there are at most `most` of them (a new request's blocks mostly are one run):
        copying slices then takes one batched launch for all layers instead of one per layer. None
        for scattered ids, which go through an index."""
        runs: list[tuple[int, int, int]] = []
        for i, b in enumerate(block_ids):
            if not 0 <= b < self.num_blocks:
                return None  # block_index names the bad id
            if runs and runs[-1][0] + runs[-1][2] == b * self.ratio:
                start, offset, n = runs[-1]
                runs[-1] = (start, offset, n + self.ratio)
            elif len(runs) == most:
                return None
            else:
                runs.append((b * self.ratio, i * self.ratio, self.ratio))
        return runs

    def _run_slices(
        self, view: torch.Tensor, runs: list[tuple[int, int, int]], first: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """For every layer and run, the run's blocks in the cache and in the chunk `view` (whose
        kernel block `first` is the run's offset 0): the two sides of one batched copy."""
        in_cache, in_chunk = [], []
        for layer, chunk in zip(self.layers, view, strict=True):
            for start, offset, n in runs:
                in_cache.append(layer[start : start + n])
                in_chunk.append(chunk[first + offset : first + offset + n])
        return in_cache, in_chunk

    def gather(self, block_ids: Sequence[int], out: torch.Tensor) -> Ready | None:
        """Copy blocks `block_ids` of every layer into the chunk buffer `out` (on any device). On CUDA
        the copies are queued and the event to wait on returned; elsewhere they are done. Into host
        memory from a GPU: gathered into GPU memory on the current stream (the forward pass's; a
        fast device copy), then copied out on a side stream, so that the forward pass is never held
        behind the copy out (2 GiB, a 16k-token prompt of an 8B model, take 37 ms at 55 GB/s)."""
        if out.device != self.device and self.device.type == "cuda":
            on_device = torch.empty_like(out, device=self.device)
            self.gather(block_ids, on_device)
            copier = self.copier()
            copier.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(copier):
                out.copy_(on_device, non_blocking=True)
                on_device.record_stream(copier)  # not handed out again before the copy out is done
                return self.queued()
        view = self.chunk_view(out, len(block_ids))
        if self._words is not None:  # one launch for every layer
            self._copy_blocks(self.gather_table([block_ids], [out]), to_cache=False)
        elif (runs := self._runs(block_ids)) is not None:  # whole runs: one batched copy
            in_cache, in_chunk = self._run_slices(view, runs, 0)
            torch._foreach_copy_(in_chunk, in_cache)
        else:
            idx = self.block_index(block_ids)
            for layer, dst in zip(self.layers, view, strict=True):
                torch.index_select(layer, 0, idx, out=dst)
        return self.queued() if self.device.type == "cuda" else None

    def copier(self) -> torch.cuda.Stream:
        """The side stream chunks are copied out to host memory on."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream

    def copier_in(self) -> torch.cuda.Stream:
        """The side stream chunks are copied in from host memory on (beside the cache, to be scattered)."""
        if self._in_stream is None:
            self._in_stream = torch.cuda.Stream(self.device)
        return self._in_stream

    def scatter(
        self,
        block_ids: Sequence[int],
        src: torch.Tensor,
        src_blocks: int,
        skip_blocks: int = 0,
        stream: torch.cuda.Stream | None = None,
    ) -> Ready | None:
        """Copy blocks `skip_blocks ... skip_blocks + len(block_ids) - 1` of the chunk buffer `src`
        (which holds `src_blocks` blocks, on any device) into blocks `block_ids`. On CUDA the copies
        are queued on `stream` (default: the current one) and the event to wait on returned: until
        it is done neither are the blocks in place nor may `src` be written. Elsewhere they are done."""
        _check_range(block_ids, src_blocks, skip_blocks)
        view = self.chunk_view(src, src_blocks)
        first, last = skip_blocks * self.ratio, (skip_blocks + len(block_ids)) * self.ratio
        cuda = self.device.type == "cuda"
        with self._on(stream):
            if self._words is not None:  # one launch for every layer (after one copy in if need be)
                on_device = src if src.device == self.device else src.to(self.device, non_blocking=True)
                rows = self.copy_table(block_ids, skip_blocks, src_blocks, on_device)
                self._copy_blocks(self.device_table(rows), to_cache=True)
            elif src.device == self.device and (runs := self._runs(block_ids)) is not None:  # whole runs: one copy
                in_cache, in_chunk = self._run_slices(view, runs, first)
                torch._foreach_copy_(in_cache, in_chunk)
            else:
                idx = self.block_index(block_ids)
                for layer, chunk in zip(self.layers, view, strict=True):
                    layer.index_copy_(0, idx, chunk[first:last].to(self.device, non_blocking=True))
            return self.queued() if cuda else None

    def scatter_table(self, rows: list[tuple[int, int, int]], stream: torch.cuda.Stream | None = None) -> Ready | None:
        """Copy the blocks `rows` list (`copy_table`s joined, over chunk buffers beside the cache)
        into the cache in one launch, queued on `stream` as `scatter` does: a loader places the
        chunks that arrived together at once. Triton copies only."""
        if self._words is None:
            raise LayoutError("scatter_table needs the Triton copies")
        with self._on(stream):
            self._copy_blocks(self.device_table(rows), to_cache=True)
            return self.queued() if self.device.type == "cuda" else None

    def scatter_layer(
        self,
        index: int,
        parts: Sequence[LayerPart],
        stream: torch.cuda.Stream | None = None,
        table: torch.Tensor | None = None,
    ) -> Ready | None:
        """Copy layer `index` of several chunks into the cache, queued on `stream` as `scatter` does
        (one launch with the Triton copies): a decoder loading a hand-off layer by layer places
        each layer once every chunk's part of it has arrived. `table`: the parts' `layer_table`,
        when they sit beside the cache where an earlier layer's did (a load reuses its ring's)."""
        cuda = self.device.type == "cuda"
        with self._on(stream):
            if self._words is not None:
                srcs = []  # parts received in host memory (tcp) go beside the cache first; alive until queued
                if table is None:
                    for p in parts:
                        src = p.src if p.src.device == self.device else p.src.to(self.device, non_blocking=True)
                        srcs.append(src)
                    table = self.layer_table([p._replace(src=src) for p, src in zip(parts, srcs, strict=True)])
                    assert table is not None
                self._copy_blocks(table, to_cache=True, layers=range(index, index + 1))
            else:
                for p in parts:
                    self._check_part(p)
                    view = p.src.view(self.dtype).view(p.src_blocks * self.ratio, *self.block_shape)
                    first, last = p.skip_blocks * self.ratio, (p.skip_blocks + len(p.block_ids)) * self.ratio
                    src = view[first:last].to(self.device, non_blocking=True)
                    self.layers[index].index_copy_(0, self.block_index(p.block_ids), src)
            return self.queued() if cuda else None

    def scatter_mapped_layer(self, table: torch.Tensor, index: int) -> None:
        """Copy layer `index` of whole chunks into the cache, queued on the current stream, the GPU
        reading them where they lie in host memory it maps (pinned or registered for DMA; `table`:
        the `device_table` of their `copy_table` rows): nothing is staged in GPU memory first."""
        self._copy_blocks(table, to_cache=True, layers=range(index, index + 1))

    def layer_table(self, parts: Sequence[LayerPart], stream: torch.cuda.Stream | None = None) -> torch.Tensor | None:
        """The device table copying the parts (each one layer of a chunk, beside the cache) into any
        one layer; None with torch's copies. Queued on `stream` (default: the current one), as
        `device_table` is."""
        if self._words is None:
            return None
        rows = []
        for p in parts:
            self._check_part(p)
            rows += self.copy_table(p.block_ids, p.skip_blocks, p.src_blocks, p.src, one_layer=True)
        with self._on(stream):
            return self.device_table(rows)

    def _check_part(self, p: LayerPart) -> None:
        _check_range(p.block_ids, p.src_blocks, p.skip_blocks)
        if p.src.dtype != torch.uint8 or p.src.numel() * len(self.layers) != self.nbytes(p.src_blocks):
            raise LayoutError(f"a layer of a {p.src_blocks}-block chunk is not {p.src.numel()} bytes")

    def gather_layers(
        self,
        block_ids: Sequence[Sequence[int]],
        outs: Sequence[torch.Tensor],
        layers: range,
        table: torch.Tensor | None = None,
    ) -> None:
        """Copy `layers` of blocks `block_ids[c]` into the chunk buffer `outs[c]` (beside the cache)
        for every chunk c, queued on the current stream: one launch with the Triton copies, whose
        `gather_table` of the chunks may be given (a prefiller copying a step's chunks out layer by
        layer makes it once)."""
        if self._words is not None:
            self._copy_blocks(table if table is not None else self.gather_table(block_ids, outs), False, layers)
            return
        for ids, out in zip(block_ids, outs, strict=True):
            view, idx = self.chunk_view(out, len(ids)), self.block_index(ids)
            for i in layers:
                torch.index_select(self.layers[i], 0, idx, out=view[i])

    def queued(self) -> Ready:
        """What to wait for: the copies queued so far on the current stream."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def warm_up(self) -> None:
        """Build the Triton copies now rather than in the first hand-off (block 0 is copied out and
        back: unchanged)."""
        if self._words is None:
            return
        buf = self.device_buffer(self.nbytes(1))
        self.gather([0], buf)
        self.scatter([0], buf, 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _copy_blocks(self, table: torch.Tensor, to_cache: bool, layers: range | None = None) -> None:
        """The Triton copy of the blocks `table` (a `device_table`) lists, between the cache and their chunks."""
        assert self._words is not None
        words, stride = self._words
        kernels.copy_blocks(self._ptrs, table, words, stride, to_cache, layers)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A host buffer for chunks of this cache: pinned next to a GPU, so copies run at full speed."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """A chunk buffer beside the cache itself (GPU memory for a CUDA cache)."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

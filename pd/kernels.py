"""One launch copies a chunk's blocks for every layer (Triton), on CUDA.

With torch, a chunk's copy between the paged cache and a chunk buffer takes a slice per layer and
run of blocks on each side (64 slices for the 8B shape): ~0.5 ms of Python per chunk, far more than
a GPU-to-GPU wire takes to move one, so it would set a hand-off's pace. Here the layers' base
addresses sit in a device table and the blocks in another (where each block is in the cache and in
the chunk buffer), and one kernel moves them all, 8 bytes a lane: one chunk, a batch of chunks that
arrived together, or one layer of the chunks a prefill step finished.

It moves each block's bytes as they lie, so it needs every layer's blocks to be one run of bytes,
8-byte aligned (a block may sit at any stride from the next: vLLM 0.32 interleaves layers in one
allocation); `PagedKV` checks that, uses torch otherwise, and names a byte order other than the
shape's in its layout. `TRITON_INTERPRET=1` runs the same kernel on CPU tensors (the unit tests).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

LANES = 1024  # 8-byte words per program


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n_blocks", "first_layer"])
    def copy_blocks(
        layer_ptrs,  # int64: each layer's base address
        table,  # int64 [n_blocks, 3]: cache block, address of its first layer's bytes in a chunk, words per layer
        n_blocks,
        first_layer,  # the grid's first dimension covers layers first_layer ... for every block
        block_words,  # words of one block of one layer
        block_stride,  # words from one block of a layer to the next
        TO_CACHE: tl.constexpr,
        LANES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        layer = (first_layer + pid // n_blocks).to(tl.int64)
        j = (pid % n_blocks).to(tl.int64)
        words = tl.program_id(1) * LANES + tl.arange(0, LANES)
        mask = words < block_words
        block = tl.load(table + 3 * j)
        chunk = tl.load(table + 3 * j + 1).to(tl.pointer_type(tl.int64))
        layer_words = tl.load(table + 3 * j + 2)
        base = tl.load(layer_ptrs + layer).to(tl.pointer_type(tl.int64))
        in_cache = base + block * block_stride + words
        in_chunk = chunk + layer * layer_words + words
        if TO_CACHE:
            tl.store(in_cache, tl.load(in_chunk, mask=mask), mask=mask)
        else:
            tl.store(in_chunk, tl.load(in_cache, mask=mask), mask=mask)

    return copy_blocks


def available() -> bool:
    try:
        _kernel()
    except Exception as e:  # no triton, or one that cannot build here
        log.info("Triton block copies unavailable (%s: %s); torch copies instead", type(e).__name__, e)
        return False
    return True


def copy_blocks(
    layer_ptrs: torch.Tensor,
    table: torch.Tensor,
    block_words: int,
    block_stride: int,
    to_cache: bool,
    layers: range | None = None,
) -> None:
    """Copy the blocks `table` lists (rows: cache block, the address where its first layer's bytes
    lie in a chunk buffer, words from one layer to the next there) to (`to_cache` False) or from
    the chunk buffers, for `layers` (default: every layer); queued on the current stream. The rows
    may point into several chunk buffers: a loader places a batch of chunks in one launch, a
    prefiller copies one layer of a step's chunks out in one."""
    layers = range(layer_ptrs.numel()) if layers is None else layers
    n = table.shape[0]
    if not n or not len(layers):
        return
    grid = (len(layers) * n, -(-block_words // LANES))
    _kernel()[grid](layer_ptrs, table, n, layers.start, block_words, block_stride, TO_CACHE=to_cache, LANES=LANES)

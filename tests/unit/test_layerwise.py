"""A prefiller's chunks copied out layer by layer (`layerwise`): whatever layers vLLM's hooks copy,
in any order, `finish` copies the rest, and the chunks hold what a whole-chunk gather gives."""

from __future__ import annotations

import pytest
import torch

from pd.codec import PagedKV
from pd.layerwise import LayerwiseSave
from pd.plan import ChunkSave

LAYERS, BLOCKS = 5, 12


def paged() -> PagedKV:
    g = torch.Generator().manual_seed(0)
    return PagedKV(
        {f"model.layers.{i}.attn": torch.randn(BLOCKS, 2, 4, 6, generator=g) for i in range(LAYERS)}, BLOCKS, 4
    )


def saves() -> list[ChunkSave]:
    return [
        ChunkSave("t", 0, b"a" * 16, [3, 4]),
        ChunkSave("t", 1, b"b" * 16, [9, 0]),
        ChunkSave("t", 2, b"c" * 16, [7]),
    ]


@pytest.mark.parametrize("hooked", [[], [0, 1, 2, 3, 4], [2], [4, 0, 3]])
def test_the_chunks_hold_what_a_whole_gather_gives(hooked):
    kv = paged()
    chunks = [(s, torch.zeros(kv.nbytes(len(s.block_ids)), dtype=torch.uint8)) for s in saves()]
    copier = LayerwiseSave(kv, chunks)
    for i in hooked:
        copier.layer(i)
        copier.layer(i)  # a layer vLLM names twice (a shared cache) is copied once
    assert copier.hooked == len(hooked)
    assert copier.finish() is None  # on a CPU the copies are done
    for s, buf in chunks:
        want = torch.zeros_like(buf)
        kv.gather(s.block_ids, want)
        assert torch.equal(buf, want), (hooked, s.index)


def test_a_hook_copies_its_own_layer_only():
    kv = paged()
    chunks = [(s, torch.zeros(kv.nbytes(len(s.block_ids)), dtype=torch.uint8)) for s in saves()]
    LayerwiseSave(kv, chunks).layer(2)
    for s, buf in chunks:
        view = kv.chunk_view(buf, len(s.block_ids))
        assert torch.equal(view[2], kv.layers[2][s.block_ids])
        assert not view[[0, 1, 3, 4]].any()

"""The one-launch Triton block copies move exactly the bytes torch's per-layer slices move: run by
Triton's interpreter on CPU tensors (in a child process: the switch is read when Triton loads), for
kernel blocks smaller than the manager's, scattered ids, part of a chunk, layers interleaved in
one allocation; blocks whose bytes lie in another order than their shape's go as they lie (and the
layout says so), blocks that are not one run of bytes keep torch's copies; a loader's batches of
chunks placed in one launch; a step's chunks copied out a layer at a time; a decoder's layer of
several chunks placed in one launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def caches(layers: int, blocks: int, interior: tuple[int, ...], interleaved: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(blocks)
    if interleaved:  # vLLM 0.32: one allocation, block-major, every layer's block side by side
        whole = torch.randn(blocks, layers, *interior, generator=g)
        return {f"model.layers.{i}.attn": whole[:, i] for i in range(layers)}
    return {f"model.layers.{i}.attn": torch.randn(blocks, *interior, generator=g) for i in range(layers)}


def paged(kind: str, interleaved: bool, ratio: int, interior: str = "logical"):
    from pdrun.pd.codec import PagedKV

    os.environ["PDRUN_BLOCK_COPY"] = kind
    kv = caches(3, 12 * ratio, (2, 4, 6), interleaved)
    if interior == "tokens-major":  # vLLM 0.26 on an H200: [blocks, heads, tokens, 2 x head dim] over NHD memory
        kv = {k: v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for k, v in kv.items()}
    if interior == "gapped":  # part of a wider allocation: a block's bytes are not one run
        kv = {k: torch.cat([v, v], dim=-1)[..., :6] for k, v in kv.items()}
    return PagedKV(kv, 12, 4 * ratio)


def check_all() -> None:
    for interleaved in (False, True):
        for ratio in (1, 2):
            fast, slow = paged("auto", interleaved, ratio), paged("torch", interleaved, ratio)
            assert (fast.block_copy, slow.block_copy) == ("triton", "torch")
            assert fast.describe() == slow.describe()  # the same bytes: either reads the other's chunks
            for ids in ([3, 4, 5], [9, 1, 6, 2]):
                a, b = (torch.zeros(p.nbytes(len(ids)), dtype=torch.uint8) for p in (fast, slow))
                fast.gather(ids, a)
                slow.gather(ids, b)
                assert torch.equal(a, b), ("gather", interleaved, ratio, ids)
                dst = [11, 0, 7, 8][: len(ids) - 1]
                fast.scatter(dst, a, len(ids), skip_blocks=1)
                slow.scatter(dst, b, len(ids), skip_blocks=1)
                for x, y in zip(fast.layers, slow.layers, strict=True):
                    assert torch.equal(x, y), ("scatter", interleaved, ratio, ids)
    # Blocks dense but in another order than their shape: moved as they lie, and named so.
    src, dst = paged("auto", False, 1, "tokens-major"), paged("auto", False, 1, "tokens-major")
    slow = paged("torch", False, 1)
    assert src.block_copy == "triton" and src.describe() == slow.describe() + ":mem102"
    for t in dst.layers:
        t.zero_()
    chunk = torch.zeros(src.nbytes(3), dtype=torch.uint8)
    src.gather([2, 7, 4], chunk)
    dst.scatter([5, 6, 1], chunk, 3)
    for x, y in zip(src.layers, dst.layers, strict=True):
        assert torch.equal(x[[2, 7, 4]], y[[5, 6, 1]])
    assert paged("auto", False, 1, "gapped").block_copy == "torch"
    check_vllm_layouts()
    check_batched_loader()
    check_layerwise()
    check_scatter_layer()


def check_layerwise() -> None:
    """A step's chunks copied out one layer per launch (the kernel's layer range) equal a whole gather."""
    from pdrun.pd.layerwise import LayerwiseSave
    from pdrun.pd.plan import ChunkSave

    for interleaved in (False, True):
        kv = paged("auto", interleaved, 2)
        saves = [ChunkSave("t", 0, b"a" * 16, [3, 4]), ChunkSave("t", 1, b"b" * 16, [9, 0, 5])]
        chunks = [(s, torch.zeros(kv.nbytes(len(s.block_ids)), dtype=torch.uint8)) for s in saves]
        copier = LayerwiseSave(kv, chunks)
        copier.layer(1)
        copier.finish()  # layers 0 and 2 there
        for s, buf in chunks:
            want = torch.zeros_like(buf)
            kv.gather(s.block_ids, want)
            assert torch.equal(buf, want), ("layerwise", interleaved, s.index)


def check_scatter_layer() -> None:
    """Layer by layer, parts of several chunks (one layer of each: the first taken in part) placed
    in one launch per layer equal torch's copies and a whole-chunk scatter."""
    from pdrun.pd.codec import LayerPart

    for interleaved in (False, True):
        for ratio in (1, 2):
            fast, slow, whole = (paged(kind, interleaved, ratio) for kind in ("auto", "torch", "auto"))
            assert fast.block_copy == "triton"
            for t in (*fast.layers, *slow.layers, *whole.layers):
                t.zero_()
            src = paged("auto", interleaved, ratio)
            chunks = [([3, 4, 5], 1, [11, 0]), ([9, 1], 0, [7, 8])]  # (source blocks, skipped, destination)
            bufs = []
            for ids, skip, dst in chunks:
                buf = torch.zeros(src.nbytes(len(ids)), dtype=torch.uint8)
                src.gather(ids, buf)
                bufs.append(buf)
                whole.scatter(dst, buf, len(ids), skip_blocks=skip)
            for layer in reversed(range(3)):  # any order: a layer's launch touches that layer only
                for kv in (fast, slow):
                    parts = [
                        LayerPart(dst, buf.view(3, -1)[layer], len(ids), skip)
                        for (ids, skip, dst), buf in zip(chunks, bufs, strict=True)
                    ]
                    kv.scatter_layer(layer, parts)
                assert torch.equal(fast.layers[layer], whole.layers[layer]), ("layer", interleaved, ratio, layer)
                assert torch.equal(slow.layers[layer], whole.layers[layer]), ("torch", interleaved, ratio, layer)
                if layer:
                    assert not fast.layers[layer - 1].any()  # not there yet


def check_batched_loader() -> None:
    """A loader with chunks beside the cache places the chunks that arrived together in one launch,
    each read from its slot of the ring: the first chunk in part, the last one short, slots reused."""
    from pdrun import transfer
    from pdrun.pd import plan
    from pdrun.pd.loader import ChunkLoader, LoadJob

    for ratio in (1, 2):
        src, dst = paged("auto", False, ratio), paged("auto", False, ratio)
        for t in dst.layers:
            t.zero_()
        bs, chunk = src.block_size, 2 * src.block_size  # 2 blocks a chunk
        handed = 11 * bs - 3  # 11 blocks, the last one part full: 6 chunks, the last of one block
        keys = [bytes([i]) * 16 for i in range(6)]
        dst_ids = [11, 3, 0, 7, 8, 5, 1, 10, 2, 9, 4]
        start = bs  # the first block is already here: the first chunk goes in part
        chunks = plan.plan_load(keys, handed, start, handed, dst_ids, chunk, bs)
        loader = ChunkLoader(dst, LoadJob("t", [], chunks, start, handed, dst_ids), on_device=True, window=2)
        assert (loader.batch, loader._slots) == (2, 4)
        launches = []
        scatter_table = dst.scatter_table
        dst.scatter_table = lambda rows, stream, f=scatter_table, n=launches: n.append(len(rows)) or f(rows, stream)
        src_ids = list(range(11))
        sunk = []
        for c in [*chunks, None, None]:  # as the transport does: `window` chunks received ahead of the placing
            if c is not None:
                i = len(sunk)
                ids = src_ids[i * 2 : i * 2 + c.src_blocks]
                meta = {"layout": src.describe(), "blocks": c.src_blocks}
                header = transfer.Header("chunk", key=c.key, nbytes=src.nbytes(c.src_blocks), meta=meta)
                src.gather(ids, torch.from_numpy(loader.sink(header)))
                sunk.append(header)
            if len(sunk) - loader.next >= 2 or (c is None and loader.next < len(sunk)):
                loader.place(sunk[loader.next])
        loader.settle()
        assert loader.next == 6 and loader.done == handed
        assert launches == [3 * ratio, 4 * ratio, 3 * ratio]  # chunks 0-1 (one block skipped), 2-3, 4-5 (short)
        for x, y in zip(src.layers, dst.layers, strict=True):
            k = torch.tensor(src_ids[1:])
            d = torch.tensor(dst_ids[1:])
            if ratio > 1:
                k = (k[:, None] * ratio + torch.arange(ratio)).reshape(-1)
                d = (d[:, None] * ratio + torch.arange(ratio)).reshape(-1)
            assert torch.equal(x[k], y[d]), ratio
            assert not y[dst_ids[0] * ratio].any()  # before the load's start: untouched


def check_vllm_layouts() -> None:
    """vLLM's FlashAttention stride orders, written per token and read back after a hand-off
    (tests/unit/test_codec.py does the same with torch's copies)."""
    from pdrun.pd.codec import PagedKV
    from tests.unit.test_codec import KVCacheLayout, flash_layout_caches, flash_read, flash_write

    os.environ["PDRUN_BLOCK_COPY"] = "auto"
    layers, nb, heads, bs, d, tokens = 3, 10, 2, 16, 8, 45
    g = torch.Generator().manual_seed(1)
    keys, values = (torch.randn(layers, tokens, heads, d, generator=g) for _ in range(2))
    for layout in (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC, KVCacheLayout.BLNHC, KVCacheLayout.BHLNC):
        src, dst = (flash_layout_caches(layout, layers, nb, heads, bs, d) for _ in range(2))
        flash_write(src, [9, 0, 4], keys, values, bs)
        a, b = PagedKV(src, nb, bs), PagedKV(dst, nb, bs)
        # Heads outside layers (BHLNC): a layer's block is not one run of bytes.
        assert a.block_copy == ("torch" if layout == KVCacheLayout.BHLNC else "triton"), layout
        chunk = torch.empty(a.nbytes(3), dtype=torch.uint8)
        a.gather([9, 0, 4], chunk)
        b.scatter([3, 8, 1], chunk, src_blocks=3)
        assert torch.equal(flash_read(dst, [3, 8, 1], tokens, bs, d), flash_read(src, [9, 0, 4], tokens, bs, d)), layout


def test_triton_copies_move_what_torch_moves():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.unit.test_kernels import check_all; check_all(); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]

"""The one-launch Triton block copies move exactly the bytes torch's per-layer slices move: run by
Triton's interpreter on CPU tensors (in a child process: the switch is read when Triton loads), for
kernel blocks smaller than the manager's, scattered ids, part of a chunk, layers interleaved in
one allocation, and host chunks; a block interior not in logical order keeps torch's copies."""

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


def paged(kind: str, interleaved: bool, ratio: int, permuted: bool = False):
    from pd.codec import PagedKV

    os.environ["PDRUN_BLOCK_COPY"] = kind
    kv = caches(3, 12 * ratio, (2, 4, 6), interleaved)
    if permuted:  # an HND-style interior: logical order is not memory order
        kv = {k: v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for k, v in kv.items()}
    p = PagedKV(kv, 12, 4 * ratio)
    assert p.block_copy == ("triton" if kind == "auto" and not permuted else "torch"), p.block_copy
    return p


def check_all() -> None:
    for interleaved in (False, True):
        for ratio in (1, 2):
            fast, slow = paged("auto", interleaved, ratio), paged("torch", interleaved, ratio)
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
    paged("auto", False, 1, permuted=True)


def test_triton_copies_move_what_torch_moves():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.unit.test_kernels import check_all; check_all(); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]

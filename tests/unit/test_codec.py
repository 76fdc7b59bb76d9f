"""The codec moves whole blocks in the backend's own layout; these tests take that layout from vLLM.

- CPU attention: K/V are written by vLLM's own kernel (`cpu_attn_reshape_and_cache`), whose
  block interior is ISA-specific; moving blocks through chunks must give exactly what the kernel
  would have written at the destination.
- FlashAttention-style layouts: vLLM's `KVCacheLayout` stride orders (layer-compact NHD, and the
  block-outermost cross-layer one), with K in the first half of the content dim and V in the second.
"""

import pytest
import torch

from pdrun.pd.codec import LayoutError, PagedKV

ops = pytest.importorskip("vllm._custom_ops")
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402


def cpu_cache(num_blocks, heads, block_size, head_size, dtype=torch.float32):
    # CPUAttentionBackend: one [B, H, N, 2D] tensor per layer, viewed as K and V halves by its kernels.
    return torch.zeros(num_blocks, heads, block_size, 2 * head_size, dtype=dtype)


def write_with_vllm(cache, keys, values, slots, isa):
    nb, h, bs, _ = cache.shape
    k_cache, v_cache = cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, k_cache, v_cache, torch.tensor(slots), isa)


def slots_of(block_ids, num_tokens, block_size):
    return [block_ids[t // block_size] * block_size + t % block_size for t in range(num_tokens)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_layout_round_trip_matches_what_the_kernel_writes(dtype):
    layers, nb, heads, bs, d, tokens = 3, 8, 2, 128, 32, 300
    isa = _get_attn_isa(dtype, bs, d)
    g = torch.Generator().manual_seed(0)
    kv = [
        (torch.randn(tokens, heads, d, generator=g).to(dtype), torch.randn(tokens, heads, d, generator=g).to(dtype))
        for _ in range(layers)
    ]
    src_blocks, dst_blocks = [5, 1, 6], [2, 7, 0]

    src = {f"model.layers.{i}.attn": cpu_cache(nb, heads, bs, d, dtype) for i in range(layers)}
    want = {f"model.layers.{i}.attn": cpu_cache(nb, heads, bs, d, dtype) for i in range(layers)}
    got = {f"model.layers.{i}.attn": cpu_cache(nb, heads, bs, d, dtype) for i in range(layers)}
    for i, (k, v) in enumerate(kv):
        write_with_vllm(src[f"model.layers.{i}.attn"], k, v, slots_of(src_blocks, tokens, bs), isa)
        write_with_vllm(want[f"model.layers.{i}.attn"], k, v, slots_of(dst_blocks, tokens, bs), isa)

    a, b = PagedKV(src, nb, bs), PagedKV(got, nb, bs)
    assert a.describe() == b.describe()
    chunk = torch.empty(a.nbytes(3), dtype=torch.uint8)
    a.gather(src_blocks, chunk)
    b.scatter(dst_blocks, chunk, src_blocks=3)
    for name in want:
        assert torch.equal(got[name], want[name])


def flash_layout_caches(layout: KVCacheLayout, layers, nb, heads, bs, d):
    """Per-layer logical [B, H, N, 2D] views over one allocation in `layout`'s physical order."""
    logical = (layers, nb, heads, bs, 2 * d)
    physical = [logical[i] for i in layout.stride_order]
    raw = torch.zeros(physical)
    inverse = [layout.stride_order.index(i) for i in range(5)]
    view5 = raw.permute(inverse)
    assert tuple(view5.shape) == logical
    return {f"model.layers.{i}.self_attn.attn": view5[i] for i in range(layers)}


def flash_write(caches, block_ids, keys, values, bs):
    for t in range(keys.shape[1]):
        b, n = block_ids[t // bs], t % bs
        for i, cache in enumerate(caches.values()):
            d = keys.shape[-1]
            cache[b, :, n, :d] = keys[i, t]
            cache[b, :, n, d:] = values[i, t]


def flash_read(caches, block_ids, num_tokens, bs, d):
    out = []
    for cache in caches.values():
        rows = [cache[block_ids[t // bs], :, t % bs] for t in range(num_tokens)]
        out.append(torch.stack(rows))
    return torch.stack(out)  # [layers, tokens, heads, 2d]


@pytest.mark.parametrize("layout", [KVCacheLayout.LBNHC, KVCacheLayout.LBHNC, KVCacheLayout.BLNHC, KVCacheLayout.BHLNC])
def test_flash_layouts_round_trip_per_token(layout):
    layers, nb, heads, bs, d, tokens = 4, 10, 2, 16, 8, 45
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(layers, tokens, heads, d, generator=g)
    values = torch.randn(layers, tokens, heads, d, generator=g)
    src_ids, dst_ids = [9, 0, 4], [3, 8, 1]
    src = flash_layout_caches(layout, layers, nb, heads, bs, d)
    dst = flash_layout_caches(layout, layers, nb, heads, bs, d)
    flash_write(src, src_ids, keys, values, bs)

    a, b = PagedKV(src, nb, bs), PagedKV(dst, nb, bs)
    chunk = torch.empty(a.nbytes(3), dtype=torch.uint8)
    a.gather(src_ids, chunk)
    b.scatter(dst_ids, chunk, src_blocks=3)
    assert torch.equal(flash_read(dst, dst_ids, tokens, bs, d), flash_read(src, src_ids, tokens, bs, d))
    untouched = [i for i in range(nb) if i not in dst_ids]
    for cache in dst.values():
        assert not cache[untouched].any()


def test_scatter_can_skip_blocks_already_present():
    nb, bs = 6, 4
    src = {"l0": torch.arange(nb * 2 * bs * 2, dtype=torch.float32).view(nb, 2, bs, 2)}
    dst = {"l0": torch.zeros(nb, 2, bs, 2)}
    a, b = PagedKV(src, nb, bs), PagedKV(dst, nb, bs)
    chunk = torch.empty(a.nbytes(3), dtype=torch.uint8)
    a.gather([0, 1, 2], chunk)
    b.scatter([4], chunk, src_blocks=3, skip_blocks=2)  # only the third block of the chunk
    assert torch.equal(dst["l0"][4], src["l0"][2])
    assert not dst["l0"][:4].any() and not dst["l0"][5].any()


def test_kernel_blocks_smaller_than_manager_blocks():
    # vLLM may split a manager block into `ratio` kernel blocks: manager block b = kernel blocks b*r .. b*r+r-1.
    manager_blocks, ratio = 4, 2
    src = {"l0": torch.arange(manager_blocks * ratio * 3, dtype=torch.float32).view(manager_blocks * ratio, 3)}
    dst = {"l0": torch.zeros(manager_blocks * ratio, 3)}
    a, b = PagedKV(src, manager_blocks, 32), PagedKV(dst, manager_blocks, 32)
    assert a.ratio == 2
    chunk = torch.empty(a.nbytes(1), dtype=torch.uint8)
    a.gather([3], chunk)
    b.scatter([1], chunk, src_blocks=1)
    assert torch.equal(dst["l0"][2:4], src["l0"][6:8])


def test_shared_layers_are_moved_once_and_layers_in_numeric_order():
    t = [torch.full((4, 2), float(i)) for i in range(11)]
    caches = {f"model.layers.{i}.attn": t[i] for i in range(11)}
    caches["model.layers.11.attn"] = t[10]  # KV sharing: the same tensor under two names
    p = PagedKV(caches, 4, 16)
    assert len(p.layers) == 11
    assert [float(x[0, 0]) for x in p.layers] == [float(i) for i in range(11)]  # 10 after 9, not after 1


def test_layout_errors_are_named():
    with pytest.raises(LayoutError, match="not a multiple"):
        PagedKV({"l": torch.zeros(10, 2)}, 4, 16)
    with pytest.raises(LayoutError, match="hybrid"):
        PagedKV({"a": torch.zeros(4, 2), "b": torch.zeros(4, 3)}, 4, 16)
    p = PagedKV({"l": torch.zeros(4, 2)}, 4, 16)
    with pytest.raises(LayoutError, match="out of range"):
        p.gather([4], torch.empty(p.nbytes(1), dtype=torch.uint8))
    with pytest.raises(LayoutError, match="does not hold"):
        p.gather([0, 1], torch.empty(p.nbytes(1), dtype=torch.uint8))
    with pytest.raises(LayoutError, match="cannot take"):
        p.scatter([0, 1], torch.empty(p.nbytes(1), dtype=torch.uint8), src_blocks=1)


def test_host_buffer_holds_a_chunk():
    p = PagedKV({"l": torch.randn(4, 2, 16, 8)}, 4, 16)
    buf = p.host_buffer(p.nbytes(2))
    assert buf.dtype == torch.uint8 and buf.device.type == "cpu" and buf.numel() == p.nbytes(2)
    p.gather([1, 3], buf)  # usable as a chunk buffer as is: what it holds goes back where it came from
    q = PagedKV({"l": torch.zeros(4, 2, 16, 8)}, 4, 16)
    q.scatter([0, 2], buf, src_blocks=2)
    assert torch.equal(q.layers[0][[0, 2]], p.layers[0][[1, 3]])


@pytest.mark.parametrize(
    "src_ids, dst_ids",
    [
        ([2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5]),  # one run each side: batched slice copies
        ([0, 1, 2, 6, 7, 3], [9, 10, 4, 5, 6, 11]),  # a few runs
        ([9, 0, 4, 2, 7, 5], [1, 3, 5, 7, 9, 11]),  # scattered: through an index
    ],
)
def test_runs_of_blocks_and_scattered_blocks_move_alike(src_ids, dst_ids):
    nb, ratio, layers = 12, 2, 3
    g = torch.Generator().manual_seed(2)
    src = {f"l{i}": torch.randn(nb * ratio, 2, 4, generator=g) for i in range(layers)}
    dst = {f"l{i}": torch.zeros(nb * ratio, 2, 4) for i in range(layers)}
    a, b = PagedKV(src, nb, 32), PagedKV(dst, nb, 32)
    chunk = torch.empty(a.nbytes(len(src_ids)), dtype=torch.uint8)
    a.gather(src_ids, chunk)
    kernel = lambda ids: [k for i in ids for k in range(i * ratio, i * ratio + ratio)]  # noqa: E731
    for name in src:
        want = src[name][kernel(src_ids)]
        assert torch.equal(a.chunk_view(chunk, len(src_ids))[int(name[1:])], want)
    b.scatter(dst_ids[1:], chunk, src_blocks=len(src_ids), skip_blocks=1)
    for name in src:
        assert torch.equal(dst[name][kernel(dst_ids[1:])], src[name][kernel(src_ids[1:])])
        untouched = [k for k in range(nb * ratio) if k not in kernel(dst_ids[1:])]
        assert not dst[name][untouched].any()

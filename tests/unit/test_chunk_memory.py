"""Where chunks wait and land (`staging_memory`): GPU memory only for a GPU cache over ucx; a
consumer there lands them in GPU memory whatever the producer staged them in."""

from __future__ import annotations

import pytest
import torch

from pdrun.pd.codec import PagedKV
from pdrun.pd.config import ConnectorConfig


def cpu_paged() -> PagedKV:
    return PagedKV({"layers.0": torch.zeros(8, 2, 16, 32)}, num_blocks=8, block_size=16)


@pytest.mark.parametrize("producer", [True, False])
@pytest.mark.parametrize("transport", ["tcp", "ucx"])
@pytest.mark.parametrize("memory", ["auto", "host"])
def test_a_cpu_cache_keeps_chunks_in_host_memory(transport, memory, producer):
    cfg = ConnectorConfig(transport=transport, staging_memory=memory)
    assert cfg.chunks_on_device(cpu_paged().device, producer) is False


@pytest.mark.parametrize(
    ("transport", "memory", "waits", "lands"),
    [
        ("ucx", "auto", True, True),
        ("ucx", "device", True, True),
        ("ucx", "host", False, True),  # host-staged: UCX lands it in GPU memory through GPU fragments
        ("tcp", "auto", False, False),
        ("tcp", "host", False, False),
    ],
)
def test_a_gpu_cache_over_ucx_lands_chunks_in_gpu_memory_whatever_they_wait_in(transport, memory, waits, lands):
    cfg = ConnectorConfig(transport=transport, staging_memory=memory)
    cuda = torch.device("cuda", 0)  # a device name only: nothing is allocated
    assert (cfg.chunks_on_device(cuda, producer=True), cfg.chunks_on_device(cuda, producer=False)) == (waits, lands)


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_device_memory_where_it_cannot_be_is_named(transport):
    with pytest.raises(ValueError, match=r"staging_memory=device needs a KV cache on a GPU \(this one is on cpu\)"):
        ConnectorConfig(transport=transport, staging_memory="device").chunks_on_device(torch.device("cpu"), True)


def test_device_buffers_sit_beside_the_cache_and_gathers_on_cpu_are_done_at_once():
    paged = cpu_paged()
    paged.layers[0][3].fill_(5)
    buf = paged.device_buffer(paged.nbytes(1))
    assert buf.device == paged.device and buf.dtype == torch.uint8
    assert paged.gather([3], buf) is None  # nothing to wait for
    assert torch.equal(paged.chunk_view(buf, 1)[0, 0], paged.layers[0][3])


@pytest.mark.gpu
def test_gpu_gather_returns_an_event_and_lands_in_both_memories():
    paged = PagedKV({"layers.0": torch.randn(8, 2, 16, 32, device="cuda")}, num_blocks=8, block_size=16)
    for buf in (paged.device_buffer(paged.nbytes(2)), paged.host_buffer(paged.nbytes(2))):
        ready = paged.gather([6, 1], buf)
        assert isinstance(ready, torch.cuda.Event)
        ready.synchronize()
        got = paged.chunk_view(buf, 2)[0].to("cuda")
        assert torch.equal(got, paged.layers[0][torch.tensor([6, 1], device="cuda")])

"""The connector's transfer settings: defaults that differ by transport, and what reaches the transport."""

import pytest

from pdrun import transfer
from pdrun.pd.config import load_config
from pdrun.transfer import ucx


def test_defaults_by_transport():
    tcp, over_ucx = load_config({}), load_config({"transport": "ucx"})
    assert (tcp.lanes(), tcp.window()) == (2, 1)  # TCP reads a frame at a time: lanes for throughput
    assert (over_ucx.lanes(), over_ucx.window()) == (1, 16)  # UCX pipelines chunks on one connection
    # Joined frames only into GPU memory over ucx: into host memory a frame is a chunk.
    assert (over_ucx.per_frame(True), over_ucx.per_frame(False), tcp.per_frame(True)) == (8, 1, 1)
    assert load_config({"transport": "ucx", "load_lanes": 3, "chunks_in_flight": 8}).lanes() == 3
    with pytest.raises(ValueError, match="chunks_in_flight"):
        load_config({"chunks_in_flight": 0})


@pytest.mark.parametrize("scheme, checksums, hashed", [("tcp", None, True), ("ucx", None, False), ("ucx", True, True)])
def test_unset_checksums_take_the_transports_default(scheme, checksums, hashed):
    cfg = load_config({"transport": scheme, **({} if checksums is None else {"checksums": checksums})})
    with (
        transfer.listen(f"{scheme}://127.0.0.1:0", Echo(), **cfg.transfer_options()) as listener,
        transfer.connect(listener.address, **cfg.transfer_options()) as conn,
    ):
        (frame,) = conn.stream("echo", payload=b"x" * 1000)
    assert (frame.header.checksum is not None) == hashed


class Echo(transfer.Service):
    def handle(self, request, payload):
        yield transfer.Frame(transfer.Header(op="data"), payload)


def test_ucx_progress_mode(monkeypatch):
    assert not ucx._polling(None) and ucx._polling(0)  # polls beside a GPU only
    monkeypatch.setenv("PDRUN_UCX_PROGRESS", "polling")
    assert ucx._polling(None)
    monkeypatch.setenv("PDRUN_UCX_PROGRESS", "blocking")
    assert not ucx._polling(0)
    monkeypatch.setenv("PDRUN_UCX_PROGRESS", "fast")
    with pytest.raises(ValueError, match="PDRUN_UCX_PROGRESS='fast'"):
        ucx._polling(0)


def test_the_staging_pool_is_a_quarter_of_the_kv_cache_within_half_the_free_memory():
    gib = 1 << 30
    default = load_config({})
    assert default.staging_bytes(kv_cache_bytes=32 * gib, free_bytes=100 * gib) == 8 * gib
    assert default.staging_bytes(kv_cache_bytes=1 * gib, free_bytes=100 * gib) == 2 * gib  # at least 2 GiB
    assert default.staging_bytes(kv_cache_bytes=100 * gib, free_bytes=14 * gib) == 7 * gib  # the GPU's rest
    assert load_config({"staging_gb": 0.5}).staging_bytes(32 * gib, 1 * gib) == gib // 2  # as asked


def test_on_a_gpu_the_prefetch_pool_and_loads_in_the_step_are_on_by_default():
    gib = 1 << 30
    default = load_config({})
    assert default.takes_hints(on_gpu=True) and not default.takes_hints(on_gpu=False)
    assert default.prefetch_bytes(True, longest_prompt_bytes=2 * gib, free_bytes=40 * gib) == 2 * gib  # one prompt
    assert default.prefetch_bytes(True, longest_prompt_bytes=16 * gib, free_bytes=12 * gib) == 3 * gib  # the GPU's rest
    assert default.prefetch_bytes(False, longest_prompt_bytes=2 * gib, free_bytes=40 * gib) == 0
    assert (default.load_in_step(on_gpu=True), default.load_in_step(on_gpu=False)) == ("idle", "never")
    off = load_config({"cache_prefetch_gb": 0, "cache_load_in_step": "never"})
    assert not off.takes_hints(on_gpu=True) and off.load_in_step(on_gpu=True) == "never"
    asked = load_config({"cache_prefetch_gb": 0.5, "cache_load_in_step": "always"})
    assert asked.takes_hints(on_gpu=False) and asked.prefetch_bytes(False, 2 * gib, 40 * gib) == gib // 2
    assert asked.load_in_step(on_gpu=False) == "always"

"""The PD invariant on CUDA (the tiny model, or PDRUN_GPU_MODEL), over tcp or ucx: the CPU checks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from pdrun.pd.compat import recovers_failed_sync_loads
from tests.gpu.conftest import LAYERWISE, STAGING, TRANSPORT
from tests.integration.client import (
    EXTERNAL,
    LOADED,
    LOCAL_COMPUTE,
    complete,
    continue_after,
    metrics,
    prefill,
    prompt,
    token_ids,
    wait_for_deltas,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 3000])
def test_pd_equals_plain_on_gpu(gpu_cluster, n):
    c = gpu_cluster
    tokens = prompt(n, seed=1)
    want = token_ids(complete(c.plain.url, tokens))
    first = prefill(c.prefiller.url, tokens)
    before = metrics(c.decoder.url)
    assert continue_after(c.decoder.url, tokens, first) == want
    expected = {LOADED: n, EXTERNAL: n, LOCAL_COMPUTE: 1}
    assert wait_for_deltas(c.decoder.url, before, expected) == expected


def test_sixteen_concurrent_on_gpu(gpu_cluster):
    c = gpu_cluster
    cases = [(n, seed) for seed in (2, 3, 4, 5) for n in (255, 257, 1000, 3000)]
    wants = {case: token_ids(complete(c.plain.url, prompt(*case))) for case in cases}

    def pd(case):
        tokens = prompt(*case)
        return case, continue_after(c.decoder.url, tokens, prefill(c.prefiller.url, tokens))

    with ThreadPoolExecutor(16) as pool:
        assert dict(pool.map(pd, cases)) == wants


@pytest.mark.skipif(TRANSPORT != "ucx", reason="GPU-to-GPU chunks need the ucx transport")
def test_chunks_wait_and_land_in_gpu_memory_over_ucx(gpu_cluster):
    # Host-staged (PDRUN_GPU_STAGING=host): they wait in the prefiller's host memory, still land in GPU memory.
    waits = "host" if STAGING == "host" else "device"
    assert f"chunks in {waits} memory" in gpu_cluster.prefiller.log_path.read_text()
    assert "chunks in device memory" in gpu_cluster.decoder.log_path.read_text()


@pytest.mark.skipif(not LAYERWISE, reason="PDRUN_GPU_LAYERWISE=1 turns the layer-by-layer hand-off on")
def test_the_hand_off_went_layer_by_layer(gpu_cluster):
    checks = [(gpu_cluster.prefiller, "chunks copied out")]
    decoder_log = gpu_cluster.decoder.log_path.read_text()
    if recovers_failed_sync_loads():
        checks.append((gpu_cluster.decoder, "hand-offs loaded"))
    else:  # vLLM < 0.32 can recompute a failed in-step load a token off: whole chunks
        assert "layerwise on this decoder loads hand-offs whole" in decoder_log
        assert "hand-offs loaded layer by layer" not in decoder_log
    for server, what in checks:
        log = server.log_path.read_text()
        assert f"{what} layer by layer" in log
        line = log[log.index(f"{what} layer by layer") :].splitlines()[0]
        hooked, total = (int(w) for w in line.split("(")[1].split(" layers")[0].split(" of "))
        # Every layer in vLLM's hooks: copied out as it was computed, waited for before it was.
        assert hooked == total > 0, line

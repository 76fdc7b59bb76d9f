"""Exact PD on CUDA: through the proxy, the prompts of tests/integration/test_exact.py, one at a
time, streamed and not, get plain vLLM's answers token for token (the 8B shape in bf16 with
PDRUN_GPU_MODEL)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.client import metrics
from tests.integration.conftest import free_port
from tests.integration.test_exact import CONTINUED, HANDOFFS, answer, cases, first_difference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def proxy_url(gpu_cluster) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "pdrun.launch", "proxy", "--prefill", gpu_cluster.prefiller.url,
            "--decode", gpu_cluster.decoder.url, "--port", str(port)]  # fmt: skip
    with open(gpu_cluster.log_dir / "proxy.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_request_kind_equals_plain_vllm_one_at_a_time_on_gpu(gpu_cluster, proxy_url):
    todo = [(case, stream) for case in cases(14, seed=1) for stream in (False, True)]
    before = metrics(proxy_url)
    differ = []
    for case, stream in todo:
        got, want = answer(proxy_url, case, stream), answer(gpu_cluster.plain.url, case, stream)
        if why := first_difference(got, want):
            differ.append(f"{case} stream={stream}: {why}")
    assert not differ, f"{len(differ)} of {len(todo)} differ from plain vLLM:\n" + "\n".join(differ)
    after = metrics(proxy_url)
    assert after[HANDOFFS] - before[HANDOFFS] == len(todo)
    assert after[CONTINUED] - before.get(CONTINUED, 0) >= 0.9 * len(todo)

"""The same 1P1D + plain cluster as tests/integration, on one CUDA GPU (vLLM 0.26 on the lent machines).

PYTHONPATH=/tmp/site:$PWD python3 -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch.vllm_server import ServerSpec, VllmServer
from tests.integration.conftest import free_port, model_dir  # noqa: F401  (fixture re-export)


# Eager: this suite checks correctness; CUDA graphs and compile only slow its start-up.
@dataclass
class Cluster:
    prefiller: VllmServer
    decoder: VllmServer
    plain: VllmServer
    log_dir: Path


GPU_ARGS = ["--gpu-memory-utilization", "0.25", "--max-num-seqs", "64", "--enforce-eager"]


@pytest.fixture(scope="session")
def gpu_cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:  # noqa: F811
    log_dir = Path(os.environ.get("PDRUN_TEST_LOGS") or tmp_path_factory.mktemp("logs"))
    # PDRUN_GPU_DTYPE=float32 takes bf16 rounding out of the comparison: PD computes the last prompt
    # token in a step of its own, a plain vLLM within the whole prefill, and in bf16 that alone can
    # flip a near-tie; PDRUN_GPU_BATCH_INVARIANT=1 makes kernels independent of the batch shape.
    dtype = os.environ.get("PDRUN_GPU_DTYPE", "bfloat16")
    env = {"VLLM_BATCH_INVARIANT": "1"} if os.environ.get("PDRUN_GPU_BATCH_INVARIANT") == "1" else {}
    common = dict(model=str(model_dir), device="cuda", dtype=dtype, max_model_len=4096, extra_args=GPU_ARGS, env=env)
    servers = [
        VllmServer(ServerSpec(port=free_port(), role="kv_producer", kv_port=free_port(), **common), log_dir / "p.log"),
        VllmServer(
            ServerSpec(
                port=free_port(), role="kv_consumer", kv_port=free_port(), connector={"io_timeout_s": 10.0}, **common
            ),
            log_dir / "d.log",
        ),
        VllmServer(ServerSpec(port=free_port(), **common), log_dir / "plain.log"),
    ]
    try:
        t0 = time.monotonic()
        for s in servers:  # one at a time: each sizes its KV cache from the memory the others left
            s.start().wait_healthy(timeout=400)
        print(f"\n3 vLLM servers on the GPU healthy after {time.monotonic() - t0:.0f}s; logs in {log_dir}")
        yield Cluster(*servers, log_dir)
    finally:
        for s in servers:
            s.stop()

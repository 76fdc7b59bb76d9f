"""The same 1P1D + plain cluster as tests/integration, on a CUDA host with vLLM for CUDA.

    python -m pytest -m gpu tests/gpu
    PDRUN_GPU_MODEL=DIR PDRUN_GPU_TRANSPORT=ucx python -m pytest -m gpu tests/gpu   # e.g. the 8B shape

PDRUN_GPU_MODEL: a model directory (served with dummy weights when it holds none; default: the
tiny model). PDRUN_GPU_TRANSPORT: tcp (default) or ucx. With two GPUs the decoder gets the second
(GPU to GPU over ucx); PDRUN_GPU_MEM sets each server's --gpu-memory-utilization (default 0.25);
PDRUN_GPU_STAGING=host stages the prefiller's chunks in host memory (the connector's staging_memory);
PDRUN_GPU_LAYERWISE=1 hands off layer by layer (`layerwise`, both servers): the prefiller copies
its chunks out as vLLM computes each layer, the decoder (on vLLM >= 0.32) loads each layer before
vLLM computes it. PDRUN_GPU_DTYPE (default bfloat16), PDRUN_GPU_BATCH_INVARIANT=1 (below);
PDRUN_TEST_LOGS: where the servers' logs go (default: a temporary directory).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pdrun.launch.vllm_server import ServerSpec, VllmServer
from tests.integration.conftest import free_port, model_dir  # noqa: F401  (fixture re-export)


# Eager: this suite checks correctness; CUDA graphs and compile only slow its start-up.
@dataclass
class Cluster:
    prefiller: VllmServer
    decoder: VllmServer
    plain: VllmServer
    log_dir: Path


TRANSPORT = os.environ.get("PDRUN_GPU_TRANSPORT", "tcp")
STAGING = os.environ.get("PDRUN_GPU_STAGING", "auto")
LAYERWISE = os.environ.get("PDRUN_GPU_LAYERWISE") == "1"


def gpu_args(model: Path) -> list[str]:
    args = ["--gpu-memory-utilization", os.environ.get("PDRUN_GPU_MEM", "0.25"), "--max-num-seqs", "64"]
    if not any(model.glob("*.safetensors")):
        args += ["--load-format", "dummy"]  # a shape only: random weights, the same in every server
    return [*args, "--enforce-eager"]


@pytest.fixture(scope="session")
def gpu_cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:  # noqa: F811
    log_dir = Path(os.environ.get("PDRUN_TEST_LOGS") or tmp_path_factory.mktemp("logs"))
    # PDRUN_GPU_DTYPE=float32 takes bf16 rounding out of the comparison where a decoder samples the
    # first token itself: it computes the prompt's last tokens in a step of its own, a plain vLLM
    # within the whole prefill, and in bf16 that alone can flip a near tie.
    # PDRUN_GPU_BATCH_INVARIANT=1 sets vLLM's VLLM_BATCH_INVARIANT: kernels independent of the batch
    # shape, so that concurrent requests, batched differently by PD and plain, compare exactly.
    dtype = os.environ.get("PDRUN_GPU_DTYPE", "bfloat16")
    env = {"VLLM_BATCH_INVARIANT": "1"} if os.environ.get("PDRUN_GPU_BATCH_INVARIANT") == "1" else {}
    model = Path(os.environ.get("PDRUN_GPU_MODEL") or model_dir)
    decoder_gpu = "1" if torch.cuda.device_count() > 1 else "0"
    common = dict(model=str(model), device="cuda", dtype=dtype, max_model_len=4096, extra_args=gpu_args(model))
    connector = {"transport": TRANSPORT, "io_timeout_s": 30.0, "staging_memory": STAGING, "layerwise": LAYERWISE}
    # (role, GPU, log name): each server's ports are picked just before it starts, as UCX's own
    # listeners in the servers already up take ephemeral ports too.
    plan = [("kv_producer", "0", "p.log"), ("kv_consumer", decoder_gpu, "d.log"), ("plain", "0", "plain.log")]
    servers: list[VllmServer] = []
    try:
        t0 = time.monotonic()
        for role, gpu, log in plan:  # one at a time: each sizes its KV cache from the memory the others left
            pd = dict(kv_port=free_port(), connector=connector) if role != "plain" else {}
            args = dict(common)
            if LAYERWISE and role == "kv_consumer":  # loads inside the forward pass need it (pd/config.py)
                args["extra_args"] = [*gpu_args(model), "--no-async-scheduling"]
            spec = ServerSpec(port=free_port(), role=role, **pd, **args, env={**env, "CUDA_VISIBLE_DEVICES": gpu})
            servers.append(VllmServer(spec, log_dir / log))
            servers[-1].start().wait_healthy(timeout=400)
        print(f"\n3 vLLM servers on the GPU healthy after {time.monotonic() - t0:.0f}s; logs in {log_dir}")
        yield Cluster(*servers, log_dir)
    finally:
        for s in servers:
            s.stop()

"""Real vLLM servers on CPU with the tiny model, started once per test session.

P (kv_producer) and D (kv_consumer) with PDConnector, and B, a plain vLLM: the reference every PD
output is compared with. All listen on 127.0.0.1; all are stopped at the end of the session, and
the session fails if any of their processes is left.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch import tiny_model
from launch.vllm_server import ServerSpec, VllmServer, group_members

pytestmark = pytest.mark.integration
DECODER_IO_TIMEOUT_S = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    prefiller: VllmServer
    decoder: VllmServer
    plain: VllmServer
    log_dir: Path

    def restart_prefiller(self) -> None:
        if self.prefiller.alive():
            return
        self.prefiller.start().wait_healthy()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = Path(os.environ.get("PDRUN_TEST_LOGS") or tmp_path_factory.mktemp("logs"))
    common = dict(model=str(model_dir), dtype="float32", max_model_len=4096)
    p = VllmServer(
        ServerSpec(port=free_port(), role="kv_producer", kv_port=free_port(), **common), log_dir / "prefiller.log"
    )
    d = VllmServer(
        ServerSpec(
            port=free_port(),
            role="kv_consumer",
            kv_port=free_port(),
            connector={"io_timeout_s": DECODER_IO_TIMEOUT_S, "connect_timeout_s": 2.0},
            **common,
        ),
        log_dir / "decoder.log",
    )
    b = VllmServer(ServerSpec(port=free_port(), **common), log_dir / "plain.log")
    servers = [p, d, b]
    try:
        t0 = time.monotonic()
        for s in servers:
            s.start()
        for s in servers:
            s.wait_healthy(timeout=600)
        print(f"\n3 vLLM servers healthy after {time.monotonic() - t0:.0f}s; logs in {log_dir}")
        yield Cluster(p, d, b, log_dir)
    finally:
        for s in servers:
            s.stop()
    left = {pid for s in servers for g in s.started_groups for pid in group_members(g)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"vLLM processes outlived the test session: {sorted(left)}"

"""One vLLM OpenAI server process: its command line, start-up until healthy, and stop.

Started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` script looks for a
distribution named "vllm", which the CPU build is not), in its own process group so that stopping
it takes its engine and worker processes with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pdrun.launch.supervisor import answers_health, wait_group_gone

Role = Literal["plain", "kv_producer", "kv_consumer", "kv_both"]
CONNECTOR_MODULE = "pdrun.pd.connector"


def kv_transfer_config(role: Role, kv_port: int, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    if role == "plain":
        return None
    return {
        "kv_connector": "PDConnector",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": role,
        "kv_port": kv_port,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra or {},
    }


@dataclass
class ServerSpec:
    model: str
    port: int
    role: Role = "plain"
    kv_port: int = 14579
    served_name: str = "tiny"
    host: str = "127.0.0.1"
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: str = "auto"
    max_model_len: int | None = 4096
    connector: dict[str, Any] = field(default_factory=dict)  # kv_connector_extra_config
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
        ]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.device == "cpu":
            cmd.append("--enforce-eager")  # torch.compile costs a minute of start-up for nothing on a tiny model
        ktc = kv_transfer_config(self.role, self.kv_port, self.connector)
        if ktc is not None:
            cmd += ["--kv-transfer-config", json.dumps(ktc)]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # vLLM's "auto" binding pins every instance's worker to the same cores; a decoder that
            # busy-polls while it waits for KV then starves the prefiller's transfer threads there.
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            # OpenMP threads that spin after each step take the cores from the other instances
            # sharing them: 1P1D's time per output token on 2 cores went 110 -> 30 ms with passive.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.update(self.env)
        return env


class VllmServer:
    """A running vLLM server. `start()` returns at once; `wait_healthy()` blocks until /health is 200."""

    def __init__(self, spec: ServerSpec, log_path: str | os.PathLike):
        self.spec = spec
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_groups: list[int] = []  # every process group it started, for leak checks

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.port}"

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.spec.command(),
                env=self.spec.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() takes engine and workers with it
            )
        self.started_groups.append(self.proc.pid)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        return answers_health(f"{self.url}/health")

    def wait_healthy(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"vLLM on port {self.spec.port} exited during start-up; last lines:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"vLLM on port {self.spec.port} not healthy after {timeout:.0f}s; last lines:\n{self.tail()}"
        )

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `grace` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        self._kill_group(pgid)

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once (a crash, for tests of fault handling)."""
        if self.proc is not None:
            self._kill_group(self.proc.pid)

    def _kill_group(self, pgid: int) -> None:
        # The leader may be gone while its engine and workers are not: kill the group, wait for all.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        wait_group_gone(pgid, 15)
        self.proc = None

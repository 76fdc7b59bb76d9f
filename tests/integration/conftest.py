"""Real processes on CPU with the tiny model, started once per test session.

`pdrun launch` deploys 1 prefiller and 2 decoders (PDConnector) behind the proxy, with its cache
server (memory and a disk tier), as a user would start it; a plain vLLM is the reference every
output is compared with. Tests talk to the proxy or to the instances directly. All listen on
127.0.0.1. The deployment's last test stops it with SIGINT (see test_launch.py); whatever is left
at the end fails the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pdrun import transfer
from pdrun.launch import tiny_model
from pdrun.launch.config import KV_PORTS_PER_INSTANCE
from pdrun.launch.supervisor import group_members
from pdrun.launch.systems import free_port, free_ports
from pdrun.launch.vllm_server import ServerSpec, VllmServer

pytestmark = pytest.mark.integration
DECODER_IO_TIMEOUT_S = 4.0
DECODERS = 2


def processes_with_env(key: str, value: str) -> set[int]:
    """Live processes whose environment has key=value: a deployment's children and all they started."""
    needle = f"{key}={value}".encode()
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        out.add(int(entry.name))
            except OSError:
                continue
    return out


def get_json(url: str, timeout: float = 5) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # the proxy's /health answers 503 with its state
        return json.loads(e.read())


@dataclass
class Instance:
    """One vLLM instance of the deployment, as the supervisor's state.json describes it."""

    deployment: Deployment
    name: str

    @property
    def url(self) -> str:
        return self.deployment.state()["children"][self.name]["url"]

    @property
    def pid(self) -> int:
        return self.deployment.state()["children"][self.name]["pid"]

    @property
    def starts(self) -> int:
        return self.deployment.state()["children"][self.name]["starts"]

    @property
    def log_path(self) -> Path:
        return Path(self.deployment.state()["children"][self.name]["log"])

    def kill(self) -> None:
        """SIGKILL its whole process group: a crash of the instance, engine and workers included."""
        os.killpg(self.pid, signal.SIGKILL)


@dataclass
class Deployment:
    proc: subprocess.Popen[bytes]
    run_dir: Path
    proxy_url: str
    cache_port: int
    cache_dir: Path | None
    kv_port: int  # the first instance's (prefill-0's) first transfer port

    @property
    def cache_address(self) -> str:
        return f"tcp://127.0.0.1:{self.cache_port}"

    @property
    def auth_token(self) -> str:
        """The secret `pdrun launch` made for its ports, from RUN_DIR/auth-token."""
        return (self.run_dir / "auth-token").read_text().strip()

    @property
    def cache_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.cache_port + 1}"

    def staging_held(self) -> int:
        """Hand-offs prefill-0's staging pool holds for decoders that have yet to release them."""
        address = f"tcp://127.0.0.1:{self.kv_port}"
        with transfer.connect(address, auth_token=self.auth_token, connect_timeout=2, io_timeout=5) as conn:
            return conn.call("ping").meta["held"]

    def state(self) -> dict:
        return json.loads((self.run_dir / "state.json").read_text())

    def output(self) -> str:
        return (self.run_dir / "launcher.out").read_text(errors="replace")

    def processes(self) -> set[int]:
        return processes_with_env("PDRUN_RUN_DIR", str(self.run_dir))

    def stop(self) -> None:
        """Ctrl-C, as a user stops it; SIGKILL to the whole group if it is not gone within 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def in_rotation(self) -> set[str]:
        """URLs of the backends the proxy routes to now."""
        h = get_json(f"{self.proxy_url}/health")
        return {b["url"] for b in h.get("prefill", []) + h.get("decode", []) if b["healthy"]}

    def wait_ready(self, names: list[str], timeout: float, since_starts: dict[str, int] | None = None) -> None:
        """Until the deployment is ready (started and warmed up) and each named instance is healthy
        (restarted, if since_starts says) and in the proxy's rotation."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdrun launch exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                state = self.state()
                children = state["children"]
                fresh = all(children[n]["starts"] > (since_starts or {}).get(n, 0) for n in names)
                up = state["ready"] and all(children[n]["state"] == "healthy" for n in names)
                if fresh and up and {children[n]["url"] for n in names} <= self.in_rotation():
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{names} not ready after {timeout:.0f}s:\n{self.output()[-4000:]}")


@dataclass
class Cluster:
    deployment: Deployment
    plain: VllmServer

    @property
    def proxy_url(self) -> str:
        return self.deployment.proxy_url

    @property
    def prefiller(self) -> Instance:
        return Instance(self.deployment, "prefill-0")

    @property
    def decoder(self) -> Instance:
        return Instance(self.deployment, "decode-0")

    @property
    def decoders(self) -> list[Instance]:
        return [Instance(self.deployment, f"decode-{i}") for i in range(DECODERS)]

    def wait_restarted(self, inst: Instance, starts_before: int, timeout: float = 400) -> None:
        self.deployment.wait_ready([inst.name], timeout, since_starts={inst.name: starts_before})


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("model") / "tiny")


def start_deployment(
    model_dir: Path,
    run_dir: Path,
    cache_dir: Path | None,
    prefill: int = 1,
    decode: int = DECODERS,
    **settings: object,
) -> Deployment:
    n = prefill + decode
    port = free_port()
    span = (1 + KV_PORTS_PER_INSTANCE) * n  # http, kv; the cache's two ports follow
    base = free_ports(span + 2)
    config = {
        "model": str(model_dir),
        "served_model_name": "tiny",
        "prefill": prefill,
        "decode": decode,
        "port": port,
        "instance_port": base,
        "kv_port": base + n,
        "cache_port": base + span,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "dtype": "float32",
        "max_model_len": 4096,
        "run_dir": str(run_dir),
        "connector": {"io_timeout_s": DECODER_IO_TIMEOUT_S, "connect_timeout_s": 2.0},
        **settings,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "deploy.yaml").write_text(yaml.safe_dump(config))
    with open(run_dir / "launcher.out", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdrun.launch", "launch", "--config", str(run_dir / "deploy.yaml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # our Ctrl-C does not reach it; the test sends its own
        )
    return Deployment(proc, run_dir, f"http://127.0.0.1:{port}", base + span, cache_dir, base + n)


@contextlib.contextmanager
def running_cluster(model_dir: Path, log_dir: Path, **settings: object) -> Iterator[Cluster]:
    """A plain vLLM and the 1P2D deployment (`settings` as in start_deployment), stopped after;
    whatever of them is left then fails the test."""
    plain = VllmServer(
        ServerSpec(model=str(model_dir), port=free_port(), dtype="float32", max_model_len=4096), log_dir / "plain.log"
    )
    deployment = None
    try:
        t0 = time.monotonic()
        plain.start()
        deployment = start_deployment(model_dir, log_dir / "run", log_dir / "cache", **settings)
        names = ["prefill-0"] + [f"decode-{i}" for i in range(DECODERS)]
        deployment.wait_ready(names, timeout=900)
        plain.wait_healthy(timeout=600)
        print(f"\n1P{DECODERS}D + plain vLLM healthy after {time.monotonic() - t0:.0f}s; logs in {log_dir}")
        yield Cluster(deployment, plain)
    finally:
        plain.stop()
        left = {pid for g in plain.started_groups for pid in group_members(g)}
        if deployment is not None:
            deployment.stop()
            time.sleep(1)
            left |= deployment.processes()
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes outlived the test: {sorted(left)}"


def log_dir_for(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where a cluster's logs go: PDRUN_TEST_LOGS/NAME if set, else a temporary directory."""
    root = os.environ.get("PDRUN_TEST_LOGS")
    if root:
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        return Path(root) / name
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(model_dir, log_dir_for(tmp_path_factory, "logs")) as c:
        yield c


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `stops_deployment` run last but for those marked `after_deployment`, which need
    it stopped: after them there is no deployment to test."""

    def order(item: pytest.Item) -> int:
        if item.get_closest_marker("after_deployment"):
            return 2
        return 1 if item.get_closest_marker("stops_deployment") else 0

    items.sort(key=order)

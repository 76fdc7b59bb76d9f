"""The systems `pdrun bench` compares: how each one starts on its GPUs, where its OpenAI endpoint
is, and how it stops and restarts.

    plain            one vLLM, prefix caching on
    offload          one vLLM with its native CPU offloading (--kv-offloading-size)
    lmcache          one vLLM with LMCache's connector, where the lmcache package imports
    pdrun-tier       pdrun launch --prefill 0 --decode 1, with the cache tier
    pdrun-1p1d       pdrun launch --prefill 1 --decode 1, no cache tier
    pdrun-1p1d-tier  the same with the cache tier
    pdrun-XpYd       any other shape, e.g. pdrun-2p2d (-tier for the cache tier)
    plain-dp         one plain vLLM per GPU of the largest PD system, behind `pdrun proxy` round robin:
                     PD's baseline on the same GPUs

Every system serves the same model under the same name; each is a process group of its own, so
stopping one leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from prometheus_client.parser import text_string_to_metric_families

from pdrun.launch.config import KV_PORTS_PER_INSTANCE, LaunchConfig
from pdrun.launch.supervisor import answers_health, wait_group_gone
from pdrun.launch.vllm_server import ServerSpec, VllmServer
from pdrun.pd.config import load_config

PD_SHAPE = re.compile(r"^pdrun-(\d+)p(\d+)d(-tier)?$")
SINGLE = {
    "plain": "one vLLM, prefix caching on",
    "offload": "one vLLM with its native CPU offloading",
    "lmcache": "one vLLM with LMCache's connector",
    "pdrun-tier": "pdrun: one instance with the cache tier",
}


# pdrun counters a bench reports per workload (their increase), under these names.
COUNTERS = {
    "pdrun:load_failures_total": "kv_load_failures",  # hand-offs and tier loads that were recomputed
    "pdrun:staging_evictions_total": "staging_evictions",  # staged chunks evicted before their decoder came
    "pdrun:staging_deferred_prefills_total": "staging_deferred_prefills",  # prefills that waited for staging room
    "pdrun:cache_store_dropped_total": "cache_chunks_dropped",  # chunks the tier could not take
    "pdrun:cache_store_no_room_total": "cache_chunks_no_room",  # ... of them, for want of a slot free of pins
    "pdrun:loaded_bytes_total": "handoff_bytes",  # pulled from prefillers ...
    "pdrun:load_seconds_total": "handoff_seconds",  # ... in this long, summed over the hand-offs
    "pdrun:cache_in_step_tokens_total": "cache_in_step_tokens",  # loaded from the tier inside the step
    "pdrun:cache_prefetched_tokens_total": "cache_prefetched_tokens",  # loaded from copies made on a hint
    "pdrun:cache_prefetch_copied_tokens_total": "cache_prefetch_copied_tokens",  # copied on hints, used or not
    "pdrun:cache_loaded_tokens_total": "cache_loaded_tokens",  # loaded from the tier ...
    "pdrun:cache_disk_loaded_tokens_total": "cache_disk_loaded_tokens",  # ... of them, read from its disk
}
# A pdrun deployment's proxy: requests it saved from a decoder that failed them.
PROXY_COUNTERS = {
    "pdrun:proxy_decode_retries_total": "requests_moved",  # to another decoder before any answer
    "pdrun:proxy_decode_resumed_total": "streams_resumed",  # ... mid-stream, going on after its tokens
}
# Every system's engine, as vLLM counts them: requests preempted for want of KV room (each
# recomputes, or reloads, what it had computed); prompt tokens computed, found in the GPU's prefix
# cache, and loaded by a connector or offload; seconds requests waited to be scheduled (a load
# beside the steps included) and from then to their first token, summed over requests.
ENGINE_COUNTERS = {
    "vllm:num_preemptions_total": "preemptions",
    'vllm:prompt_tokens_by_source_total{source="local_compute"}': "prompt_tokens_computed",
    'vllm:prompt_tokens_by_source_total{source="local_cache_hit"}': "prompt_tokens_gpu_cached",
    'vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}': "prompt_tokens_loaded",
    "vllm:request_queue_time_seconds_sum": "queued_s_sum",
    "vllm:request_prefill_time_seconds_sum": "prefill_s_sum",
}


class SystemFailure(Exception):
    """A system that cannot be planned or started: the message says which and why."""


@dataclass
class Settings:
    """What every system is started with."""

    model: str
    served_name: str = "m"
    device: Literal["cpu", "cuda"] = "cuda"
    max_model_len: int | None = None
    gpu_blocks: int | None = None  # vLLM's --num-gpu-blocks-override, every instance
    gpu_memory_utilization: float | None = None
    offload_gb: float = 40.0  # offload and lmcache: CPU memory for KV
    cache_cpu_gb: float = 40.0  # pdrun's cache tier
    cache_disk_gb: float | None = None  # its disk (None: launch's 50 GiB, or a share of the free space; 0: none)
    transport: str = "tcp"
    enforce_eager: bool = False
    vllm_args: list[str] = field(default_factory=list)

    def instance_args(self) -> list[str]:
        args = list(self.vllm_args)
        if self.gpu_blocks is not None:
            args += ["--num-gpu-blocks-override", str(self.gpu_blocks)]
        if self.device == "cuda":
            if self.gpu_memory_utilization is not None:
                args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
            if self.enforce_eager:
                args.append("--enforce-eager")
            if not any(Path(self.model).glob("*.safetensors")) and Path(self.model).is_dir():
                args += ["--load-format", "dummy"]  # a shape only: random weights, the same in every system
        return args


def split(name: str) -> tuple[str, dict[str, Any]]:
    """A system's kind and the PDConnector settings its name adds after `@`, for pdrun's systems
    (`pdrun-1p1d@chunks_per_frame=1@load_threads=1`: the same deployment with other settings, to
    compare side by side); SystemFailure naming what is wrong with them."""
    kind, *pairs = name.split("@")
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemFailure(f"system {name!r}: give connector settings after @ as KEY=VALUE, not {pair!r}")
        settings[key] = yaml.safe_load(value)
    if settings and not kind.startswith("pdrun-"):
        raise SystemFailure(f"system {name!r}: only pdrun's systems take connector settings after @")
    try:
        load_config(settings)
    except ValueError as e:
        raise SystemFailure(f"system {name!r}: {e}") from None
    return kind, settings


def gpus_needed(name: str, largest_pd: int = 2) -> int:
    """GPUs a system takes (on CPU, the number of vLLM instances)."""
    name, _ = split(name)
    if name in SINGLE:
        return 1
    if name == "plain-dp":
        return largest_pd
    m = PD_SHAPE.match(name)
    if m is None:
        known = ", ".join([*SINGLE, "pdrun-1p1d", "pdrun-1p1d-tier", "pdrun-XpYd[-tier]", "plain-dp"])
        raise SystemFailure(f"unknown system {name!r}; known: {known}")
    return int(m.group(1)) + int(m.group(2))


def pd_shape(name: str) -> tuple[int, int] | None:
    """(prefillers, decoders) of a pdrun deployment (pdrun-tier: one decoder alone); None for the
    other systems."""
    kind, _ = split(name)
    if kind == "pdrun-tier":
        return 0, 1
    m = PD_SHAPE.match(kind)
    return (int(m.group(1)), int(m.group(2))) if m else None


def last_decoder(decoders: int) -> str:
    """What `pdrun launch` names the last of a deployment's `decoders` (decode-1 of two)."""
    return f"decode-{decoders - 1}"


def persists(name: str) -> bool:
    """Whether a full restart keeps what it cached: pdrun's cache tier, which the bench gives a disk."""
    name, _ = split(name)
    return name == "pdrun-tier" or (name.startswith("pdrun-") and name.endswith("-tier"))


def unavailable(name: str) -> str | None:
    """Why a system cannot run here, if it cannot (it is then reported, not run)."""
    if split(name)[0] == "lmcache" and importlib.util.find_spec("lmcache") is None:
        return "the lmcache package is not installed beside this vLLM"
    return None


# Ports handed out by this process: a port is free until the system it went to binds it, and the
# systems of one wave are all configured before any starts.
_handed: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before by this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed:
            _handed.add(port)
            return port


def free_ports(n: int) -> int:
    """The first of n consecutive ports free now, none handed out before by this process."""
    for base in range(21000 + os.getpid() % 89 * 100, 60000, 173):
        if not _handed.isdisjoint(range(base, base + n)):
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            _handed.update(range(base, base + n))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemFailure(f"no {n} consecutive free ports")


def healthy(url: str) -> bool:
    return answers_health(f"{url}/health")


class System:
    """One system under test: started with `start()` (returns at once), then `wait_ready()`."""

    def __init__(self, name: str, gpus: list[int], settings: Settings, run_dir: Path):
        self.name, self.gpus, self.settings, self.run_dir = name, gpus, settings, run_dir
        self.url = ""  # its OpenAI endpoint (the proxy, or the one vLLM)
        self.instance_urls: list[str] = []  # its vLLM instances, for their metrics
        self.serving_urls: list[str] = []  # of them, those that answer a request alone (where there are several)

    def start(self) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kv_capacity_tokens(self) -> int | None:
        """The most tokens one of its instances holds in its GPU (or CPU backend) KV cache, from
        vLLM's `vllm:cache_config_info`; None where no instance says."""
        best = None
        for url in self.instance_urls:
            text = metrics_text(url)
            if text is None:
                continue
            for line in text.splitlines():
                if line.startswith("vllm:cache_config_info{"):
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                    with contextlib.suppress(KeyError, ValueError):
                        tokens = int(labels["num_gpu_blocks"]) * int(labels["block_size"])
                        best = max(best or 0, tokens)
        return best

    def counters(self, instances: Sequence[str] | None = None) -> dict[str, float]:
        """vLLM's counters every system has (`ENGINE_COUNTERS`), summed over its instances (or
        those of `instances`); a pdrun system adds its own."""
        return summed_counters(self.instance_urls if instances is None else list(instances), ENGINE_COUNTERS)

    def restart(self, timeout: float) -> None:
        """A full restart: every process stopped, then started again (a disk tier is kept)."""
        self.stop()
        self.start()
        self.wait_ready(timeout)


class VllmSystem(System):
    """plain, offload, lmcache, and plain-dp (one plain vLLM per GPU behind `pdrun proxy`)."""

    def __init__(self, name: str, gpus: list[int], settings: Settings, run_dir: Path):
        super().__init__(name, gpus, settings, run_dir)
        self.servers: list[VllmServer] = []
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_port = 0

    def _spec(self, gpu: int | None) -> ServerSpec:
        s = self.settings
        args = s.instance_args()
        env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": str(gpu)} if s.device == "cuda" and gpu is not None else {}
        if self.name == "offload":
            args += ["--kv-offloading-size", f"{s.offload_gb:g}"]
        elif self.name == "lmcache":
            args += ["--kv-transfer-config", json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"})]
            env.update(LMCACHE_LOCAL_CPU="True", LMCACHE_MAX_LOCAL_CPU_SIZE=f"{s.offload_gb:g}")
        return ServerSpec(
            model=s.model,
            port=free_port(),
            served_name=s.served_name,
            device=s.device,
            max_model_len=s.max_model_len,
            extra_args=args,
            env=env,
        )

    def start(self) -> None:
        gpus: list[int | None] = list(self.gpus) if self.settings.device == "cuda" else [None] * len(self.gpus)
        self.servers = []
        for k, gpu in enumerate(gpus):
            server = VllmServer(self._spec(gpu), self.run_dir / f"{self.name}-{k}.log")
            self.servers.append(server.start())
        self.instance_urls = [s.url for s in self.servers]
        self.url = self.instance_urls[0]
        if self.name == "plain-dp":
            self.serving_urls = list(self.instance_urls)
            self.proxy_port = free_port()
            argv = [
                sys.executable,
                "-m",
                "pdrun.launch",
                "proxy",
                "--policy",
                "round_robin",
                "--port",
                str(self.proxy_port),
            ]
            argv += ["--decode", ",".join(self.instance_urls)]
            with open(self.run_dir / f"{self.name}-proxy.log", "ab") as log:
                self.proxy = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.url = f"http://127.0.0.1:{self.proxy_port}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for server in self.servers:
            try:
                server.wait_healthy(max(1.0, deadline - time.monotonic()))
            except (RuntimeError, TimeoutError):
                raise SystemFailure(f"{self.name}: {last_error(server.log_path)} ({server.log_path})") from None
        while not healthy(self.url):
            if self.proxy is not None and self.proxy.poll() is not None:
                raise SystemFailure(f"{self.name}: its proxy exited ({self.run_dir / f'{self.name}-proxy.log'})")
            if time.monotonic() > deadline:
                raise SystemFailure(f"{self.name}: not ready after {timeout:.0f}s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proxy is not None:
            _stop_group(self.proxy)
            self.proxy = None
        for server in self.servers:
            server.stop()


class PdrunSystem(System):
    """`pdrun launch`, as a user starts it, from a YAML file of its own. With `restart_instances`
    its supervisor restarts an instance that dies (as `pdrun launch` does by default); without, the
    instance stays down, and the requests it fails say so."""

    def __init__(
        self,
        name: str,
        gpus: list[int],
        settings: Settings,
        run_dir: Path,
        cache_dir: Path | None,
        restart_instances: bool = False,
    ):
        super().__init__(name, gpus, settings, run_dir)
        self.cache_dir = cache_dir
        self.restart_instances = restart_instances
        self.proc: subprocess.Popen[bytes] | None = None
        _, self.connector = split(name)
        self.prefill, self.decode = pd_shape(name) or (0, 1)
        self.tier = persists(name)
        self.config: dict[str, object] = {}

    def _config(self) -> dict[str, object]:
        s = self.settings
        n = self.prefill + self.decode
        base = free_ports((1 + KV_PORTS_PER_INSTANCE) * n + 2)  # http, kv, then the cache's two
        config: dict[str, object] = {
            "model": s.model,
            "served_model_name": s.served_name,
            "prefill": self.prefill,
            "decode": self.decode,
            "port": free_port(),
            "instance_port": base,
            "kv_port": base + n,
            "cache_port": base + (1 + KV_PORTS_PER_INSTANCE) * n,
            "transport": s.transport,
            "device": s.device,
            "cache_cpu_gb": s.cache_cpu_gb if self.tier else 0,
            "run_dir": str(self.run_dir / self.name),
            "echo_logs": False,
            "restart": self.restart_instances,
            "vllm_args": s.instance_args(),
            "connector": self.connector,
        }
        if s.device == "cuda":
            config["gpus"] = list(self.gpus)
        if s.max_model_len is not None:
            config["max_model_len"] = s.max_model_len
        if self.tier and self.cache_dir is not None and s.cache_disk_gb != 0:
            config["cache_dir"] = str(self.cache_dir)
            if s.cache_disk_gb is not None:
                config["cache_disk_gb"] = s.cache_disk_gb
        return config

    def start(self) -> None:
        if not self.config:
            self.config = self._config()  # the same ports and cache dir across restarts
        path = self.run_dir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config))
        with open(self.run_dir / f"{self.name}-launch.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pdrun.launch", "launch", "--config", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{self.config['port']}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = self.state_path
        while True:
            if self.proc is None or self.proc.poll() is not None:
                logs = Path(str(self.config["run_dir"])) / "logs"
                why = next((e for log in sorted(logs.glob("*.log")) if (e := last_error(log, ""))), "it exited")
                raise SystemFailure(f"{self.name}: {why} ({logs})")
            with contextlib.suppress(OSError, ValueError, KeyError):
                said = json.loads(state.read_text())
                instances = [c for n, c in said["children"].items() if n.startswith(("prefill-", "decode-"))]
                if said["ready"] and healthy(self.url):
                    self.instance_urls = [c["url"] for c in instances]
                    decoders = [c["url"] for n, c in said["children"].items() if n.startswith("decode-")]
                    self.serving_urls = decoders if len(decoders) > 1 else []
                    return
            if time.monotonic() > deadline:
                raise SystemFailure(f"{self.name}: not ready after {timeout:.0f}s")
            time.sleep(0.5)

    def counters(self, instances: Sequence[str] | None = None) -> dict[str, float]:
        """pdrun's own counters (`COUNTERS`: what went wrong, what it moved and how) beside vLLM's,
        and its proxy's (`PROXY_COUNTERS`)."""
        urls = self.instance_urls if instances is None else list(instances)
        return summed_counters(urls, COUNTERS | ENGINE_COUNTERS) | summed_counters([self.url], PROXY_COUNTERS)

    @property
    def state_path(self) -> Path:
        """The supervisor's state.json: each instance's pid, URL, state and starts."""
        return Path(str(self.config["run_dir"])) / "state.json"

    @property
    def last_decoder(self) -> str:
        """The name the supervisor gives its last decoder (decode-1 of two)."""
        return last_decoder(self.decode)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGINT, grace=90)  # Ctrl-C: the supervisor stops its children
            self.proc = None


def child_state(state_path: Path, name: str) -> dict[str, Any]:
    """What the supervisor's state.json says of its child `name`: pid, state, url, starts, log."""
    return json.loads(state_path.read_text())["children"][name]


def kill_instance(state_path: Path, name: str) -> int:
    """SIGKILL the process that the supervisor's state.json names `name`, as `kill -9 <pid>` would:
    a vLLM API server, whose engine the supervisor then reaps (and, with restart on, starts it
    again). Its starts so far; SystemFailure where it is not running."""
    child = child_state(state_path, name)
    if child["pid"] is None or child["state"] in ("down", "stopped"):
        raise SystemFailure(f"{name} is not running ({child['state']})")
    os.kill(child["pid"], signal.SIGKILL)
    return child["starts"]


def rejoined(state_path: Path, proxy_url: str, name: str, starts_before: int) -> bool:
    """Whether instance `name` started again since `starts_before` (state.json counts its starts),
    answers its supervisor's health checks, and is in the proxy's rotation again."""
    try:
        child = child_state(state_path, name)
    except (OSError, ValueError, KeyError):  # read as it is replaced, or gone with the deployment
        return False
    if child["starts"] <= starts_before or child["state"] != "healthy":
        return False
    return any(b["url"] == child["url"] and b["healthy"] for b in proxy_health(proxy_url).get("decode", []))


def proxy_health(url: str) -> dict[str, Any]:
    """The proxy's GET /health: every backend's state (it answers 503 while no decoder is in its
    rotation); {} where it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(e.read())
        return {}
    except (OSError, ValueError):
        return {}


def summed_counters(urls: list[str], names: dict[str, str]) -> dict[str, float]:
    """The samples `names` (sample: figure) summed over the instances at `urls`; none at all where
    an instance does not answer (no figures rather than a wrong 0)."""
    out = dict.fromkeys(names.values(), 0.0)  # a counter never raised is not exported
    for url in urls:
        text = metrics_text(url)
        if text is None:
            return {}
        for sample, value in summed(text, names).items():
            out[names[sample]] += value
    return out


def metrics_text(url: str) -> str | None:
    """The instance's /metrics page; None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            return r.read().decode()
    except OSError:
        return None


def summed(text: str, names: Iterable[str]) -> dict[str, float]:
    """Each of the samples `names` on a /metrics page, summed over its labels (0 where absent); a
    name may pick one label's value, as `name{label="value"}`."""
    out = dict.fromkeys(names, 0.0)
    wanted: dict[str, list[tuple[str, tuple[str, str] | None]]] = {}
    for name in out:
        sample, _, picked = name.partition("{")
        label, _, value = picked.rstrip("}").partition("=")
        wanted.setdefault(sample, []).append((name, (label, value.strip('"')) if picked else None))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, pick in wanted.get(sample.name, ()):
                if pick is None or sample.labels.get(pick[0]) == pick[1]:
                    out[name] += sample.value
    return out


def last_error(log: Path, default: str = "exited during start-up") -> str:
    """The last line of a log that names an error, for a message."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return default
    errors = [ln for ln in lines if re.search(r"\b\w*Error\b|\berror:", ln) and "WARNING" not in ln]
    return errors[-1].split("] ")[-1].strip()[:400] if errors else default


def _stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_group_gone(proc.pid, 15)


def disk_share(run_dir: Path, tiers: int) -> float | None:
    """Each of `tiers` cache tiers' disk, GiB: launch's default, or less where the disk under
    `run_dir` would not hold them all (a full disk turns a tier's disk off, and restarts lose it)."""
    if tiers == 0:
        return None
    free = shutil.disk_usage(run_dir).free * 0.8 / tiers / (1 << 30)
    default = LaunchConfig.model_fields["cache_disk_gb"].default
    return None if free >= default else max(0.1, math.floor(free * 10) / 10)


def make(name: str, gpus: list[int], settings: Settings, run_dir: Path, restart_instances: bool = False) -> System:
    """The system `name` on `gpus`; a pdrun deployment's supervisor restarts dead instances with
    `restart_instances`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if split(name)[0] in ("plain", "offload", "lmcache", "plain-dp"):
        return VllmSystem(name, gpus, settings, run_dir)
    cache_dir = run_dir / f"{name}-cache"  # a disk tier, so that a full restart keeps what it stored
    return PdrunSystem(name, gpus, settings, run_dir, cache_dir, restart_instances)

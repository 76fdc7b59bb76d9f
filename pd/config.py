"""PDConnector settings, read from vLLM's `kv_connector_extra_config` and validated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdrun.pd.params import MAX_FRAME_CHUNKS

if TYPE_CHECKING:  # the CLI reads this config; torch is imported only where KV moves
    import torch


class ConnectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(256, gt=0, description="tokens per chunk; a multiple of the KV block size")
    transport: Literal["tcp", "ucx"] = Field("tcp", description="how decoders pull hand-offs: tcp or ucx (ucxx)")
    host: str = Field("127.0.0.1", description="where a producer's transfer endpoint listens")
    advertise_host: str | None = Field(None, description="the host decoders dial (default: host)")
    port: int | None = Field(None, ge=1, le=65535, description="first endpoint port (default: kv_port); +1 per TP rank")
    staging_gb: float | None = Field(
        None,
        gt=0,
        description="producer: GiB of chunks kept for decoders to pull; default: a quarter of this instance's KV "
        "cache, at least 2, at most half the memory free where they wait (GPU or host) once the KV cache is "
        "allocated",
    )
    staging_ttl_s: float = Field(300.0, gt=0, description="producer: how long an unreleased hand-off stays")
    staging_wait_s: float = Field(
        30.0,
        ge=0,
        description="producer: how long a hand-off its decoder has yet to pull holds room in the staging pool: while "
        "hand-offs younger than this fill it, new prefills wait in the queue; older ones give way (evicted when a "
        "newer one needs the room; their decoders prefill them). A chunk that finds the pool full anyway waits this "
        "long for releases before the oldest is evicted; 0: evict at once",
    )
    staging_memory: Literal["auto", "host", "device"] = Field(
        "auto",
        description="producer: where staged chunks wait; auto: GPU memory when the KV cache is on a GPU and the "
        "transport is ucx (GPU to GPU, no host copy), else host memory (pinned beside a GPU). A consumer with a "
        "GPU cache over ucx receives chunks in GPU memory whatever the producer staged them in (UCX moves "
        "host-staged chunks into GPU memory itself, through GPU fragments); else in host memory",
    )
    layerwise: bool = Field(
        False,
        description="producer: copy each layer of the chunks a step finishes out of the KV cache as soon as "
        "that layer's attention has run (vLLM's save_kv_layer), rather than every layer once the forward pass "
        "is queued: the copies (host-staged: and the copies out to host memory) overlap the rest of the "
        "forward pass. Consumer: run a request with a hand-off at once and load the hand-off inside that "
        "step's forward pass, layer by layer (vLLM's wait_for_layer_load), rather than whole before the "
        "request is scheduled: later layers arrive while earlier ones compute, but the step's other requests "
        "wait for the transfer too, and a failed hand-off is recomputed whole (not taken from the cache tier). "
        "A decoder needs vLLM >= 0.32 and async scheduling off for it (--no-async-scheduling), for vLLM to "
        "recompute a failed hand-off right; else it loads whole chunks and says so",
    )
    connect_timeout_s: float = Field(5.0, gt=0)
    io_timeout_s: float = Field(30.0, gt=0, description="consumer: longest wait for one chunk")
    checksums: bool | None = Field(
        None,
        description="xxh3-64 over every chunk moved in host memory, verified on receipt; default: on over tcp "
        "(hand-offs and the cache tier), off over ucx, whose shared-memory, cma, cuda_ipc and RDMA transports "
        "guard their own bytes (hashing both ends would halve a host-staged hand-off)",
    )
    load_threads: int = Field(2, ge=1, le=64, description="consumer: hand-offs pulled in parallel")
    switch_interval_us: float = Field(
        200,
        gt=0,
        le=100_000,
        description="the longest an engine thread busy in Python keeps the GIL from a transfer, lookup or copy "
        "thread waiting for it, in this instance's engine and worker processes (Python's sys.setswitchinterval; "
        "its own default is 5000): such a thread waits for the GIL after every short wait of its own, several per "
        "chunk, and at 5 ms a busy engine holds a hand-off to a fraction of the wire's speed",
    )
    load_lanes: int | None = Field(
        None,
        ge=1,
        le=16,
        description="consumer: connections one hand-off is pulled over at once, each taking a contiguous share "
        "of its chunks; default 2 over tcp (one TCP connection is bound by one thread's checksums and copies), "
        "1 over ucx",
    )
    chunks_in_flight: int = Field(
        16,
        ge=1,
        le=64,
        description="consumer: chunks of one hand-off being received at once over ucx while earlier ones are "
        "placed (at least two frames), and with the Triton copies the chunks placed in one launch; each holds a "
        "chunk buffer (32 MiB for 256 tokens of an 8B model), and one more frame's worth with the Triton copies",
    )
    chunks_per_frame: int = Field(
        8,
        ge=1,
        le=MAX_FRAME_CHUNKS,
        description="consumer receiving into GPU memory over ucx: adjacent chunks of a hand-off sent as one "
        "message, where the prefiller's staging is in GPU memory too (joined there, or as they lie when back to "
        "back): each message costs the threads at both ends a wait for the GIL, which a busy engine draws out",
    )
    cache: str | None = Field(
        None, description="a `pdrun cache-server` (tcp://HOST:PORT) shared by all instances; none: no cache tier"
    )
    cache_timeout_s: float = Field(2.0, gt=0, description="longest wait on the cache for one call; then a miss")
    cache_retry_s: float = Field(5.0, ge=0, description="after a cache failure, skip the cache this long")
    cache_write_queue_mb: float = Field(
        512,
        gt=0,
        description="chunks waiting to be written behind to a cache server on another host; beyond, new ones "
        "are dropped (on the server's own host chunks go through its shared memory and wait for nothing)",
    )
    cache_local: bool = Field(
        True,
        description="on the cache server's host, move chunks through its shared memory (the server's arena, "
        "mapped here; control messages over a unix socket) instead of its network port",
    )
    cache_disk_load: Literal["auto", "always", "never"] = Field(
        "auto",
        description="load chunks the tier has only on disk: auto: when this instance reads them faster than it "
        "prefills (both measured as it runs and kept beside the tier's disk, so a restart decides at once; while "
        "the disk is not measured, none before this run's first prefill, then two chunks of a prompt); always; "
        "never (recompute them)",
    )
    cache_answers: bool = Field(
        True,
        description="store the full chunks past a prompt too, as the answer fills them (the prompt's last chunk "
        "completed, then the answer's own): a conversation's next turn sends the answer back inside its prompt "
        "and loads those chunks rather than recomputing them, as vLLM's own prefix cache reuses the blocks of "
        "answers; false: prompts' chunks only",
    )
    cache_load_in_step: Literal["auto", "never", "idle", "always"] = Field(
        "auto",
        description="on the cache server's host, where the prefix a request lacks is in the tier's memory: run "
        "the request at once and copy its prefix in inside that step's forward pass, layer by layer (each "
        "attention layer waits for its own layer's copy), rather than before the request is scheduled, beside "
        "the engine's steps. The step's other requests wait for the copy too (about 20 ms per GiB), so idle: only "
        "when no other request is running; always; never; auto (the default): idle where the KV cache is on a GPU "
        "(what the proxy's hint copied in ahead is then read as the forward pass runs, with no scheduling round "
        "around the load), never elsewhere",
    )
    cache_prefetch_gb: float | None = Field(
        None,
        ge=0,
        description="on the cache server's host, device memory (GiB) for prompts' prefixes copied out of the tier "
        "ahead of their requests: the proxy names a decoder-only request's token ids to the instance it picked (on "
        "prefetch_port) and the copy crosses the bus while vLLM's front end handles the request. 0: none. Default: "
        "where the KV cache is on a GPU, room for one prompt of the longest this instance takes (max_model_len "
        "tokens), at most a quarter of the GPU memory free once vLLM has allocated its KV cache; none elsewhere "
        "(no bus to cross). Needs one worker; costs a lookup per hinted request, and a copy where the tier holds a "
        "prefix the GPU cache may hold too",
    )
    prefetch_port: int | None = Field(
        None, ge=1, le=65535, description="with cache_prefetch_gb: the port on 127.0.0.1 this instance takes hints on"
    )
    fingerprint_extra: str = Field(
        "", description="mixed into chunk keys: instances with different values never share KV"
    )

    def chunks_on_device(self, kv_device: torch.device, producer: bool) -> bool:
        """Whether chunks wait (`producer`) or land (consumer) in GPU memory, for a KV cache on
        `kv_device` (see staging_memory). A consumer lands them there whenever ucx can: UCX moves
        host-staged chunks into GPU memory through GPU fragments about ten times as fast as into
        pinned host memory, which its cma transport fills from one thread (docs/benchmarks.md)."""
        gpu_to_gpu = kv_device.type == "cuda" and self.transport == "ucx"
        if self.staging_memory == "device" and not gpu_to_gpu:
            raise ValueError(
                f"staging_memory=device needs a KV cache on a GPU (this one is on {kv_device}) and transport "
                f"ucx (this one is {self.transport}; tcp moves host bytes only)"
            )
        if not producer:
            return gpu_to_gpu
        return self.staging_memory == "device" or (self.staging_memory == "auto" and gpu_to_gpu)

    def staging_bytes(self, kv_cache_bytes: int, free_bytes: int) -> int:
        """The staging pool's size (see staging_gb), for a KV cache of `kv_cache_bytes` and
        `free_bytes` free where the chunks wait."""
        if self.staging_gb is not None:
            return int(self.staging_gb * (1 << 30))
        return min(max(2 << 30, kv_cache_bytes // 4), free_bytes // 2)

    def load_in_step(self, on_gpu: bool) -> Literal["never", "idle", "always"]:
        """When tier loads run inside the step (see cache_load_in_step), for a KV cache on a GPU or not."""
        if self.cache_load_in_step == "auto":
            return "idle" if on_gpu else "never"
        return self.cache_load_in_step

    def takes_hints(self, on_gpu: bool) -> bool:
        """Whether a decoder with a tier on its host takes the proxy's prefetch hints (see cache_prefetch_gb)."""
        return on_gpu if self.cache_prefetch_gb is None else self.cache_prefetch_gb > 0

    def prefetch_bytes(self, on_gpu: bool, longest_prompt_bytes: int, free_bytes: int) -> int:
        """The prefetch pool's size (see cache_prefetch_gb): `longest_prompt_bytes` is the KV of
        max_model_len tokens, `free_bytes` the device memory free once the KV cache is allocated."""
        if self.cache_prefetch_gb is not None:
            return int(self.cache_prefetch_gb * (1 << 30))
        return min(longest_prompt_bytes, free_bytes // 4) if on_gpu else 0

    def lanes(self) -> int:
        """Connections per hand-off (see load_lanes)."""
        return self.load_lanes or (2 if self.transport == "tcp" else 1)

    def window(self) -> int:
        """Chunks of a lane being received at once: tcp reads one frame at a time, ucx pipelines."""
        return self.chunks_in_flight if self.transport == "ucx" else 1

    def per_frame(self, on_device: bool) -> int:
        """Chunks a consumer asks for in one frame (see chunks_per_frame), receiving into GPU memory or not."""
        return self.chunks_per_frame if on_device and self.transport == "ucx" else 1

    def transfer_options(self, io_timeout_s: float | None = None) -> dict[str, Any]:
        """Options for `transfer.connect` / `transfer.listen`; unset checksums take the transport's default."""
        t = self.io_timeout_s if io_timeout_s is None else io_timeout_s
        options: dict[str, Any] = {"connect_timeout": min(self.connect_timeout_s, t), "io_timeout": t}
        if self.checksums is not None:
            options["checksums"] = self.checksums
        return options


def load_config(extra: dict[str, Any] | None) -> ConnectorConfig:
    """The connector's config; a bad field is named in the error."""
    try:
        return ConnectorConfig.model_validate(extra or {})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"invalid kv_connector_extra_config for PDConnector: {problems}") from None

"""PDConnector: vLLM's side of pdrun's prefill/decode hand-off.

Loaded by vLLM from
    {"kv_connector": "PDConnector", "kv_connector_module_path": "pdrun.pd.connector",
     "kv_role": "kv_producer" | "kv_consumer" | "kv_both", "kv_connector_extra_config": {...}}

Producer (prefiller), for requests sent with kv_transfer_params {"do_remote_decode": true}:
  the scheduler side names each chunk of the prompt (every prompt token: a decoder continues
  after the first output token, pd/proxy/continuation.py) and, in the step its tokens are computed,
  asks the worker to copy the chunk's blocks into the staging pool, served by the worker's
  transfer endpoint. The blocks are free again as soon as the request finishes;
  `request_finished` returns the hand-off when the request stopped for length (one token, as
  asked); one that stopped otherwise is the whole answer, and its chunks are dropped.
Consumer (decoder), for requests carrying that hand-off: the scheduler side checks the chunk keys
  against its own prompt and reports the matching tokens as an asynchronous load; a worker thread
  pulls the chunks and scatters them into the blocks vLLM allocated, off the forward pass. Any
  failure reports the blocks not loaded as invalid, and vLLM recomputes them: the request is
  prefilled locally from there, never failed. With `layerwise`, the load is synchronous instead:
  the request runs at once and its hand-off arrives layer by layer inside that step's forward pass
  (pd/layerwise.py).

With a cache tier (`cache` in the config), in any role: the scheduler side asks the tier how many
  leading full chunks of a prompt it holds and loads them, asynchronously like a hand-off, instead
  of recomputing them; every full chunk an instance computes is stored in the tier off the forward
  pass; a decoder whose prefiller no longer has a chunk takes it from the tier. On the cache
  server's host, chunks go through its shared-memory arena by the instance's own copies
  (pd/tier.py); elsewhere over its network port, written behind by a thread (pd/write_behind.py).
  With `cache_load_in_step`, a prefix in the arena is pinned at lookup and loaded synchronously
  instead, inside the step that runs the request (pd/layerwise.py's MappedLoad).

Block ids come from the scheduler side (the scheduler output and the blocks vLLM allocated), as
vLLM's offloading and NIXL connectors take them: the CPU backend has no attention metadata to read
them from in `start_load_kv`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from pydantic import ValidationError
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from pdrun import transfer
from pdrun.pd import plan
from pdrun.pd.codec import PagedKV
from pdrun.pd.compat import SYNC_LOAD_RECOVERY, check_vllm_version, recovers_failed_sync_loads
from pdrun.pd.config import ConnectorConfig, load_config
from pdrun.pd.keys import Fingerprint, chunk_keys, matching_prefix, salted
from pdrun.pd.loader import LoadJob, TierPin
from pdrun.pd.loads import Loads
from pdrun.pd.logs import setup_logging
from pdrun.pd.params import TIMING, HandOff, handoff_of, handoff_params, wants_handoff
from pdrun.pd.prefetch import Prefetch
from pdrun.pd.rates import Rates
from pdrun.pd.saves import Saves
from pdrun.pd.staging import StagingPool, StagingService
from pdrun.pd.staging_room import StagingRoom
from pdrun.pd.stats import STAGING_CAPACITY, STAGING_LET_GO, PDPromMetrics, PDStats, StatsCounter
from pdrun.pd.tier import ArenaWatch, SharedTier, TierLink
from pdrun.pd.write_behind import WriteBehind
from pdrun.storage.client import CacheClient
from pdrun.storage.local import LocalClient, LocalError
from pdrun.transfer import ConnectionPool

if TYPE_CHECKING:  # vLLM 0.32's names; hints only
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

setup_logging()
log = logging.getLogger(__name__)


class Release(NamedTuple):
    """A hand-off the decoder will not read (its prompt was found elsewhere): its prefiller frees it."""

    endpoints: list[str]
    transfer: str


class Lookup(NamedTuple):
    """One cache tier lookup by the scheduler, counted by the worker: prompt tokens asked, held."""

    asked: int
    held: int


@dataclass
class PDMetadata(KVConnectorMetadata):
    saves: list[plan.ChunkSave] = field(default_factory=list)
    loads: dict[str, LoadJob] = field(default_factory=dict)  # request id -> job
    releases: list[Release] = field(default_factory=list)  # hand-offs to release unread
    drops: list[str] = field(default_factory=list)  # producer: transfers no decoder will pull
    handed: list[str] = field(default_factory=list)  # producer: transfers handed to a decoder, to be pulled
    lookups: list[Lookup] = field(default_factory=list)
    # The prompts whose chunks go to the tier this step, each up to its last such chunk, in order:
    # the tier keeps a prompt stored over several steps head last in its LRU.
    tier_order: list[bytes] = field(default_factory=list)


# How often a worker asks its cache server which arena it serves: after a restart, the old
# arena's memory is let go within this, not at the next request that reaches the tier.
TIER_WATCH_S = 2.0
# After the scheduler moves to a restarted cache server's arena, how long it loads nothing inside
# a step: the workers move on their own watch, and registering a large arena for DMA takes seconds.
ARENA_SETTLE_S = 30.0


def _cache_client(cfg: ConnectorConfig) -> CacheClient | None:
    if cfg.cache is None:
        return None
    t = cfg.cache_timeout_s
    return CacheClient(
        cfg.cache,
        connect=lambda addr: transfer.connect(addr, **cfg.transfer_options(t)),
        retry_after_s=cfg.cache_retry_s,
    )


def _local_client(cache: CacheClient | None, cfg: ConnectorConfig, mapped: bool = True) -> LocalClient | None:
    """The cache tier through this host's shared memory, when its server runs here (`mapped`: its
    arena kept mapped, for copies; the scheduler only looks chunks up)."""
    if cache is None or not cfg.cache_local:
        return None
    return LocalClient.discover(cache.local(), cfg.cache_timeout_s, mapped)


def _token_of(cache: CacheClient | None) -> Callable[[], str | None]:
    """Asks the cache server which arena it serves now (its token; None when it does not answer)."""

    def token() -> str | None:
        info = cache.local(quiet=True) if cache is not None else None
        return info.get("token") if info else None

    return token


def _endpoints(vllm_config: VllmConfig, cfg: ConnectorConfig) -> list[str]:
    """Each TP rank's transfer endpoint: ports kv_port (or cfg.port) + rank."""
    host = cfg.advertise_host or cfg.host
    base = cfg.port or vllm_config.kv_transfer_config.kv_port
    tp = vllm_config.parallel_config.tensor_parallel_size
    return [f"{cfg.transport}://{host}:{base + r}" for r in range(tp)]


def _prefills_in_full_graphs(vllm_config: VllmConfig) -> bool:
    """Whether a step that prefills may replay a full CUDA graph (whose layers call no hooks): a
    full mode for mixed batches, or speculative decoding, whose decode graphs take several tokens
    per request as a load's step may."""
    from vllm.config import CUDAGraphMode

    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is None or not mode.has_full_cudagraphs():
        return False
    return mode.mixed_mode() == CUDAGraphMode.FULL or vllm_config.speculative_config is not None


def _share_gil(cfg: ConnectorConfig) -> None:
    """The engine's thread shares this process's GIL with the transfer, lookup and copy threads
    pdrun starts here: one waiting for it gets it within cfg.switch_interval_us."""
    sys.setswitchinterval(cfg.switch_interval_us * 1e-6)


def _fingerprint(vllm_config: VllmConfig, cfg: ConnectorConfig, kv_cache_config: KVCacheConfig) -> Fingerprint:
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    from vllm.platforms import current_platform

    layout = ":".join(
        str(x)
        for x in (
            current_platform.device_type,
            type(spec).__name__,
            getattr(spec, "block_size", "?"),
            getattr(spec, "num_kv_heads", "?"),
            getattr(spec, "head_size", "?"),
            getattr(spec, "dtype", "?"),
        )
    )
    return Fingerprint(
        model=vllm_config.model_config.model,
        dtype=f"{vllm_config.model_config.dtype}/{vllm_config.cache_config.cache_dtype}",
        layout=layout,
        chunk_size=cfg.chunk_size,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        extra=cfg.fingerprint_extra,
    )


def _preemptions(request: Request) -> int:
    """How often vLLM preempted the request: each time it gave up the request's blocks."""
    return getattr(request, "num_preemptions", 0)


def _salt(request: Request) -> str | None:
    """vLLM's per-request `cache_salt`: requests with different salts share no KV, here as in vLLM."""
    return getattr(request, "cache_salt", None)


def _check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, cfg: ConnectorConfig) -> None:
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("PDConnector does not support pipeline parallelism")
    if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
        raise ValueError("PDConnector supports models with one KV cache group (no hybrid or sliding-window mixes)")
    block_size = vllm_config.cache_config.block_size
    if cfg.chunk_size % block_size:
        raise ValueError(
            f"PDConnector chunk_size {cfg.chunk_size} is not a multiple of the KV block size {block_size}: "
            f"set chunk_size in kv_connector_extra_config or vLLM's --block-size"
        )


class PDConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        check_vllm_version()
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = load_config(vllm_config.kv_transfer_config.kv_connector_extra_config)
        _check_supported(vllm_config, kv_cache_config, cfg)
        self._sched: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = _SchedulerSide(vllm_config, cfg, kv_cache_config)
        else:
            self._worker = _WorkerSide(vllm_config, cfg, kv_cache_config)

    # ---- scheduler side ----
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Scheduler, for a waiting request, after vLLM's own prefix cache gave `num_computed_tokens`:
        how many more prompt tokens pdrun loads, and whether asynchronously (the request then waits
        in WAITING_FOR_REMOTE_KVS). A hand-off's tokens on a decoder, else the leading chunks the
        cache tier holds (no lookup when vLLM's cache already has them all). None on a prefiller
        whose staging pool has no room for the request's hand-off yet: it stays waiting."""
        assert self._sched is not None
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Scheduler, once vLLM has allocated the request's blocks: plan the load of the tokens
        granted into those blocks, and which of its chunks are copied out once computed (staged for
        a decoder, written behind to the tier)."""
        assert self._sched is not None
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Scheduler, at the end of each schedule: this step's loads, chunk saves, staging releases
        and tier lookups, for the workers."""
        assert self._sched is not None
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Scheduler, with each step's output from the workers: loads that finished (for the
        hand-off timing), the disk read rate (for `cache_disk_load: auto`), the staging pool's room
        and the hand-offs it let go (a prefiller)."""
        assert self._sched is not None
        self._sched.loads_finished(connector_output.finished_recving or ())
        stats = getattr(connector_output, "kv_connector_stats", None)
        if stats is not None:
            self._sched.rates.disk_read(stats.data)
            if self._sched.room is not None:
                self._sched.room.reported(stats.data.get(STAGING_CAPACITY), stats.data.get(STAGING_LET_GO, ()))

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Layer-wise loads wait in the layers' hooks, which a full CUDA graph would skip.
        return bool((extra_config or {}).get("layerwise"))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Scheduler, when a request finishes or is aborted: on a prefiller, the hand-off params the
        proxy passes to a decoder (the chunks are copies: the blocks are freed at once, never
        delayed); an aborted prefill's staged chunks are dropped. On a decoder, the request's
        queue and load times."""
        assert self._sched is not None
        return self._sched.request_finished(request)

    # ---- worker side ----
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Worker, once vLLM has allocated the paged KV cache: learn its layout, map the cache
        tier's arena, and on a prefiller size the staging pool and start serving hand-offs."""
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Worker, before each forward pass: start this step's loads (on loader threads; layer-wise
        hand-offs on a thread each, waited for layer by layer) and release what decoders no longer need."""
        assert self._worker is not None
        self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Worker, inside the forward pass, before `layer_name`'s attention: wait for that layer of
        this step's layer-wise loads (`layerwise` on a decoder)."""
        if self._worker is not None:  # else loads finish before their request is scheduled
            self._worker.wait_for_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Worker, inside the forward pass, after `layer_name`'s attention wrote its KV: with
        `layerwise` on a prefiller, copy that layer of the step's finished chunks out now."""
        if self._worker is not None and self._worker.layerwise_save:  # else copied out whole in wait_for_save
            self._worker.save_layer(self._get_connector_metadata(), layer_name)

    def wait_for_save(self) -> None:
        """Worker, after the forward pass is queued: copy this step's finished chunks out of the KV
        cache (queued behind the forward pass) into the staging pool and the cache tier."""
        assert self._worker is not None
        self._worker.save(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Worker, at the end of each step: (requests whose blocks may be freed, none: pdrun never
        delays freeing; requests whose asynchronous loads finished, failed ones included)."""
        assert self._worker is not None
        return None, self._worker.take_finished_loads()

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Worker, at the end of each step: blocks whose load failed, which vLLM recomputes (pdrun
        sets kv_load_failure_policy=recompute). Waits for this step's layer-wise loads to end."""
        assert self._worker is not None
        return self._worker.take_load_errors()

    def get_kv_connector_stats(self) -> PDStats | None:
        """Worker and scheduler, each step: pdrun's counters since the last call (pdrun:* metrics);
        a prefiller's workers add the staging pool's room for its scheduler."""
        if self._worker is not None:
            return self._worker.take_stats()
        return self._sched.take_stats() if self._sched is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._sched is not None:
            self._sched.shutdown()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PDStats:
        return PDStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls, vllm_config: Any, metric_types: Any, labelnames: Any, per_engine_labelvalues: Any
    ) -> PDPromMetrics:
        return PDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


@dataclass
class _Saving:
    """A request whose chunks are copied out as they are computed: staged for its decoder, cached."""

    keys: list[bytes]  # chunks of the prompt
    handed: int
    stage: bool  # a prefill for a decoder: every chunk goes to the staging pool
    cache_from: int | None  # full chunks from this index on go to the cache tier (None: none do)
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0  # chunks copied out so far
    # cache_answers: the request, whose full chunks past the prompt's go to the tier as they fill
    # (None: they do not); the index of the next such chunk; the keys of the full chunks before it
    # (the prompt's, then the answer's), hashed when the first one is due
    answering: Request | None = None
    next_full: int = 0
    chain: list[bytes] | None = None
    started: float = field(default_factory=time.time)  # first scheduled: the end of its wait in the queue


@dataclass
class _Incoming:
    """Where the KV of a request's first `end` tokens comes from: a hand-off, or the cache tier."""

    keys: list[bytes]
    handed: int  # tokens the keys cover (only a hand-off's last chunk may be partial)
    end: int
    handoff: HandOff | None = None  # None: the cache tier
    from_disk: int = 0  # of the tier's chunks, how many are read from its disk
    pin: TierPin | None = None  # the tier's chunks pinned in its arena, for a load inside the step

    @property
    def cached_chunks(self) -> int:
        return 0 if self.handoff is not None else len(self.keys)


class _SchedulerSide:
    def __init__(self, vllm_config: VllmConfig, cfg: ConnectorConfig, kv_cache_config: KVCacheConfig):
        self.cfg = cfg
        _share_gil(cfg)
        ktc = vllm_config.kv_transfer_config
        self.is_producer = ktc.is_kv_producer
        self.is_consumer = ktc.is_kv_consumer
        self.block_size = vllm_config.cache_config.block_size
        self.cache_tokens = kv_cache_config.num_blocks * self.block_size  # what vLLM's own cache holds
        self.prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        self.fingerprint = _fingerprint(vllm_config, cfg, kv_cache_config)
        self.fingerprint_hex = self.fingerprint.seed().hex()
        self.endpoints = _endpoints(vllm_config, cfg)
        self.cache = _cache_client(cfg)
        self.local = _local_client(self.cache, cfg, mapped=False)
        self._local_retry_at = 0.0
        self._local_replaced = False  # the server serves another arena: ask it again before a lookup
        self._watch = (
            ArenaWatch(_token_of(self.cache), self._local_token, self._local_was_replaced, TIER_WATCH_S)
            if self.local is not None
            else None
        )
        # Kept beside the tier's disk, per model and KV layout: a restart starts from them.
        disk = self.local.disk if self.local is not None else None
        self.rates = Rates(cfg.chunk_size, disk / f"rates-{self.fingerprint_hex}.json" if disk is not None else None)
        # A prefiller holds prefills back while the hand-offs decoders have yet to pull fill its staging pool.
        workers = vllm_config.parallel_config.world_size
        self.room = StagingRoom(workers, cfg.staging_wait_s) if self.is_producer else None
        if (self.is_consumer or self.cache is not None) and ktc.kv_load_failure_policy != "recompute":
            # A load that fails must cost a local prefill, never the request.
            log.warning("PDConnector sets kv_load_failure_policy=recompute (was %r)", ktc.kv_load_failure_policy)
            ktc.kv_load_failure_policy = "recompute"
        self.loads_in_step = cfg.layerwise and self.is_consumer and not self._in_step_refused(vllm_config)
        from vllm.platforms import current_platform

        self.in_step_when = cfg.load_in_step(on_gpu=current_platform.device_type == "cuda")
        self.tier_in_step = self._tier_in_step_possible(vllm_config)
        self._arena_moved_at = float("-inf")
        self._running: set[str] = set()  # requests the last step ran, less those finished since
        self._saving: dict[str, _Saving] = {}
        self._incoming: dict[str, _Incoming | None] = {}
        # A request loads from the tier once, and again only once vLLM has preempted it since (it
        # computes what a failed load left): request -> its preemptions at its last load.
        self._cache_loaded: dict[str, int] = {}
        self._keys: dict[str, list[bytes]] = {}  # request id -> its prompt's chunk keys, until it finishes
        self._handoff_times: dict[str, list[float | None]] = {}  # decoder: [queued_s, load start, load end]
        self._meta = PDMetadata()
        self._deferred_told = False
        log.info(
            "PDConnector scheduler: role=%s chunk_size=%d block_size=%d endpoints=%s cache=%s",
            ktc.kv_role,
            cfg.chunk_size,
            self.block_size,
            self.endpoints if self.is_producer else "-",
            cfg.cache or "-",
        )

    @staticmethod
    def _in_step_refused(vllm_config: VllmConfig) -> bool:
        """Whether this vLLM cannot be trusted to recompute a failed hand-off loaded inside the
        forward pass (`layerwise` on a decoder); if so, says why and that whole chunks are loaded."""
        import vllm

        if not recovers_failed_sync_loads():
            why = f"vLLM {vllm.__version__} can recompute a failed one a token off; needs >= {SYNC_LOAD_RECOVERY}"
        elif vllm_config.scheduler_config.async_scheduling:
            # A step scheduled behind the failed one would go on from its discarded output.
            why = "vLLM recomputes a failed one right only without async scheduling: pass --no-async-scheduling"
        else:
            return False
        log.warning("PDConnector: layerwise on this decoder loads hand-offs whole, not in the forward pass (%s)", why)
        return True

    def _tier_in_step_possible(self, vllm_config: VllmConfig) -> bool:
        """Whether loads from the tier's arena may run inside the step (cache_load_in_step): the
        worker must map the arena the scheduler pins chunks in, one worker (no tensor or pipeline
        parallelism), and vLLM must call the layers' hooks in a step that prefills."""
        if self.in_step_when == "never" or self.local is None:
            return False
        parallel = vllm_config.parallel_config
        why = ""
        if parallel.tensor_parallel_size * parallel.pipeline_parallel_size > 1:
            why = "more than one worker"
        elif _prefills_in_full_graphs(vllm_config):
            why = "prefills run in full CUDA graphs, which skip the layers' hooks"
        if why:
            log.info("PDConnector: loads from the cache tier run beside the steps, not inside one (%s)", why)
        return not why

    def _tier_in_step_now(self) -> bool:
        if not self.tier_in_step or time.monotonic() - self._arena_moved_at < ARENA_SETTLE_S:
            return False
        return self.in_step_when == "always" or not self._running

    def _pin(self, keys: list[bytes]) -> TierPin | None:
        """Pin the leading chunks of `keys` in the tier's arena for a load inside the step; None
        when it holds none of them any more or does not answer (the load runs beside the steps)."""
        assert self.local is not None
        try:
            lease, slots = self.local.read(keys)
        except LocalError as e:
            log.info("cache tier pin failed, loading beside the steps: %s", e)
            return None
        if not slots:
            return None
        return TierPin(lease, self.local.info.token, [(s.offset, s.nbytes, s.meta) for s in slots])

    def _unpin(self, pin: TierPin) -> None:
        """A pin no load will use; a lease in a replaced arena is left to expire."""
        if self.local is not None and self.local.info.token == pin.token:
            with contextlib.suppress(LocalError):
                self.local.release(pin.lease)

    def _forget_incoming(self, rid: str) -> None:
        state = self._incoming.pop(rid, None)
        if state is not None and state.pin is not None:
            self._unpin(state.pin)

    # -- loads: a hand-off (consumer), else the cache tier (any role) --
    def _incoming_of(self, request: Request, num_computed_tokens: int = 0) -> _Incoming | None:
        rid = request.request_id
        if rid not in self._incoming:
            prompt = request.prompt_token_ids or []
            state = self._from_handoff(request, prompt) if self.is_consumer and prompt else None
            loaded_at = self._cache_loaded.get(rid)
            if state is None and self.cache is not None and (loaded_at is None or _preemptions(request) > loaded_at):
                state = self._from_cache(request, prompt, num_computed_tokens)
            self._incoming[rid] = state
        return self._incoming[rid]

    def _from_handoff(self, request: Request, prompt: list[int]) -> _Incoming | None:
        try:
            handoff = handoff_of(request.kv_transfer_params)
        except ValidationError as e:
            log.warning("request %s: malformed pdrun hand-off, prefilling locally: %s", request.request_id, e)
            return None
        if handoff is None:
            return None
        end = 0
        if handoff.fingerprint != self.fingerprint_hex or handoff.chunk_size != self.cfg.chunk_size:
            log.warning(
                "request %s: hand-off from %s is for another model, KV layout or chunk size; prefilling locally",
                request.request_id,
                handoff.endpoints[0],
            )
        else:
            theirs = handoff.key_bytes()
            ours = chunk_keys(self.fingerprint, prompt[: handoff.num_tokens], salt=_salt(request))
            matched = matching_prefix(ours, theirs)
            end = handoff.num_tokens if matched == len(theirs) == len(ours) else matched * self.cfg.chunk_size
            if end < handoff.num_tokens:
                log.warning(
                    "request %s: prompt differs from the prefilled one after %d tokens; loading those only",
                    request.request_id,
                    end,
                )
            end = max(0, min(end, len(prompt) - plan.computed_here(len(prompt) > handoff.num_tokens)))
            if self.loads_in_step:
                # Layers are placed whole blocks at a time while the step runs, and vLLM writes the
                # step's own KV before it waits for a layer: the block it writes into is computed here.
                end -= end % self.block_size
        return _Incoming(handoff.key_bytes(), handoff.num_tokens, end, handoff)

    def _keys_of(self, request: Request) -> list[bytes]:
        """The keys of every chunk of the request's prompt (the last one partial if the prompt
        ends inside a chunk), hashed once per request."""
        keys = self._keys.get(request.request_id)
        if keys is None:
            keys = chunk_keys(self.fingerprint, request.prompt_token_ids or [], salt=_salt(request))
            self._keys[request.request_id] = keys
        return keys

    def _from_cache(self, request: Request, prompt: list[int], num_computed_tokens: int) -> _Incoming | None:
        """The prompt's leading full chunks the tier holds, loaded up to the last whole block this
        instance does not compute itself (the last chunk in part, if need be)."""
        assert self.cache is not None
        size = self.cfg.chunk_size
        chunks, limit = plan.tier_reach(len(prompt), size, self.block_size)
        keys = self._keys_of(request)[:chunks]
        if not keys:
            return None
        self._vllm_holds(keys, num_computed_tokens)
        if num_computed_tokens >= min(len(keys) * size, limit):
            # The GPU cache holds all the tier could give: no lookup, and the chunks it holds whole
            # are not put again (the request that computed them stored them).
            whole = keys[: num_computed_tokens // size]
            return _Incoming(whole, len(whole) * size, 0)
        from_disk, pin = 0, None
        if self.local is not None:
            in_memory, anywhere = self._where(keys)
            from_disk = self._from_disk(anywhere - in_memory)
            held = in_memory + from_disk
            if in_memory and not from_disk and self._tier_in_step_now():
                pin = self._pin(keys[:in_memory])
                held = len(pin.slots) if pin is not None else held
        else:
            held = self.cache.lookup(keys)
        self._meta.lookups.append(Lookup(asked=len(keys) * size, held=held * size))
        return _Incoming(keys[:held], held * size, min(held * size, limit), from_disk=from_disk, pin=pin)

    def _vllm_holds(self, keys: list[bytes], tokens: int) -> None:
        """vLLM's cache holds the first `tokens` of the prompt chunked as `keys`: a prefetch hint for
        it (in this process's worker) copies none of those chunks in."""
        whole = min(tokens // self.cfg.chunk_size, len(keys))  # a hint names the same chunks (plan.tier_reach)
        if whole and (prefetch := Prefetch.on_port(self.cfg.prefetch_port)) is not None:
            prefetch.vllm_holds(keys[whole - 1], self.cache_tokens - whole * self.cfg.chunk_size)

    def _local_token(self) -> str | None:
        return self.local.info.token if self.local is not None else None

    def _local_was_replaced(self) -> None:
        self._local_replaced = True  # the engine's thread, which owns `local`, moves at its next lookup

    def _where(self, keys: list[bytes]) -> tuple[int, int]:
        """The shared-memory tier's answer; after a failure a miss for cache_retry_s, then the
        server is asked again where its tier is (a restarted server has another arena; one the
        watch found is moved to before the lookup, not after one that waits for the old)."""
        assert self.local is not None
        if self._local_replaced:
            self._local_replaced = False
            if self._reconnect_local():
                self._local_retry_at = 0.0  # the new server is not skipped for the old one's failure
        if time.monotonic() < self._local_retry_at:
            return 0, 0
        try:
            return self.local.where(keys)
        except LocalError as e:
            log.warning("cache tier lookup failed, skipping the tier for %g s: %s", self.cfg.cache_retry_s, e)
        self._local_retry_at = time.monotonic() + self.cfg.cache_retry_s
        self._reconnect_local()
        return 0, 0

    def _reconnect_local(self) -> bool:
        """Ask the server where its tier is now; whether that is another arena than before."""
        fresh = _local_client(self.cache, self.cfg, mapped=False)
        if fresh is None:
            return False
        assert self.local is not None
        moved = fresh.info.token != self.local.info.token
        self.local.close()
        self.local = fresh
        if moved:
            self._arena_moved_at = time.monotonic()
        return moved

    def _from_disk(self, on_disk: int) -> int:
        """How many of the `on_disk` chunks that follow those in memory are loaded (cache_disk_load)."""
        if self.cfg.cache_disk_load != "auto":
            return on_disk if self.cfg.cache_disk_load == "always" else 0
        return self.rates.disk_chunks(on_disk)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._room_for(request):
            return None, False  # vLLM keeps it waiting and asks again next step
        state = self._incoming_of(request, num_computed_tokens)
        if state is None:
            return 0, False
        count = state.end - num_computed_tokens
        return (count, not self._in_step(state)) if count > 0 else (0, False)

    def _room_for(self, request: Request) -> bool:
        """Whether the staging pool has room for the request's hand-off (if it wants one)."""
        if self.room is None or not wants_handoff(request.kv_transfer_params):
            return True
        chunks = plan.num_chunks(len(request.prompt_token_ids or ()), self.cfg.chunk_size)
        if self.room.admit(request.request_id, chunks):
            return True
        if not self._deferred_told:
            self._deferred_told = True
            log.info(
                "staging pool full of hand-offs decoders are yet to pull (%d chunks): new prefills wait in the "
                "queue until they pull (pdrun:staging_deferred_prefills counts them; staging_gb sizes the pool)",
                self.room.capacity or 0,
            )
        return False

    def take_stats(self) -> PDStats | None:
        deferred = self.room.take_deferred() if self.room is not None else 0
        return PDStats(data={"staging_deferred_prefills": deferred}) if deferred else None

    def _in_step(self, state: _Incoming) -> bool:
        """Loaded inside the step that runs the request (`layerwise` hand-offs, pinned tier
        chunks), not before it."""
        return state.pin is not None or (self.loads_in_step and state.handoff is not None)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        rid = request.request_id
        if rid in self._incoming and rid not in self._saving:
            self._track_saves(request, self._incoming[rid])
        if rid not in self._incoming:
            return
        # One load per lookup. Scheduled again (after a failed load, or preempted), a request is looked
        # up again: its hand-off is not loaded twice, the tier only after a preemption.
        state = self._incoming.pop(rid)
        if state is None:
            return
        h = state.handoff
        if h is not None:
            request.kv_transfer_params["do_remote_prefill"] = False
            now = time.time()
            # A layer-wise load's time is inside its step's forward pass: not reported apart.
            self._handoff_times[rid] = [now - request.arrival_time, now, None if self._in_step(state) else now]
        if num_external_tokens <= 0:
            if h is not None and h.num_tokens:
                self._meta.releases.append(Release(h.endpoints, h.transfer))
            if state.pin is not None:
                self._unpin(state.pin)
            return
        if h is None:
            self._cache_loaded[rid] = _preemptions(request)
        start = state.end - num_external_tokens
        block_ids = list(blocks.get_block_ids()[0])
        chunks = plan.plan_load(
            state.keys, state.handed, start, state.end, block_ids, self.cfg.chunk_size, self.block_size
        )
        pin = state.pin
        if pin is not None:  # the job's chunks' slots: the GPU cache may hold the first ones
            first = start // self.cfg.chunk_size
            pin = TierPin(pin.lease, pin.token, pin.slots[first : first + len(chunks)])
        self._meta.loads[rid] = LoadJob(
            h.transfer if h else "",
            h.endpoints if h else [],
            chunks,
            start,
            state.end,
            block_ids,
            self._in_step(state),
            state.from_disk,
            pin,
        )

    def _release_unloaded(self, request: Request) -> None:
        """A decoder request that ends before its hand-off was loaded (aborted while it waited):
        its prefiller is told now that the chunks are free, not at their TTL."""
        if not self.is_consumer:
            return
        try:
            h = handoff_of(request.kv_transfer_params)  # None once a load was planned
        except ValidationError:
            return
        if h is not None and h.num_tokens:
            self._meta.releases.append(Release(h.endpoints, h.transfer))

    # -- saves: staging for a decoder (producer), writing behind to the cache tier (any role) --
    def _track_saves(self, request: Request, incoming: _Incoming | None) -> None:
        stage = self.is_producer and wants_handoff(request.kv_transfer_params)
        # A decoder given a hand-off leaves caching to its prefiller; chunks the tier has are not put again.
        cache_from = None
        if self.cache is not None and (incoming is None or incoming.handoff is None):
            cache_from = incoming.cached_chunks if incoming is not None else 0
        # A prefill for a decoder answers one token; a decoder given a hand-off caches its answer.
        answers = self.cache is not None and self.cfg.cache_answers and not stage
        if not stage and cache_from is None and not answers:
            return
        handed = len(request.prompt_token_ids or ())
        if stage or cache_from is not None:
            keys = self._keys_of(request)
            # Without staging, the chunks before cache_from are never copied out: not walked each step.
            first = 0 if stage else cache_from
        else:  # its answer only (a decoder given a hand-off): nothing of the prompt to walk
            keys, first = [], 0
        st = _Saving(keys, handed, stage, cache_from, saved=first)
        if answers:
            st.answering, st.next_full = request, handed // self.cfg.chunk_size
        self._saving[request.request_id] = st

    def _track_blocks(self, so: SchedulerOutput) -> None:
        for new in so.scheduled_new_reqs:
            st = self._saving.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                self._save_ready(new.req_id, st, new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0))
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._saving.get(rid)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._save_ready(rid, st, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(rid, 0))

    def _save_ready(self, rid: str, st: _Saving, computed: int) -> None:
        if st.saved < len(st.keys):
            self._save_prompt(rid, st, computed)
        # Checked every decode step of every request: the arithmetic first.
        answer_due = st.answering is not None and computed >= (st.next_full + 1) * self.cfg.chunk_size
        if answer_due and st.saved == len(st.keys):
            self._save_answer(rid, st, computed)

    def _save_prompt(self, rid: str, st: _Saving, computed: int) -> None:
        saves = plan.ready_saves(
            rid,
            st.keys,
            st.handed,
            computed,
            st.saved,
            st.block_ids,
            self.cfg.chunk_size,
            self.block_size,
            stage=st.stage,
            cache_from=st.cache_from,
        )
        st.saved += len(saves)
        self._meta.saves.extend(s for s in saves if s.stage or s.cache)
        cached = [s.index for s in saves if s.cache]
        if cached and self.local is not None:
            self._meta.tier_order += st.keys[: max(cached) + 1]

    def _save_answer(self, rid: str, st: _Saving, computed: int) -> None:
        request = st.answering
        assert request is not None
        if st.chain is None:  # an answer that fills no chunk never hashes its prompt here
            st.chain = self._keys_of(request)[: st.next_full]
        prev = st.chain[-1] if st.chain else salted(self.fingerprint.seed(), _salt(request))
        saves = plan.answer_saves(
            rid,
            request.all_token_ids,
            computed,
            st.next_full,
            prev,
            st.block_ids,
            self.cfg.chunk_size,
            self.block_size,
        )
        if not saves:
            return
        self._meta.saves.extend(saves)
        st.chain += [s.key for s in saves]
        st.next_full = len(st.chain)
        if self.local is not None:
            self._meta.tier_order += st.chain

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        self.rates.step(scheduler_output.total_num_scheduled_tokens)
        if (prefetch := Prefetch.on_port(self.cfg.prefetch_port)) is not None:  # its clock for vLLM's evictions
            prefetch.computed += scheduler_output.total_num_scheduled_tokens
        self._track_blocks(scheduler_output)
        self._running = set(scheduler_output.num_scheduled_tokens) - set(scheduler_output.finished_req_ids)
        for rid, state in list(self._incoming.items()):
            if state is not None and state.pin is not None:
                # Looked up but not scheduled in this pass (no room yet): no pin waits with it,
                # the next pass looks it up again.
                self._forget_incoming(rid)
        if self.room is not None:
            self.room.new_pass()
        meta, self._meta = self._meta, PDMetadata()
        return meta

    def loads_finished(self, request_ids: Iterable[str]) -> None:
        now = time.time()
        for rid in request_ids:
            if rid in self._handoff_times and self._handoff_times[rid][2] is not None:
                self._handoff_times[rid][2] = now

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        rid = request.request_id
        self._forget_incoming(rid)
        keys = self._keys.pop(rid, None)
        if keys and self.prefix_caching:  # vLLM's cache keeps the prompt's blocks it computed, until reused
            chunks, _ = plan.tier_reach(request.num_prompt_tokens, self.cfg.chunk_size, self.block_size)
            self._vllm_holds(keys[:chunks], request.num_computed_tokens)
        self._running.discard(rid)
        self._cache_loaded.pop(rid, None)
        times = self._handoff_times.pop(rid, None)
        st = self._saving.pop(rid, None)
        if self.room is not None and (st is None or request.status != RequestStatus.FINISHED_LENGTH_CAPPED):
            self.room.forget(rid)  # stages nothing more, and no decoder will pull what it staged
        if st is None or not st.stage:
            # A decoder tells how long the request waited and its hand-off took (vLLM returns this
            # in non-streamed answers; the proxy records it and answers the client without it).
            if times is None:
                self._release_unloaded(request)
                return False, None
            queued, start, end = times
            timing = {"queued_s": round(queued or 0.0, 6)}
            if start is not None and end is not None:
                timing["load_s"] = round(end - start, 6)
            return False, {TIMING: timing}
        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED:
            # Aborted, or stopped at its first token (the whole answer): no decoder will come for it.
            self._meta.drops.append(rid)
            return False, None
        staged = st.saved
        handed = st.handed if staged == len(st.keys) else staged * self.cfg.chunk_size
        handoff = HandOff(
            endpoints=self.endpoints,
            transfer=rid,
            num_tokens=handed,
            keys=[k.hex() for k in st.keys[:staged]],
            fingerprint=self.fingerprint_hex,
            chunk_size=self.cfg.chunk_size,
        )
        self._meta.handed.append(rid)
        if self.room is not None:
            self.room.handed(rid)
        now = time.time()
        timing = {"queued_s": round(st.started - request.arrival_time, 6), "prefill_s": round(now - st.started, 6)}
        # The chunks are copies: the blocks can be freed now.
        return False, {**handoff_params(handoff), TIMING: timing}

    def shutdown(self) -> None:
        self.rates.save()
        if self._watch is not None:
            self._watch.close()
        if self.local is not None:
            self.local.close()
        if self.cache is not None:
            self.cache.close()


class _WorkerSide:
    """The worker's half: the paged KV cache's layout, the staging endpoint (a prefiller), the way to
    the cache tier; what each step saves (pd/saves.py) and loads (pd/loads.py)."""

    def __init__(self, vllm_config: VllmConfig, cfg: ConnectorConfig, kv_cache_config: KVCacheConfig):
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.cfg = cfg
        _share_gil(cfg)
        ktc = vllm_config.kv_transfer_config
        self.is_producer = ktc.is_kv_producer
        self.is_consumer = ktc.is_kv_consumer
        self.block_size = vllm_config.cache_config.block_size
        self.num_blocks = kv_cache_config.num_blocks
        self.rank = get_tensor_model_parallel_rank()
        self.endpoint = _endpoints(vllm_config, cfg)[self.rank]
        self.stats = StatsCounter()
        self.paged: PagedKV | None = None
        self.pool: StagingPool | None = None
        self.listener: transfer.Listener | None = None
        self._conns = ConnectionPool(lambda addr: transfer.connect(addr, **cfg.transfer_options()))
        self.cache = _cache_client(cfg)
        self.local = _local_client(self.cache, cfg)
        self.tiers = TierLink(None, lambda: _local_client(self.cache, self.cfg), cfg.cache_retry_s)
        self.writer: WriteBehind | None = None
        if cfg.cache is not None and self.local is None:
            self.writer = WriteBehind(_cache_client(cfg), int(cfg.cache_write_queue_mb * (1 << 20)), self._stored)  # type: ignore[arg-type]
        self.layerwise_save = cfg.layerwise and self.is_producer
        self.seed = _fingerprint(vllm_config, cfg, kv_cache_config).seed()
        self.workers = vllm_config.parallel_config.world_size
        self.max_model_len = vllm_config.model_config.max_model_len
        self.prefetch: Prefetch | None = None
        self.saves: Saves | None = None  # once the KV caches are known
        self.loads: Loads | None = None
        self._room_told = False

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.paged = PagedKV(kv_caches, self.num_blocks, self.block_size)
        self.paged.warm_up()
        on_device = self.cfg.chunks_on_device(self.paged.device, producer=self.is_producer)
        if self.local is not None:
            self.tiers.current = SharedTier(self.local, self.paged, self._stored_shared)
            self.tiers.watch(_token_of(self.cache), TIER_WATCH_S)
        if self.is_producer:
            allocate = self.paged.device_buffer if on_device else self.paged.host_buffer
            size = self.cfg.staging_bytes(self.paged.nbytes(self.num_blocks), self._free_bytes(on_device))
            self.pool = StagingPool(size, self.cfg.staging_ttl_s, allocate, self.cfg.staging_wait_s)
            service = StagingService(
                self.pool, self.paged.describe(), lambda n: self.stats.add(served_bytes=n), len(self.paged.layers)
            )
            bind = f"{self.cfg.transport}://{self.cfg.host}:{self.endpoint.rsplit(':', 1)[1]}"
            self.listener = transfer.listen(bind, service, **self.cfg.transfer_options())
        self.saves = Saves(self.paged, self.rank, self.stats, self.pool, self.tiers, self.writer)
        self.prefetch = self._start_prefetch()
        self.loads = Loads(
            self.cfg,
            self.paged,
            self.rank,
            self.block_size,
            on_device,
            self.stats,
            self._conns,
            self.cache,
            self.tiers,
            self.prefetch,
        )
        log.info(
            "PDConnector worker rank %d: KV layout %s on %s, %d bytes per block, %s block copies, "
            "chunks in %s memory%s%s",
            self.rank,
            self.paged.describe(),
            self.paged.device,
            self.paged.bytes_per_block,
            self.paged.block_copy,
            "device" if on_device else "host",
            f", serving hand-offs on {self.listener.address} from a staging pool of {self.pool.budget / (1 << 30):.1f} "
            "GiB"
            if self.listener and self.pool
            else "",
            (f", cache tier {self.cfg.cache}" + (" through shared memory" if self.tiers.current else ""))
            if self.cache
            else "",
        )

    def _start_prefetch(self) -> Prefetch | None:
        """Prefixes copied in on the proxy's hints (cache_prefetch_gb), where this worker can."""
        cfg = self.cfg
        assert self.paged is not None
        on_gpu = self.paged.device.type == "cuda"
        if not cfg.takes_hints(on_gpu) or cfg.prefetch_port is None:  # no port: no hints come (a prefiller's)
            return None
        why = ""
        if self.tiers.current is None:
            why = "no cache tier through this host's shared memory"
        elif self.workers > 1:
            why = f"{self.workers} workers (needs one)"
        if why:
            # Said as a warning only where the setting asked for it.
            (log.warning if cfg.cache_prefetch_gb else log.info)("PDConnector: no prefetch: %s", why)
            return None
        longest = self.paged.nbytes(-(-self.max_model_len // self.block_size))
        budget = cfg.prefetch_bytes(on_gpu, longest, self._free_bytes(on_gpu))
        try:
            return Prefetch(
                self.paged, self.tiers, self.seed, cfg.chunk_size, self.rank, budget, cfg.prefetch_port, self.stats
            )
        except Exception as e:  # no memory for the pool, the port taken: serve without it
            why = f"{type(e).__name__}: {e}"
            (log.error if cfg.cache_prefetch_gb else log.info)("PDConnector: no prefetch: %s", why)
            return None

    def _free_bytes(self, on_device: bool) -> int:
        """Memory free now where staged chunks wait: the GPU's, else the host's (MemAvailable)."""
        assert self.paged is not None
        if on_device:
            return int(torch.cuda.mem_get_info(self.paged.device)[0])
        with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def _stored_shared(self, stored: int, nbytes: int, held: int, no_room: int, failed: int, seconds: float) -> None:
        self.stats.add(
            cache_stored_chunks=stored,
            cache_stored_bytes=nbytes,
            cache_store_skipped=held,
            cache_store_dropped=no_room + failed,
            cache_store_no_room=no_room,
            cache_store_seconds=seconds,
        )

    def _stored(self, nbytes: int, seconds: float, stored: bool) -> None:
        if stored:
            self.stats.add(cache_stored_chunks=1, cache_stored_bytes=nbytes, cache_store_seconds=seconds)
        else:
            self.stats.add(cache_store_dropped=1, cache_store_seconds=seconds)

    # -- each step, delegated --
    def save(self, meta: PDMetadata) -> None:
        if self.rank == 0:
            for lookup in meta.lookups:
                self.stats.add(cache_lookup_tokens=lookup.asked, cache_hit_tokens=lookup.held)
        if self.saves is not None:
            self.saves.save(meta)

    def save_layer(self, meta: PDMetadata, layer_name: str) -> None:
        if self.saves is not None:
            self.saves.save_layer(meta, layer_name)

    def start_load_kv(self, meta: PDMetadata) -> None:
        if self.loads is not None:
            self.loads.start(meta)

    def wait_for_layer(self, layer_name: str) -> None:
        if self.loads is not None:
            self.loads.wait_for_layer(layer_name)

    def take_stats(self) -> PDStats | None:
        """The counters since the last call; a prefiller's add its staging pool's room and the
        hand-offs it let go, for the scheduler (told the room once at least, even with nothing counted)."""
        stats = self.stats.take()
        if self.pool is None or self.paged is None:
            return stats
        let_go = self.pool.take_let_go()
        if stats is None and not let_go and self._room_told:
            return None
        stats = stats if stats is not None else PDStats(data={})
        chunk_bytes = self.paged.nbytes(max(1, self.cfg.chunk_size // self.block_size))
        stats.data[STAGING_CAPACITY] = max(1, self.pool.budget // chunk_bytes)
        stats.data[STAGING_LET_GO] = let_go
        self._room_told = True
        return stats

    def take_finished_loads(self) -> set[str] | None:
        return self.loads.take_finished_loads() if self.loads is not None else None

    def take_load_errors(self) -> set[int]:
        return self.loads.take_load_errors() if self.loads is not None else set()

    def shutdown(self) -> None:
        if self.loads is not None:
            self.loads.shutdown()
        if self.prefetch is not None:
            self.prefetch.close()
        if self.listener is not None:
            self.listener.close()
        self._conns.close()
        if self.writer is not None:
            self.writer.flush(timeout=5)
            self.writer.close()
        if self.tiers.current is not None:
            self.tiers.close()
        elif self.local is not None:
            self.local.close()
        if self.cache is not None:
            self.cache.close()

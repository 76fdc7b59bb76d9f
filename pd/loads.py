"""A worker's loads: each request's KV put into its blocks before (or, `layerwise`, while) vLLM
computes the rest: a hand-off pulled from its prefiller, what it lacks from the cache tier; a
prefix the tier holds in this host's shared memory is copied in by the engine's thread. Every load
ends reported finished, its blocks not loaded reported for vLLM to recompute."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from pdrun.pd import plan
from pdrun.pd.codec import PagedKV
from pdrun.pd.config import ConnectorConfig
from pdrun.pd.keys import rank_key
from pdrun.pd.layerwise import LayerwiseLoad, MappedLoad, pull_layers
from pdrun.pd.loader import ChunkLoader, LoadJob, check_chunk, pull
from pdrun.pd.prefetch import Fetched, Prefetch
from pdrun.pd.releases import Releaser
from pdrun.pd.stats import StatsCounter
from pdrun.pd.tier import SharedTier, TierLink, TierLoad
from pdrun.storage.client import CacheClient
from pdrun.storage.local import LocalError
from pdrun.transfer import ConnectionPool, ProtocolError

if TYPE_CHECKING:
    from pdrun.pd.connector import PDMetadata

log = logging.getLogger(__name__)


class Loads:
    def __init__(
        self,
        cfg: ConnectorConfig,
        paged: PagedKV,
        rank: int,
        block_size: int,
        on_device: bool,
        stats: StatsCounter,
        conns: ConnectionPool,
        cache: CacheClient | None,
        tiers: TierLink,
        prefetch: Prefetch | None = None,
    ):
        self.cfg = cfg
        self.paged = paged
        self.rank = rank
        self.block_size = block_size
        self.on_device = on_device
        self.stats = stats
        self._conns = conns
        self.cache = cache
        self.tiers = tiers
        self.prefetch = prefetch  # prefixes copied in ahead of their requests
        self._loader = ThreadPoolExecutor(cfg.load_threads, thread_name_prefix="pdrun-load")
        lanes = cfg.lanes()  # a load thread pulls its first lane itself, the others run here
        self._lanes = (
            ThreadPoolExecutor(cfg.load_threads * (lanes - 1), thread_name_prefix="pdrun-lane") if lanes > 1 else None
        )
        self.releases = Releaser(self._send_release)
        self._lock = threading.Lock()
        self._finished_loads: set[str] = set()
        # loads from the arena this thread queued, polled each step
        self._from_arena: dict[str, tuple[LoadJob, ChunkLoader, TierLoad, SharedTier, list[Fetched]]] = {}
        # this step's layer-wise loads: hand-offs (a thread each), and tier chunks the scheduler pinned
        self._in_step: dict[str, tuple[LoadJob, LayerwiseLoad | MappedLoad, threading.Thread | None]] = {}
        # the tier each pinned load reads, since when, and the prefetched copies it reads
        self._pinned: dict[str, tuple[SharedTier, float, list[Fetched]]] = {}
        self._in_step_failed: set[int] = set()  # blocks of this step's layer-wise loads that never started
        self._in_step_seen: set[str] = set()  # kinds of in-step loads logged once
        self._load_errors: set[int] = set()
        self._reported_errors: set[int] = set()

    def start(self, meta: PDMetadata) -> None:
        """This step's loads: layer-wise ones on a thread each, arena loads queued here, the rest on loader threads."""
        for rid, job in meta.loads.items():
            if job.pin is not None:
                self._start_pinned(rid, job)
            elif job.layerwise:
                self._start_in_step(rid, job)
            elif not job.endpoints and not job.from_disk and self.tiers.current is not None:
                self._start_from_arena(rid, job)
            else:
                self._loader.submit(self._load, rid, job)
        for release in meta.releases:
            self._release(release.endpoints, release.transfer)

    def _peer(self, endpoints: list[str]) -> str:
        if self.rank >= len(endpoints):
            raise ProtocolError(f"the prefiller has {len(endpoints)} TP ranks; this decoder rank is {self.rank}")
        return endpoints[self.rank]

    def _load(self, rid: str, job: LoadJob) -> None:
        """Runs on a loader thread; whatever happens, the request is reported finished, with the
        blocks not loaded as errors for vLLM to recompute."""
        done = job.start
        try:
            done = self._pull(rid, job)
        except Exception:
            log.exception("request %s: KV load failed unexpectedly; prefilling it locally", rid)
            self.stats.add(load_failures=1)
        with self._lock:
            self._load_errors |= plan.blocks_from(done, job.end, job.block_ids, self.block_size)
            self._finished_loads.add(rid)
        if job.endpoints:
            self._release(job.endpoints, job.transfer)

    def _pull(self, rid: str, job: LoadJob) -> int:
        """Load the job's chunks from the prefiller, then what is still missing from the cache tier;
        returns the end of the tokens now in place."""
        assert self.paged is not None
        t0 = time.perf_counter()
        loader = ChunkLoader(self.paged, job, self.on_device, self.cfg.window(), self.cfg.per_frame(self.on_device))
        peer_error: Exception | None = None
        if job.endpoints:
            try:
                self._load_from_peer(job, loader)
            except Exception as e:
                peer_error = e
        peer_tokens, peer_bytes = loader.done - job.start, loader.nbytes
        t1 = time.perf_counter()
        if loader.done < job.end and self.cache is not None:
            self._load_from_cache(job, loader)
        cache_tokens, cache_bytes = loader.done - job.start - peer_tokens, loader.nbytes - peer_bytes
        t2 = time.perf_counter()
        self.stats.add(
            loaded_tokens=peer_tokens,
            loaded_bytes=peer_bytes,
            load_seconds=t1 - t0,
            cache_loaded_tokens=cache_tokens,
            cache_loaded_bytes=cache_bytes,
            cache_load_seconds=t2 - t1 if cache_tokens or not job.endpoints else 0.0,
        )
        if loader.done < job.end:
            what = f"hand-off from {job.endpoints[0]}" if job.endpoints else f"load from the cache {self.cfg.cache}"
            reason = f"{type(peer_error).__name__}: {peer_error}" if peer_error else (loader.error or "chunks missing")
            if job.endpoints and cache_tokens:
                reason += f"; {cache_tokens} tokens came from the cache tier"
            self._failed(rid, what, job, loader.done, reason)
        elif peer_error is not None:
            log.info("request %s: the %d tokens its prefiller lacked came from the cache tier", rid, cache_tokens)
        elif job.endpoints:
            self.stats.add(loads=1)
        return loader.done

    def _failed(self, rid: str, what: str, job: LoadJob, done: int, why: str) -> None:
        """Every kind of load that placed less than it was asked says so the same way, and counts
        once: the tokens from `done` on are computed by this instance."""
        log.warning(
            "request %s: KV %s failed after %d of %d tokens (%s); prefilling the remaining %d tokens locally",
            rid,
            what,
            done - job.start,
            job.end - job.start,
            why,
            job.end - done,
        )
        self.stats.add(load_failures=1)

    def _load_from_peer(self, job: LoadJob, loader: ChunkLoader) -> None:
        pull(self._conns, self._peer(job.endpoints), loader, self.cfg.lanes(), self._lanes)

    def _load_from_cache(self, job: LoadJob, loader: ChunkLoader) -> None:
        assert self.cache is not None
        rest = loader.remaining()
        keys = [rank_key(c.key, self.rank) for c in rest]
        loader.switch_source(on_device=False)  # the cache tier: host bytes
        try:
            if self.tiers.current is not None:
                with self.tiers.use() as tier:
                    if tier is None:
                        raise LocalError("the cache tier failed lately; skipped")
                    from_disk, seconds = tier.load(keys, loader, from_disk=True)
                if from_disk:
                    self.stats.add(
                        cache_disk_loaded_tokens=from_disk * self.cfg.chunk_size, cache_disk_load_seconds=seconds
                    )
            else:
                self.cache.fetch(keys, lambda header, _payload: loader.place(header), loader.sink)
        except Exception as e:  # a chunk that does not fit this cache: the rest is computed
            loader.error = f"{type(e).__name__}: {e}"
        finally:
            loader.settle()

    # -- loads from this host's arena, queued by the engine's thread and polled each step --
    def _start_from_arena(self, rid: str, job: LoadJob) -> None:
        assert self.paged is not None
        loader = ChunkLoader(self.paged, job)
        keys = [rank_key(c.key, self.rank) for c in job.chunks]
        taken = self._take_prefetched(keys)
        try:
            with self.tiers.use() as tier:
                if tier is None:
                    raise LocalError("the cache tier failed lately; skipped")
                for c, f in zip(job.chunks, taken, strict=False):
                    loader.check(c, f.meta, f.data.numel())
                    loader.place_from(f.data, after=f.copied)
                load = tier.start_load(keys[len(taken) :], loader)
        except Exception as e:  # nothing queued or pinned: the request computes it all
            loader.settle()
            self._drop_prefetched(taken)
            self._arena_load_done(rid, job, job.start, 0, 0.0, f"{type(e).__name__}: {e}")
            return
        self._from_arena[rid] = (job, loader, load, tier, taken)

    def _take_prefetched(self, keys: list[bytes]) -> list[Fetched]:
        return self.prefetch.take(keys) if self.prefetch is not None else []

    def _drop_prefetched(self, taken: list[Fetched]) -> None:
        if self.prefetch is not None:
            self.prefetch.done_with(taken)

    def _give_back_prefetched(self, taken: list[Fetched]) -> bool:
        """Hand back copies whose reads are done; whether their pins held (see Prefetch.good)."""
        if not taken:
            return True
        assert self.prefetch is not None
        self.prefetch.done_with(taken)
        if not self.prefetch.good(taken):
            return False
        self.stats.add(cache_prefetched_tokens=len(taken) * self.cfg.chunk_size)
        return True

    def _poll_from_arena(self) -> None:
        """End the arena loads whose copies are done: unpin their chunks and report the request."""
        for rid, (job, loader, load, tier, taken) in list(self._from_arena.items()):
            if not load.done():
                continue
            del self._from_arena[rid]
            held = tier.finish(load) & self._give_back_prefetched(taken)
            seconds = time.perf_counter() - load.started
            if held:
                self._arena_load_done(rid, job, loader.done, loader.nbytes, seconds, loader.error or "chunks missing")
            else:
                why = "the cache server unpinned chunks before they were copied"
                self._arena_load_done(rid, job, job.start, 0, seconds, why)

    def _arena_load_done(self, rid: str, job: LoadJob, done: int, nbytes: int, seconds: float, why: str) -> None:
        self.stats.add(cache_loaded_tokens=done - job.start, cache_loaded_bytes=nbytes, cache_load_seconds=seconds)
        if done < job.end:
            self._failed(rid, f"load from the cache {self.cfg.cache}", job, done, why)
        with self._lock:
            self._load_errors |= plan.blocks_from(done, job.end, job.block_ids, self.block_size)
            self._finished_loads.add(rid)

    def _release(self, endpoints: list[str], transfer_id: str) -> None:
        """This rank's chunks of the hand-off are no longer needed: its prefiller is told (in the background)."""
        try:
            self.releases.release(self._peer(endpoints), transfer_id)
        except ProtocolError as e:  # no such rank there: nothing of ours to release
            log.debug("release of %s: %s", transfer_id, e)

    def _send_release(self, address: str, transfer_id: str) -> None:
        with self._conns.connection(address) as conn:
            conn.call("release", meta={"transfer": transfer_id})

    # -- layer-wise loads, inside the step's forward pass (pd/layerwise.py) --
    def _start_in_step(self, rid: str, job: LoadJob) -> None:
        """Start pulling the hand-off layer by layer, on a thread of its own: the forward pass
        waits for each of this step's loads, none may queue behind another."""
        assert self.paged is not None
        try:
            load = LayerwiseLoad(self.paged, job, on_device=self.on_device, window=self.cfg.window())
        except Exception as e:  # no memory for its ring: the request is prefilled locally
            why = f"{type(e).__name__}: {e}"
            self._failed(rid, f"layer-wise hand-off from {job.endpoints[0]}", job, job.start, why)
            self._in_step_failed |= plan.blocks_from(job.start, job.end, job.block_ids, self.block_size)
            return
        thread = threading.Thread(target=self._pull_in_step, args=(rid, job, load), name="pdrun-layers", daemon=True)
        self._in_step[rid] = (job, load, thread)
        thread.start()

    def _pull_in_step(self, rid: str, job: LoadJob, load: LayerwiseLoad) -> None:
        t0 = time.perf_counter()
        try:
            pull_layers(self._conns, self._peer(job.endpoints), load)  # stops the load whatever happens
        except Exception as e:  # the forward pass goes on; the step's end reports the blocks
            log.debug("request %s: layer-wise load failed", rid, exc_info=True)
            load.stop(f"{type(e).__name__}: {e}")  # a failure before the pull (no such TP rank)
        self.stats.add(load_seconds=time.perf_counter() - t0)
        self._release(job.endpoints, job.transfer)

    def _start_pinned(self, rid: str, job: LoadJob) -> None:
        """Copy the chunks the scheduler pinned in the tier's arena in inside this step
        (`MappedLoad`): nothing can evict them meanwhile. The pins go once the step is done."""
        assert self.paged is not None and job.pin is not None
        pin, tier = job.pin, self.tiers.current
        try:
            if tier is None or tier.client.info.token != pin.token:
                raise LocalError("this worker does not map the arena the chunks were pinned in (a new cache server)")
            layout = self.paged.describe()
            for c, (_, nbytes, meta) in zip(job.chunks, pin.slots, strict=True):
                check_chunk(self.paged, layout, c, meta, nbytes)
            sources = [tier.slot(offset, nbytes) for offset, nbytes, _ in pin.slots]
            taken = self._take_prefetched([rank_key(c.key, self.rank) for c in job.chunks])
            sources[: len(taken)] = [f.data for f in taken]
            by_layer = tier.registered and self.paged.block_copy == "triton"
            after = [f.copied for f in taken if f.copied is not None]
            try:
                load = MappedLoad(self.paged, job, sources, by_layer, after)
            except Exception:
                self._drop_prefetched(taken)
                raise
        except Exception as e:  # the forward pass must not use its blocks: vLLM recomputes them
            self._failed(rid, self._in_step_what(job), job, job.start, f"{type(e).__name__}: {e}")
            self._in_step_failed |= plan.blocks_from(job.start, job.end, job.block_ids, self.block_size)
            if tier is not None and tier.client.info.token == pin.token:
                with contextlib.suppress(LocalError):
                    tier.client.release(pin.lease)
            return
        tier.enter()  # until the pins go
        self._pinned[rid] = (tier, time.perf_counter(), taken)
        self._in_step[rid] = (job, load, None)

    def _unpin(self, rid: str, job: LoadJob, load: LayerwiseLoad | MappedLoad) -> None:
        """A pinned load's copies are done: let its chunks go."""
        assert job.pin is not None
        tier, t0, taken = self._pinned.pop(rid)
        if not self._give_back_prefetched(taken):  # the load has stopped: nothing reads them now
            load.error = load.error or "the cache server unpinned chunks before they were copied in ahead"
        try:
            if not tier.client.release(job.pin.lease):
                load.error = load.error or "the cache server unpinned chunks before they were copied"
        except LocalError:  # a server gone frees nothing: its arena stays as it was while mapped here
            pass
        finally:
            tier.leave()
        self.stats.add(cache_load_seconds=time.perf_counter() - t0)

    def _in_step_what(self, job: LoadJob) -> str:
        if job.pin is not None:
            return f"in-step load from the cache {self.cfg.cache}"
        return f"layer-wise hand-off from {job.endpoints[0]}"

    def wait_for_layer(self, layer_name: str) -> None:
        """vLLM is about to compute `layer_name`: wait until this step's layer-wise loads placed it."""
        index = self.paged.layer_of.get(layer_name) if self.paged is not None else None
        if index is None:
            return
        for _, load, _ in self._in_step.values():
            load.wait(index)

    def _finish_in_step(self) -> set[int]:
        """The step is done: wait for its layer-wise loads to end, and return the blocks of those
        that did not arrive whole, or whose layers the forward pass did not wait for all (vLLM then
        recomputes the request's blocks and drops what the step computed for it)."""
        errors, self._in_step_failed = self._in_step_failed, set()
        for rid, (job, load, thread) in self._in_step.items():
            if thread is not None:
                thread.join()
            if job.pin is not None:
                load.stop()
                self._unpin(rid, job, load)
            skipped = [i for i, waited in enumerate(load.awaited) if not waited]
            tokens = job.end - job.start
            if load.complete and not skipped:
                if job.pin is not None:
                    loaded = {"cache_loaded_tokens": tokens, "cache_loaded_bytes": load.nbytes}
                    self.stats.add(**loaded, cache_in_step_tokens=tokens)
                else:
                    self.stats.add(loads=1, loaded_tokens=tokens, loaded_bytes=load.nbytes)
                continue
            reason = load.error or f"vLLM did not wait for layers {skipped} (no layer hooks?)"
            # Layers the forward pass already used cannot be patched: the whole load is computed.
            self._failed(rid, self._in_step_what(job), job, job.start, reason)
            errors |= plan.blocks_from(job.start, job.end, job.block_ids, self.block_size)
        for job, load, _ in self._in_step.values():
            kind = "loads from the cache tier inside the step" if job.pin is not None else "hand-offs loaded"
            if kind not in self._in_step_seen:
                self._in_step_seen.add(kind)
                log.info(
                    "PDConnector worker rank %d: %s layer by layer (%d of %d layers waited for by vLLM's hooks, "
                    "in the first such step)",
                    self.rank,
                    kind,
                    sum(load.awaited),
                    len(load.awaited),
                )
        self._in_step.clear()
        return errors

    def take_finished_loads(self) -> set[str] | None:
        self._poll_from_arena()
        with self._lock:
            done, self._finished_loads = self._finished_loads, set()
            # Errors go out in the same step as their request's completion.
            self._reported_errors |= self._load_errors
            self._load_errors = set()
        return done or None

    def take_load_errors(self) -> set[int]:
        errors = self._finish_in_step()  # called once a step, after its forward pass
        with self._lock:
            errors |= self._reported_errors
            self._reported_errors = set()
        return errors

    def shutdown(self) -> None:
        for _, _, load, tier, taken in self._from_arena.values():
            if load.ready is not None:
                load.ready.synchronize()
            tier.finish(load)
            self._drop_prefetched(taken)
        self._from_arena.clear()
        self._loader.shutdown(wait=False, cancel_futures=True)
        self.releases.close()
        if self._lanes is not None:
            self._lanes.shutdown(wait=False, cancel_futures=True)

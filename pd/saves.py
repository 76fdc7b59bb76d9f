"""A worker's saves: each step's finished chunks copied out of the paged KV cache, into the
staging pool for decoders to pull (a prefiller; with `layerwise`, layer by layer as vLLM computes
them) and to the cache tier (through this host's shared memory, else written behind over the
network)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pdrun.pd import plan
from pdrun.pd.chunkmeta import ChunkMeta
from pdrun.pd.codec import PagedKV
from pdrun.pd.keys import rank_key
from pdrun.pd.layerwise import LayerwiseSave
from pdrun.pd.staging import Staged, StagingPool
from pdrun.pd.stats import StatsCounter
from pdrun.pd.tier import TierLink
from pdrun.pd.write_behind import WriteBehind

if TYPE_CHECKING:
    from pdrun.pd.connector import PDMetadata

log = logging.getLogger(__name__)


class Saves:
    def __init__(
        self,
        paged: PagedKV,
        rank: int,
        stats: StatsCounter,
        pool: StagingPool | None,
        tiers: TierLink,
        writer: WriteBehind | None,
    ):
        self.paged = paged
        self.rank = rank
        self.stats = stats
        self.pool = pool
        self.tiers = tiers
        self.writer = writer
        self._layerwise: tuple[PDMetadata, LayerwiseSave] | None = None  # the step being copied out layer by layer
        self._layerwise_seen = False

    def save(self, meta: PDMetadata) -> None:
        """Copy this step's finished chunks out (queued behind the forward pass, on a GPU)."""
        if self.pool is not None:
            for transfer_id in meta.drops:
                self.pool.release(transfer_id)
            for transfer_id in meta.handed:
                self.pool.handed(transfer_id)
        evicted = self.pool.evicted_referenced if self.pool is not None else 0
        waited = self.pool.waited_s if self.pool is not None else 0.0
        copied = self._finish_layerwise(meta)
        to_tier: list[tuple[bytes, list[int]]] = []
        for s in meta.saves:
            try:
                if copied is not None and s.stage:  # copied out layer by layer: committed above
                    staged = self.pool.get(s.key) if self.pool is not None else None
                else:
                    staged = self._stage(s) if s.stage else None
                if s.cache and self.tiers.current is not None:
                    to_tier.append((rank_key(s.key, self.rank), s.block_ids))
                elif s.cache:
                    self._cache(s, staged)
            except Exception:  # never the engine's problem: a decoder prefills it, the tier misses it
                log.exception("request %s: could not copy out chunk %d", s.transfer, s.index)
        order = [rank_key(k, self.rank) for k in meta.tier_order] if to_tier else []
        with self.tiers.use() as tier:
            stored = tier is not None and tier.store(to_tier, order)
        if tier is not None and not stored:
            # A server that did not answer may have restarted: once more, through its new arena.
            with self.tiers.use() as tier:
                stored = tier is not None and tier.store(to_tier, order)
        if not stored and to_tier:
            self.stats.add(cache_store_dropped=len(to_tier))
        if self.pool is not None and self.pool.evicted_referenced != evicted:
            self.stats.add(staging_evictions=self.pool.evicted_referenced - evicted)
        if self.pool is not None and self.pool.waited_s != waited:
            self.stats.add(staging_wait_seconds=self.pool.waited_s - waited)

    def save_layer(self, meta: PDMetadata, layer_name: str) -> None:
        """`layerwise`: one layer of the step's chunks is computed; copy it out of the cache now."""
        if self.paged is None or self.pool is None or not meta.saves:
            return
        try:
            if self._layerwise is None or self._layerwise[0] is not meta:  # the step's first layer
                chunks = []
                for s in meta.saves:
                    if s.stage and not self.pool.reference(s.transfer, s.key):
                        buf = self.pool.allocate(self.paged.nbytes(len(s.block_ids)))
                        if buf is not None:
                            chunks.append((s, buf))
                self._layerwise = (meta, LayerwiseSave(self.paged, chunks))
            index = self.paged.layer_of.get(layer_name)
            if index is not None:
                self._layerwise[1].layer(index)
        except Exception:  # the step's chunks are then copied out whole in wait_for_save
            log.exception("copying out layer %s of the step's chunks failed", layer_name)
            self._layerwise = None

    def _finish_layerwise(self, meta: PDMetadata) -> LayerwiseSave | None:
        """The chunks this step copied out layer by layer, now served (their missing layers copied
        first); None where the step did not (layerwise off, or no hook ran)."""
        pending, self._layerwise = self._layerwise, None
        if pending is None or pending[0] is not meta or self.pool is None:
            return None
        copied = pending[1]
        try:
            ready = copied.finish()
        except Exception:
            log.exception("copying out the step's chunks failed; their decoders will prefill them")
            return copied
        for s, buf in copied.chunks:
            self.pool.commit(s.transfer, s.key, len(s.block_ids), buf, ready)
            self.stats.add(staged_chunks=1, staged_bytes=buf.numel())
        if copied.chunks and not self._layerwise_seen:
            self._layerwise_seen = True
            log.info(
                "PDConnector worker rank %d: chunks copied out layer by layer (%d of %d layers as vLLM computed "
                "them, in the first such step)",
                self.rank,
                copied.hooked,
                len(copied.copied),
            )
        return copied

    def _stage(self, s: plan.ChunkSave) -> Staged | None:
        """Put the chunk in the staging pool; its entry, or None if it does not fit."""
        if self.pool is None or self.paged is None:
            return None
        paged = self.paged
        nbytes = paged.nbytes(len(s.block_ids))
        if not self.pool.stage(
            s.transfer, s.key, len(s.block_ids), nbytes, lambda buf, ids=s.block_ids: paged.gather(ids, buf)
        ):
            return None
        self.stats.add(staged_chunks=1, staged_bytes=nbytes)
        return self.pool.get(s.key)

    def _cache(self, s: plan.ChunkSave, staged: Staged | None) -> None:
        """Queue the chunk for the cache tier; a staged host buffer is shared (never written again),
        a chunk staged in GPU memory gets a host copy of its own."""
        if self.writer is None or self.paged is None:
            return
        if staged is not None and not staged.buffer.is_cuda:
            chunk, ready = staged.buffer, staged.ready
        else:
            chunk = self.paged.host_buffer(self.paged.nbytes(len(s.block_ids)))
            ready = self.paged.gather(s.block_ids, chunk)
        meta = ChunkMeta(self.paged.describe(), len(s.block_ids)).encode()
        if not self.writer.submit(rank_key(s.key, self.rank), chunk, meta, ready):
            self.stats.add(cache_store_dropped=1)

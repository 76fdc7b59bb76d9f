"""Connector statistics: counted in the workers, summed by vLLM, exported on vLLM's /metrics.

Every name is documented in the README. Counters are cumulative in Prometheus; each stats object
vLLM collects holds the increments since the last collection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

# name -> help text; all are counters of the worker side
COUNTERS: dict[str, str] = {
    "loaded_tokens": "Prompt tokens whose KV a decoder loaded from a prefiller",
    "loaded_bytes": "Bytes of KV a decoder loaded",
    "load_seconds": "Seconds spent pulling and scattering KV hand-offs",
    "loads": "KV hand-offs a decoder completed",
    "load_failures": "KV hand-offs that failed, in part or whole, and were prefilled locally",
    "staged_chunks": "Chunks a prefiller copied into its staging pool",
    "staged_bytes": "Bytes a prefiller copied into its staging pool",
    "served_bytes": "Bytes a prefiller's transfer endpoint sent to decoders",
    "staging_evictions": "Staged chunks evicted while a decoder still awaited them",
    "staging_wait_seconds": "Seconds a prefiller paused for decoders to pull hand-offs from its full staging pool",
    "staging_deferred_prefills": "Prefills a prefiller held back in its queue until decoders pulled enough of the "
    "hand-offs its staging pool holds to make room for theirs",
    "cache_lookup_tokens": "Prompt tokens (in full chunks) looked up in the cache tier",
    "cache_hit_tokens": "Looked-up tokens the cache tier held, as a leading run",
    "cache_loaded_tokens": "Prompt tokens whose KV was loaded from the cache tier",
    "cache_loaded_bytes": "Bytes of KV loaded from the cache tier",
    "cache_load_seconds": "Seconds spent fetching and scattering KV from the cache tier",
    "cache_prefetched_tokens": "Of the tokens loaded from the cache tier, those copied into device memory ahead of "
    "their request on the proxy's hint (cache_prefetch_gb)",
    "cache_prefetch_copied_tokens": "Prompt tokens copied into device memory on the proxy's hints (cache_prefetch_gb); "
    "those no load used (the GPU cache held them, or the pool gave them up) cost only the bus's time",
    "cache_in_step_tokens": "Of the tokens loaded from the cache tier, those copied in inside the step that "
    "computes their request (cache_load_in_step)",
    "cache_stored_chunks": "Chunks written behind to the cache tier",
    "cache_stored_bytes": "Bytes written behind to the cache tier",
    "cache_store_seconds": "Seconds the write-behind thread spent putting chunks",
    "cache_store_dropped": "Chunks not written to the cache tier (queue full, cache down or no room)",
    "cache_store_no_room": "Of the chunks not written to the cache tier, those its memory had no room for (every "
    "slot held by loads and stores under way)",
    "cache_store_skipped": "Chunks the cache tier held already, not copied again",
    "cache_disk_loaded_tokens": "Prompt tokens whose KV an instance read from the cache tier's disk",
    "cache_disk_load_seconds": "Seconds spent reading and scattering KV from the cache tier's disk",
}

# Not counters: what a prefiller's workers tell its scheduler with each step's stats (pd/staging_room.py).
STAGING_CAPACITY = "staging_capacity_chunks"  # chunks the staging pool holds (the smallest rank's)
STAGING_LET_GO = "staging_let_go"  # hand-offs that hold no room in it any more


@dataclass
class PDStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = {name: 0 for name in COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name in COUNTERS:
            self.data[name] += other.data.get(name, 0)
        let_go = other.data.get(STAGING_LET_GO)
        if let_go:
            self.data[STAGING_LET_GO] = [*self.data.get(STAGING_LET_GO, ()), *let_go]
        capacities = [c for c in (self.data.get(STAGING_CAPACITY), other.data.get(STAGING_CAPACITY)) if c]
        if capacities:
            self.data[STAGING_CAPACITY] = min(capacities)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: round(v, 4) if isinstance(v, float) else v for name in COUNTERS if (v := self.data[name])}

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in COUNTERS)


class StatsCounter:
    """Thread-safe increments from the engine thread, loader threads and the endpoint's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = {name: 0 for name in COUNTERS}

    def add(self, **increments: float) -> None:
        with self._lock:
            for name, v in increments.items():
                self._data[name] += v

    def take(self) -> PDStats | None:
        with self._lock:
            data, self._data = self._data, {name: 0 for name in COUNTERS}
        stats = PDStats(data=data)
        return None if stats.is_empty() else stats


class PDPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str], per_engine_labelvalues: Any):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: create_metric_per_engine(
                self._counter_cls(name=f"pdrun:{name}", documentation=doc, labelnames=labelnames),
                self.per_engine_labelvalues,
            )
            for name, doc in COUNTERS.items()
        }
        self._hit_ratio = create_metric_per_engine(
            self._gauge_cls(
                name="pdrun:cache_hit_ratio",
                documentation="Cache-tier hit tokens over looked-up tokens, since the instance started",
                labelnames=labelnames,
                multiprocess_mode="mostrecent",
            ),
            self.per_engine_labelvalues,
        )
        self._looked_up: dict[int, float] = {}
        self._hit: dict[int, float] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, per_engine in self._counters.items():
            v = transfer_stats_data.get(name, 0)
            if v:
                per_engine[engine_idx].inc(v)
        looked_up = transfer_stats_data.get("cache_lookup_tokens", 0)
        if looked_up:
            self._looked_up[engine_idx] = self._looked_up.get(engine_idx, 0) + looked_up
            self._hit[engine_idx] = self._hit.get(engine_idx, 0) + transfer_stats_data.get("cache_hit_tokens", 0)
            self._hit_ratio[engine_idx].set(self._hit[engine_idx] / self._looked_up[engine_idx])

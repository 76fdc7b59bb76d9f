"""The shared cache: a TieredStore served over a Transport, so every instance on every host uses one.

Ops (keys are hex chunk keys, in prompt order):
    lookup {keys}        -> {"count": how many leading keys are stored}
    get {keys}           -> a "chunk" frame per leading stored key, then {"count": n}
    put key, payload, {meta} -> {"stored": bool}
    stats                -> per-tier counters
    local                -> where an instance on this host reaches the tier through shared memory
                            (storage/local.py), or {} when it does not offer that
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from typing import Any

from pdrun import transfer
from pdrun.storage.local import MAX_KEYS, LocalService
from pdrun.storage.tiers import TieredStore
from pdrun.transfer import Frame, Header, Service

log = logging.getLogger("pdrun.storage")
MAX_CHUNK_BYTES = 1 << 30


def keys_from(meta: dict[str, Any], limit: int = MAX_KEYS) -> list[bytes]:
    """The hex chunk keys of a request's meta, at most `limit` of them; a ValueError names the field."""
    raw = meta.get("keys")
    if not isinstance(raw, list) or len(raw) > limit:
        raise ValueError(f"'keys' must be a list of at most {limit} hex chunk keys")
    try:
        return [bytes.fromhex(k) for k in raw]
    except (TypeError, ValueError):
        raise ValueError("'keys' must be a list of hex chunk keys") from None


class CacheService(Service):
    """Each connection's thread reuses one buffer for the chunks it receives and one for those it
    sends: no allocation (and no page faults) per chunk once warm."""

    def __init__(self, store: TieredStore, max_chunk_bytes: int = MAX_CHUNK_BYTES, local: LocalService | None = None):
        self.store = store
        self.local = local
        self.max_chunk_bytes = max_chunk_bytes
        self._local = threading.local()

    def _scratch(self, name: str, nbytes: int) -> memoryview:
        buf = getattr(self._local, name, None)
        if buf is None or len(buf) < nbytes:
            buf = bytearray(nbytes)
            setattr(self._local, name, buf)
        return memoryview(buf)[:nbytes]

    def receive_buffer(self, header: Header) -> Any:
        if header.op != "put":
            raise ValueError(f"a {header.op!r} request carries no payload")
        if header.nbytes > self.max_chunk_bytes:
            raise ValueError(f"chunk of {header.nbytes} bytes is over the {self.max_chunk_bytes}-byte limit")
        return self._scratch("received", header.nbytes)  # the store copies it before the next request

    def handle(self, request: Header, payload: Any) -> Iterator[Frame]:
        op = request.op
        if op == "lookup":
            return {"count": self.store.lookup(keys_from(request.meta))}
        if op == "get":
            keys = keys_from(request.meta)
            served = 0
            for key in keys:
                # The frame is sent before the next chunk is read: one buffer serves the whole stream.
                chunk = self.store.get(key, lambda n: self._scratch("sent", n))
                if chunk is None:
                    break
                data = memoryview(chunk.data).cast("B")
                header = Header(op="chunk", key=key, nbytes=data.nbytes, checksum=chunk.digest, meta=chunk.meta)
                yield Frame(header, data)
                served += 1
            self.store.touch(keys[:served])
            return {"count": served}
        if op == "put":
            if not request.key:
                raise ValueError("put needs a key")
            meta = request.meta.get("meta", {})
            if not isinstance(meta, dict):
                raise ValueError("'meta' must be a mapping")
            # The transport verified the payload against request.checksum: keep it for the gets.
            data = payload if payload is not None else b""
            return {"stored": self.store.put(request.key, data, meta, request.checksum)}
        if op == "stats":
            return self.store.stats()
        if op == "local":
            return dataclasses.asdict(self.local.info()) if self.local is not None else {}
        raise ValueError(f"unknown op {op!r} (the cache serves lookup, get, put, stats, local)")


class CacheServer:
    """A TieredStore behind a transport listener, and for instances on this host its arena
    (`local`, storage/local.py); `close()` stops serving and flushes the disk writes."""

    def __init__(self, address: str, store: TieredStore, local: bool = True, auth_token: str | None = None):
        self.store = store
        self.local = LocalService(store) if local else None
        try:
            options = {} if auth_token is None else {"auth_token": auth_token}  # else $PDRUN_AUTH_TOKEN
            self.listener = transfer.listen(address, CacheService(store, local=self.local), **options)
        except BaseException:
            if self.local is not None:
                self.local.close()
            raise
        self.address = self.listener.address

    def close(self) -> None:
        self.listener.close()
        if self.local is not None:
            self.local.close()
        self.store.close()

    def __enter__(self) -> CacheServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreCollector:
    """Prometheus metrics read from the store's counters at scrape time, per tier."""

    COUNTERS = ("hits", "misses", "puts", "bytes_in", "bytes_out", "evictions", "dropped_corrupt")
    GAUGES = ("entries", "bytes_used")

    def __init__(self, store: TieredStore, local: LocalService | None = None):
        self.store = store
        self.local = local

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.store.stats()
        for name in self.COUNTERS:
            family = CounterMetricFamily(f"pdrun:cache_{name}", f"cache {name.replace('_', ' ')}", labels=["tier"])
            for tier, values in stats.items():
                family.add_metric([tier], values.get(name, 0))
            yield family
        for name in self.GAUGES:
            family = GaugeMetricFamily(f"pdrun:cache_{name}", f"cache {name.replace('_', ' ')} now", labels=["tier"])
            for tier, values in stats.items():
                family.add_metric([tier], values.get(name, 0))
            yield family
        writable = GaugeMetricFamily(
            "pdrun:cache_writable",
            "1 while the tier takes writes, 0 while it is off (a full or failing disk)",
            labels=["tier"],
        )
        for tier, values in stats.items():
            if "writable" in values:
                writable.add_metric([tier], values["writable"])
        yield writable
        ratio = GaugeMetricFamily("pdrun:cache_hit_ratio", "hits over hits plus misses of chunk gets", labels=["tier"])
        for tier, values in stats.items():
            asked = values.get("hits", 0) + values.get("misses", 0)
            ratio.add_metric([tier], values.get("hits", 0) / asked if asked else 0.0)
        yield ratio
        if self.local is not None:
            requests = CounterMetricFamily(
                "pdrun:cache_local_requests", "requests of instances on this host, by op", labels=["op"]
            )
            for op, n in sorted(self.local.requests.items()):
                requests.add_metric([op], n)
            yield requests
            yield GaugeMetricFamily(
                "pdrun:cache_leases", "chunk leases held now by instances on this host", value=self.local.leases()
            )


def serve_metrics(store: TieredStore, host: str, port: int, local: LocalService | None = None) -> Any:
    """`/metrics` for Prometheus on host:port, from a thread; returns the HTTP server (shutdown() stops it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(StoreCollector(store, local))  # type: ignore[arg-type]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server

"""The proxy's own /metrics: requests by path and outcome, the phases of each (pd/proxy/timing.py),
and each backend's health and requests in flight."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdrun.pd.proxy.routing import Router
from pdrun.pd.proxy.timing import PHASES, RequestTiming

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class ProxyMetrics:
    def __init__(self, router: Router):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pdrun:proxy_requests", "Requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.handoffs = Counter("pdrun:proxy_handoffs", "Requests served prefill -> decode", registry=r)
        self.continued = Counter(
            "pdrun:proxy_continued", "Answers a decoder continued after the prefiller's first token", registry=r
        )
        self.prefill_only = Counter(
            "pdrun:proxy_prefill_only", "Answers the prefiller gave whole (a stop, or max_tokens 1)", registry=r
        )
        self.decoder_first_tokens = Counter(
            "pdrun:proxy_decoder_first_tokens",
            "Hand-offs whose first token the decoder sampled itself, by reason",
            ["reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            "pdrun:proxy_decode_only", "Requests a decoder prefilled itself, by reason", ["reason"], registry=r
        )
        self.retries = Counter("pdrun:proxy_decode_retries", "Requests moved to another decoder", registry=r)
        self.resumed = Counter(
            "pdrun:proxy_decode_resumed",
            "Streamed answers whose decoder died mid-stream, gone on on another decoder after the tokens streamed",
            registry=r,
        )
        self.handoff_tokens = Counter(
            "pdrun:proxy_handoff_tokens", "Prompt tokens whose KV prefillers staged for decoders", registry=r
        )
        self.phases = Histogram(
            "pdrun:proxy_phase_seconds", "Time per phase of a request (pd/proxy/timing.py)", ["phase"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "pdrun:proxy_ttft_seconds", "Request to first token, streamed answers", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "pdrun:proxy_tpot_seconds", "Time per output token after the first, streamed answers",
            buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "pdrun:proxy_request_seconds", "Request to last byte of the answer", buckets=LATENCY_BUCKETS, registry=r
        )

        healthy = Gauge("pdrun:proxy_backend_healthy", "1 while a backend is in rotation", ["role", "url"], registry=r)
        outstanding = Gauge("pdrun:proxy_outstanding", "Requests in flight per backend", ["role", "url"], registry=r)
        for b in router.backends:
            healthy.labels(b.role, b.url).set_function(lambda b=b: float(b.healthy))
            outstanding.labels(b.role, b.url).set_function(lambda b=b: float(b.outstanding))

    def observe(self, t: RequestTiming) -> None:
        for phase in PHASES:
            v = getattr(t, phase)
            if v is not None and phase != "total":  # total: pdrun:proxy_request_seconds
                self.phases.labels(phase).observe(v)
        if t.ttft is not None:
            self.ttft.observe(t.ttft)
        if t.tpot is not None:
            self.tpot.observe(t.tpot)
        if t.total is not None:
            self.e2e.observe(t.total)

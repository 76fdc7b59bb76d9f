"""`pdrun bench --kill-decoder` without vLLM: the workloads counting the requests a real HTTP server
fails in each way a dying decoder fails them, and the kill itself under a real supervisor, whose
children stand in for the decoders and a small server for the proxy's /health."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdrun.launch import workloads as wl
from pdrun.launch.kills import DecoderKill
from pdrun.launch.supervisor import Supervisor, answers_health
from pdrun.launch.systems import PdrunSystem, Settings, SystemFailure, make
from tests.unit.http_stub import Streaming, serving
from tests.unit.test_supervisor import run_in_thread, spec, wait_for

# ---- failed requests counted ----


class Flaky(Streaming):
    """Answers completions in turn: in full; 500; an error event after a token; a token and then
    the connection closed mid-stream, as a decoder whose process is killed."""

    ways = ("full", "status", "event", "dies")
    served = 0
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with type(self).lock:
            way = self.ways[type(self).served % len(self.ways)]
            type(self).served += 1
        if way == "status":
            self.send_response(500)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no")
            return
        self.start_stream()
        self.chunk(self.token(7))
        if way == "dies":
            self.die()
            return
        if way == "event":
            self.chunk(b'data: {"error": {"message": "decoder gone", "code": 502}}\n\n')
        else:
            for _ in range(body["max_tokens"] - 1):
                self.chunk(self.token(8))
        self.end_stream()

    def token(self, token_id: int) -> bytes:
        choice = {"index": 0, "text": "x", "token_ids": [token_id], "finish_reason": None}
        return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


@pytest.fixture
def flaky() -> Iterator[str]:
    Flaky.served = 0
    with serving(Flaky) as url:
        yield url


NOREUSE = wl.NoreuseSizes(lengths=(8,), concurrency=(1,), output=4, prompts_per_user=8)


def test_under_a_kill_noreuse_counts_failed_requests_and_times_only_the_answered(flaky):
    target = wl.Target(flaky, "m", count_failures=True)
    figures = asyncio.run(wl.noreuse(target, NOREUSE, seed=1))
    assert figures["failed_requests"] == 6  # 8 requests, the four ways in turn: 6 failed
    # Throughput counts every token streamed: 2 answers of 4, and the 1 token each of 4 failures.
    assert figures["output_tok_s_8_c1"] > 0
    assert figures["ttft_p50_s_8_c1"] > 0 and figures["tpot_p50_ms_8_c1"] >= 0


def test_without_a_kill_the_first_failed_request_fails_the_workload(flaky):
    two = wl.NoreuseSizes(lengths=(8,), concurrency=(1,), output=4, prompts_per_user=2)
    with pytest.raises(wl.WorkloadError, match="answered 500"):
        asyncio.run(wl.noreuse(wl.Target(flaky, "m"), two, seed=1))  # the second is answered 500
    Flaky.served = 0  # the next is answered in full
    one = wl.NoreuseSizes(lengths=(8,), concurrency=(1,), output=4, prompts_per_user=1)
    assert "failed_requests" not in asyncio.run(wl.noreuse(wl.Target(flaky, "m"), one, seed=1))


def test_under_a_kill_slo_counts_failed_requests_and_never_counts_them_good(flaky):
    sizes = wl.SloSizes(rates=(8.0,), duration_s=1.0, prompt=(8, 8), output=(4, 4), ttft_s=5.0, tpot_s=1.0)
    t0 = time.perf_counter()
    figures = asyncio.run(wl.slo(wl.Target(flaky, "m", count_failures=True), sizes, gpus=1, seed=1))
    took = time.perf_counter() - t0
    assert figures["failed_requests"] == 6
    # 8 requests, all within the objectives but the 6 failed: 2 good over the workload's time
    assert 2 / took <= figures["goodput_rps_per_gpu_r8"] < 4 / took


# ---- the kill ----


class ProxyHealth(http.server.BaseHTTPRequestHandler):
    """The proxy's GET /health, its decoders in rotation while they answer their own /health."""

    state_path: Path

    def do_GET(self):
        children = json.loads(self.state_path.read_text())["children"]
        decode = [{"url": c["url"], "healthy": answers_health(f"{c['url']}/health")} for c in children.values()]
        body = json.dumps({"healthy": any(d["healthy"] for d in decode), "decode": decode}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def deployment(tmp_path: Path, restart: bool) -> Iterator[tuple[PdrunSystem, Supervisor]]:
    """Two supervised decoders (small HTTP servers) with a /health like the proxy's, as a pdrun
    system whose state.json and proxy the bench reads."""
    system = make("pdrun-0p2d", [0, 1], Settings(model="m", device="cpu"), tmp_path, restart_instances=restart)
    assert isinstance(system, PdrunSystem)
    run_dir = tmp_path / "run"
    sup = Supervisor([spec("decode-0"), spec("decode-1")], run_dir, restart=restart, echo_logs=False, say=print)
    thread, _ = run_in_thread(sup)
    wait_for(lambda: sup.ready)
    handler = type("Health", (ProxyHealth,), {"state_path": run_dir / "state.json"})
    system.config = {"run_dir": str(run_dir)}
    system.instance_urls = [c.spec.health_url.removesuffix("/health") for c in sup.children]
    try:
        with serving(handler) as system.url:
            yield system, sup
    finally:
        sup.stop_requested.set()
        thread.join(timeout=30)


@pytest.fixture
def restarting(tmp_path: Path) -> Iterator[tuple[PdrunSystem, Supervisor]]:
    yield from deployment(tmp_path, restart=True)


@pytest.fixture
def not_restarting(tmp_path: Path) -> Iterator[tuple[PdrunSystem, Supervisor]]:
    yield from deployment(tmp_path, restart=False)


def test_a_decoder_killed_during_the_workload_is_timed_until_it_is_back_in_rotation(restarting):
    system, sup = restarting
    victim = sup.children[1]
    first = victim.proc.pid
    said: list[str] = []
    kill = DecoderKill(system, "noreuse", after_s=0.2, rejoin_timeout_s=30, say=said.append)
    assert kill.decoder == "decode-1" and kill.survivors == system.instance_urls[:1]
    with kill:
        time.sleep(1.0)  # the workload
    figures = kill.figures()
    assert figures["decoder_killed"] == 1
    # the supervisor restarts it after 1 s; the rejoin is seen at the next look after it answers
    assert 1.0 <= figures["decoder_rejoined_s"] < 10
    assert victim.starts == 2 and victim.proc.pid != first
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)
    assert any("decode-1 killed 0.2s into noreuse; back in rotation" in m for m in said)


def test_a_kill_due_after_the_workload_ended_kills_nothing(restarting):
    system, sup = restarting
    pid = sup.children[1].proc.pid
    said: list[str] = []
    with DecoderKill(system, "slo", after_s=30, rejoin_timeout_s=30, say=said.append) as kill:
        pass  # a workload shorter than the kill's time
    assert kill.figures() == {"decoder_killed": 0}
    assert sup.children[1].proc.pid == pid and sup.children[1].starts == 1
    assert said == ["  pdrun-0p2d: decode-1 not killed: slo ended after 0s, before 30s"]


def test_a_decoder_that_does_not_come_back_fails_the_system_with_why(not_restarting):
    system, _ = not_restarting
    kill = DecoderKill(system, "noreuse", after_s=0, rejoin_timeout_s=2, say=print)
    with kill:
        time.sleep(0.5)
    with pytest.raises(SystemFailure, match="decode-1 did not rejoin within 2 s"):
        kill.figures()

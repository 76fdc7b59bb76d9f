"""The proxy's view of backend health, against real HTTP servers: a busy backend that answers
/health late stays in rotation until it stays silent several checks in a row; a refused
connection takes it out at once; a connection not made in time moves the request elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import struct
import threading
import time

from pdrun.pd.proxy.app import Proxy, ProxySettings
from pdrun.pd.proxy.continuation import COMPLETIONS
from pdrun.pd.proxy.health import SLOW_PROBES_DOWN
from pdrun.pd.proxy.timing import RequestTiming
from pdrun.pd.proxy.upstream import Upstream


class Backend(http.server.BaseHTTPRequestHandler):
    delay = 0.0

    def do_GET(self):
        if self.path == "/health":
            time.sleep(type(self).delay)
        body = json.dumps({"data": [{"id": "m"}]}).encode() if self.path == "/v1/models" else b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"choices": [{"text": "ok"}], "usage": {"completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve() -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_slow_health_answer_is_busy_not_gone_and_a_refusal_is_gone():
    server, url = serve()
    dead = refused_url()
    proxy = Proxy(ProxySettings(decode=[url, dead]))
    busy, gone = proxy.router.decoders

    async def run() -> list[bool]:
        proxy.client = Upstream()
        try:
            await proxy.health.check_all()
            assert busy.healthy and busy.models == {"m"}
            assert not gone.healthy and "Refused" in gone.last_error
            Backend.delay = 2.5  # over the probe's 2 s timeout
            seen = []
            for _ in range(SLOW_PROBES_DOWN):
                await proxy.health.check_all()
                seen.append(busy.healthy)
            Backend.delay = 0.0
            await proxy.health.check_all()
            seen.append(busy.healthy)
            return seen
        finally:
            await proxy.client.close()

    try:
        seen = asyncio.run(run())
    finally:
        server.shutdown()
    assert seen == [True] * (SLOW_PROBES_DOWN - 1) + [False, True]


def blackhole_url() -> tuple[str, list[socket.socket]]:
    """A port whose listen backlog is full: connecting there hangs until the client gives up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    held = [server]
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        held.append(c)
    time.sleep(0.2)
    return f"http://127.0.0.1:{port}", held


def test_a_connection_not_made_in_time_moves_the_request_to_another_decoder():
    server, url = serve()
    hole, held = blackhole_url()
    proxy = Proxy(ProxySettings(decode=[hole, url], connect_timeout_s=0.5))
    for b in proxy.router.decoders:
        b.mark_up(["m"])

    async def run() -> list[int]:
        proxy.client = Upstream(connect_timeout_s=0.5, read_timeout_s=10)
        try:
            statuses = []
            for i in range(4):  # equally idle decoders take turns: the blackhole comes up
                timing = RequestTiming(str(i), COMPLETIONS, stream=False)
                r = await proxy._decode(COMPLETIONS, {"prompt": "x"}, time.monotonic(), timing)
                statuses.append(r.status_code)
            return statuses
        finally:
            await proxy.client.close()

    try:
        statuses = asyncio.run(run())
    finally:
        server.shutdown()
        for s in held:
            s.close()
    assert statuses == [200] * 4
    retries = proxy.metrics.registry.get_sample_value("pdrun:proxy_decode_retries_total")
    assert retries >= 1  # the blackhole was tried, and left for the other


class Frozen(Backend):
    """A prefiller that stopped answering (SIGSTOP, a hung GPU): requests are taken, never answered."""

    release = threading.Event()

    def do_GET(self):
        type(self).release.wait(30)

    def do_POST(self):
        type(self).release.wait(30)


def test_a_prefill_waiting_on_a_prefiller_that_leaves_the_rotation_stops_waiting():
    frozen = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Frozen)
    frozen.daemon_threads = True
    threading.Thread(target=frozen.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{frozen.server_address[1]}"
    proxy = Proxy(ProxySettings(prefill=[url], decode=[url], prefill_timeout_s=300))
    prefiller = proxy.router.prefillers[0]
    prefiller.mark_up(["m"])

    async def run() -> tuple[object, float]:
        proxy.client = Upstream()
        try:
            timing = RequestTiming("1", COMPLETIONS, stream=False)
            t0 = time.monotonic()
            waiting = asyncio.ensure_future(proxy._prefill(COMPLETIONS, {"prompt": "x", "max_tokens": 4}, timing))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            for _ in range(SLOW_PROBES_DOWN):  # its /health times out too, check after check
                await proxy.health.check(prefiller)
            return await asyncio.wait_for(waiting, 5), time.monotonic() - t0
        finally:
            await proxy.client.close()

    try:
        answer, took = asyncio.run(run())
    finally:
        Frozen.release.set()
        frozen.shutdown()
    assert answer == "prefiller out of rotation" and not prefiller.healthy
    assert took < 60  # the checks' 2 s timeouts, not the 300 s prefill timeout


def torn_down_url() -> tuple[str, threading.Event]:
    """A dying peer: every connection is accepted and reset at once, before a byte is read."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", stop


def test_a_connection_torn_down_as_it_is_made_is_a_failed_backend_not_a_500():
    """A backend that resets every connection: the prefill goes to a decoder, the decode to the
    other decoder, and a health check takes the backend out of rotation (the checks go on)."""
    dying, stop = torn_down_url()
    server, alive = serve()
    proxy = Proxy(ProxySettings(prefill=[dying], decode=[dying, alive]))
    for b in proxy.router.backends:
        b.mark_up(["m"])

    async def run() -> tuple[object, list[int]]:
        proxy.client = Upstream(connect_timeout_s=5, read_timeout_s=5)
        try:
            timing = RequestTiming("1", COMPLETIONS, stream=False)
            reason = await proxy._prefill(COMPLETIONS, {"prompt": "x", "max_tokens": 4}, timing)
            statuses = []
            for i in range(2):
                timing = RequestTiming(str(i), COMPLETIONS, stream=False)
                r = await proxy._decode(COMPLETIONS, {"prompt": "x"}, time.monotonic(), timing)
                statuses.append(r.status_code)
            for b in proxy.router.backends:
                b.mark_up(["m"])
            await proxy.health.check_all()
            return reason, statuses
        finally:
            await proxy.client.close()

    try:
        reason, statuses = asyncio.run(run())
    finally:
        stop.set()
        server.shutdown()
    assert reason == "prefiller unreachable" and statuses == [200, 200]
    assert {b.url for b in proxy.router.backends if not b.healthy} == {dying}


def test_a_health_check_on_a_connection_the_backend_just_closed_is_tried_again_not_a_backend_gone():
    """A kept-alive connection the backend closed as the check went out: the answer is a
    RemoteProtocolError; the check goes again on a new connection and the backend stays in."""
    server = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{server.getsockname()[1]}"

    def serve() -> None:
        for attempt in range(2):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                if attempt:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    proxy = Proxy(ProxySettings(decode=[url]))
    backend = proxy.router.decoders[0]
    backend.mark_up(["m"])

    async def run() -> None:
        proxy.client = Upstream()
        try:
            await proxy.health.check(backend)
        finally:
            await proxy.client.close()

    try:
        asyncio.run(run())
    finally:
        server.close()
    assert backend.healthy, backend.last_error


def test_the_proxy_health_endpoint_answers_503_until_a_decoder_is_in_rotation_then_200():
    from fastapi.testclient import TestClient

    from pdrun.pd.proxy.app import create_app

    settings = ProxySettings(prefill=["http://127.0.0.1:1"], decode=["http://127.0.0.1:2"])
    app = create_app(settings)
    client = TestClient(app)  # no lifespan: no health checks run, the backends stay as set here
    r = client.get("/health")
    assert r.status_code == 503 and [b["url"] for b in r.json()["decode"]] == ["http://127.0.0.1:2"]
    app.state.proxy.router.decoders[0].mark_up(["m"])
    assert client.get("/health").status_code == 200


class ClosesFirst(Backend):
    """A decoder that closes the first connection a request comes on without answering (as when
    a kept-alive connection times out at the server just as the proxy reuses it), then answers."""

    protocol_version = "HTTP/1.1"
    closed: list[int] = []

    def do_POST(self):
        if not type(self).closed:
            type(self).closed.append(1)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.close_connection = True
            return
        super().do_POST()


def test_a_decoder_that_closed_the_connection_is_asked_again_on_a_new_one():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ClosesFirst)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = Proxy(ProxySettings(decode=[f"http://127.0.0.1:{server.server_address[1]}"]))
    proxy.router.decoders[0].mark_up(["m"])

    async def run() -> int:
        proxy.client = Upstream(connect_timeout_s=5, read_timeout_s=5)
        try:
            timing = RequestTiming("r", COMPLETIONS, stream=False)
            return (await proxy._decode(COMPLETIONS, {"prompt": "x"}, time.monotonic(), timing)).status_code
        finally:
            await proxy.client.close()

    try:
        assert asyncio.run(run()) == 200  # the only decoder, asked again: not "no decoder in rotation"
    finally:
        server.shutdown()
    assert ClosesFirst.closed == [1]

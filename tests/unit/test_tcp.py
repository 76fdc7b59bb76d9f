"""The transports over real loopback: TCP, and UCX (over TCP on a CPU-only host) for everything that is
not about raw sockets: sizes up to 64 MiB, concurrency, reuse, and the ways a peer can misbehave."""

import os
import socket
import struct
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import pytest

from pdrun import transfer
from pdrun.transfer import Frame, Header, Service
from pdrun.transfer.wire import MAGIC, VERSION, checksum, decode_header, decode_prefix, encode_header


class Echo(Service):
    def __init__(self):
        self.connections = set()

    def handle(self, request, payload):
        if request.op == "echo":
            yield Frame(Header(op="data", key=request.key), payload)
            return {"n": request.nbytes}
        if request.op == "many":
            for i, size in enumerate(request.meta["sizes"]):
                yield Frame(Header(op="data", meta={"i": i}), os.urandom(size))
            return {}
        if request.op == "numbered":
            for i in range(request.meta["count"]):
                yield Frame(Header(op="data", meta={"i": i}), bytes([i]) * request.meta["size"])
            return {}
        if request.op == "fail":
            raise KeyError("no such thing")
        if request.op == "sleep":
            time.sleep(request.meta["s"])
            return {}
        raise ValueError(f"unknown op {request.op}")


@pytest.fixture(params=["tcp", "ucx"])
def scheme(request):
    return request.param


@pytest.fixture
def echo(scheme):
    service = Echo()
    with transfer.listen(f"{scheme}://127.0.0.1:0", service, io_timeout=5) as listener:
        yield listener


def test_header_round_trip_and_validation():
    h = Header(op="chunk", key=b"k" * 16, nbytes=10, checksum=2**64 - 1, more=True, meta={"a": [1, "x"]})
    raw = encode_header(h)
    assert decode_header(raw[decode_prefix(raw[:9]) * 0 + 9 :], 100) == h
    bad = msgspec.msgpack.encode({"op": "chunk", "surprise": 1})
    with pytest.raises(transfer.ProtocolError, match="invalid header"):
        decode_header(bad, 100)
    with pytest.raises(transfer.ProtocolError, match="invalid header"):
        decode_header(msgspec.msgpack.encode({"op": "Not An Op!"}), 100)
    with pytest.raises(transfer.ProtocolError, match="over the"):
        decode_header(msgspec.msgpack.encode({"op": "x", "nbytes": 101}), 100)
    with pytest.raises(transfer.ProtocolError, match="bad magic"):
        decode_prefix(struct.pack("<4sBI", b"HTTP", 1, 5))
    with pytest.raises(transfer.ProtocolError, match="version"):
        decode_prefix(struct.pack("<4sBI", MAGIC, 99, 5))


@pytest.mark.parametrize("size", [1 << 10, 1 << 16, 1 << 20, 64 << 20])
def test_payloads_land_in_the_callers_buffer(echo, size):
    payload = bytearray(os.urandom(size))
    target = bytearray(size)
    with transfer.connect(echo.address) as conn:
        frames = list(conn.stream("echo", key=b"abc", payload=payload, sink=lambda h: target))
    assert len(frames) == 1 and frames[0].payload is target
    assert target == payload
    # TCP hashes every payload by default; UCX's own transports guard theirs, pdrun's hash is opt-in there.
    assert frames[0].header.checksum == (checksum(payload) if echo.address.startswith("tcp") else None)


def test_a_header_of_hundreds_of_kilobytes_travels(echo):
    # over ucx, headers up to 64 KiB share a message with the prefix; longer ones follow it
    keys = [os.urandom(16).hex() for _ in range(8000)]  # a hand-off of 2M tokens names this many chunks
    with transfer.connect(echo.address) as conn:
        (frame,) = conn.stream("echo", key=b"k", meta={"keys": keys}, payload=b"after it")
        assert bytes(frame.payload) == b"after it"
        assert conn.call("sleep", meta={"s": 0, "pad": "x" * 70_000}).meta == {}


def test_ucx_checksums_when_asked_for():
    with (
        transfer.listen("ucx://127.0.0.1:0", Echo(), checksums=True) as listener,
        transfer.connect(listener.address, checksums=True) as conn,
    ):
        (frame,) = conn.stream("echo", payload=b"x" * 5000)
        assert frame.header.checksum == checksum(b"x" * 5000)


@pytest.mark.parametrize("window", [1, 4])
def test_a_windowed_reply_is_received_ahead_into_distinct_buffers(scheme, window):
    """With a window, ucx receives the next frames while the caller handles one (tcp reads one at a
    time); each frame lands whole in its own buffer of the caller's ring, reused in turn."""
    size, count = 1 << 20, 12
    ring = [bytearray(size) for _ in range(window)]
    sinks, ahead = [], []

    def sink(header):
        sinks.append(header.meta["i"])
        return ring[header.meta["i"] % window]

    with transfer.listen(f"{scheme}://127.0.0.1:0", Echo()) as listener, transfer.connect(listener.address) as conn:
        for i, frame in enumerate(
            conn.stream("numbered", meta={"size": size, "count": count}, sink=sink, window=window)
        ):
            assert frame.header.meta["i"] == i
            assert frame.payload is ring[i % window] and frame.payload == bytes([i]) * size
            ahead.append(len(sinks) - i)
            time.sleep(0.02)  # the caller handling the frame: later frames arrive meanwhile
    assert sinks == list(range(count))
    assert max(ahead) <= window
    assert max(ahead) >= (min(window, 2) if scheme == "ucx" else 1)  # ucx: frames were received ahead


def test_a_ucx_sender_holds_a_bounded_number_of_payload_bytes_its_peer_has_not_taken(monkeypatch):
    """Payloads made to be sent (a prefiller's joined chunks) are let go of once sent; a sender
    runs ahead of a slow reader by SEND_BYTES_IN_FLIGHT, not by as many frames as it may post."""
    pytest.importorskip("ucxx")
    from pdrun.transfer import ucx

    size, count = 1 << 20, 12
    monkeypatch.setattr(ucx, "SEND_BYTES_IN_FLIGHT", 2 * size)
    alive = []  # at each frame made, how many of those made before are still held

    class Fresh(Service):
        def handle(self, request, payload):
            made = []
            for i in range(count):
                alive.append(sum(r() is not None for r in made))
                buf = np.full(size, i, dtype=np.uint8)
                made.append(weakref.ref(buf))
                yield Frame(Header(op="data", meta={"i": i}), buf)
                del buf
            return {}

    with transfer.listen("ucx://127.0.0.1:0", Fresh()) as listener, transfer.connect(listener.address) as conn:
        for i, frame in enumerate(conn.stream("fresh", window=1)):
            assert frame.payload == bytes([i]) * size
            time.sleep(0.02)  # a slow reader: the sender would otherwise post ahead
    assert max(alive) <= 3  # two in flight, and the one being handed over


def test_many_concurrent_streams(echo):
    sizes = [1 << 10, 300_000, 1 << 20, 5]

    def one(i):
        with transfer.connect(echo.address) as conn:
            for _ in range(5):
                data = os.urandom(sizes[i % len(sizes)] + i)
                (frame,) = conn.stream("echo", payload=data)
                assert bytes(frame.payload) == data
                frames = list(conn.stream("many", meta={"sizes": [i, 2 * i + 1, 10_000]}))
                assert [f.header.meta["i"] for f in frames] == [0, 1, 2]
                assert [f.header.nbytes for f in frames] == [i, 2 * i + 1, 10_000]
        return i

    with ThreadPoolExecutor(32) as pool:
        assert sorted(pool.map(one, range(64))) == list(range(64))


def test_pool_reuses_connections(echo):
    made = []

    def connect(address):
        made.append(address)
        return transfer.connect(address)

    pool = transfer.ConnectionPool(connect)
    for _ in range(10):
        with pool.connection(echo.address) as conn:
            assert conn.call("sleep", meta={"s": 0}).meta == {}
    assert len(made) == 1
    pool.close()


def test_a_service_error_is_raised_and_the_connection_survives(echo):
    with transfer.connect(echo.address) as conn:
        with pytest.raises(transfer.RemoteError, match="no such thing"):
            conn.call("fail")
        assert not conn.broken
        (frame,) = conn.stream("echo", payload=b"still here")
        assert bytes(frame.payload) == b"still here"


def test_an_abandoned_stream_breaks_the_connection_and_the_pool_drops_it(echo):
    pool = transfer.ConnectionPool(transfer.connect)
    with pool.connection(echo.address) as conn:
        stream = conn.stream("many", meta={"sizes": [10, 10, 10]})
        next(stream)
        stream.close()
        assert conn.broken
    with pool.connection(echo.address) as conn2:
        assert conn2 is not conn
        assert conn2.call("sleep", meta={"s": 0}).meta == {}
    pool.close()


def test_streams_abandoned_while_the_listener_still_sends_never_crash_it(echo):
    """The client leaves while the listener is mid-reply: the listener's channel closes from its
    watcher thread as its serving thread posts the next send; posting on the closed endpoint would
    crash UCX's progress thread (the whole process), one abandon in a few dozen."""
    for _ in range(150):
        conn = transfer.connect(echo.address)
        stream = conn.stream("many", meta={"sizes": [1000] * 20})
        next(stream)
        stream.close()
        conn.close()
    with transfer.connect(echo.address) as conn:
        assert conn.call("sleep", meta={"s": 0}).meta == {}


def test_connect_refused_is_a_clear_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(transfer.PeerClosed, match="cannot connect"):
        transfer.connect(f"tcp://127.0.0.1:{port}")


class RawPeer:
    """A listening socket whose single connection is driven by the test: a misbehaving peer."""

    def __init__(self, behave):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(behave,), daemon=True)
        self.thread.start()

    def _run(self, behave):
        conn, _ = self.sock.accept()
        try:
            conn.recv(65536)  # the request
            behave(conn)
            self.done.wait(10)
        finally:
            conn.close()

    def close(self):
        self.done.set()
        self.thread.join(5)
        self.sock.close()


def frame_bytes(header, payload=b""):
    return encode_header(header) + payload


@pytest.mark.parametrize(
    ("behave", "error", "match"),
    [
        (lambda c: None, transfer.TransferTimeout, "no answer"),
        (lambda c: c.sendall(b"GET / HTTP/1.1\r\n\r\n"), transfer.ProtocolError, "bad magic"),
        (
            lambda c: c.sendall(frame_bytes(Header(op="data", nbytes=100, more=True), b"x" * 40)),
            transfer.TransferTimeout,
            "no answer",
        ),
        (
            lambda c: (
                c.sendall(frame_bytes(Header(op="data", nbytes=100, more=True), b"x" * 40)),
                c.shutdown(socket.SHUT_WR),
            ),
            transfer.PeerClosed,
            "closed",
        ),
        (
            lambda c: c.sendall(
                frame_bytes(Header(op="data", nbytes=4, checksum=checksum(b"abcd"), more=True), b"abce")
            ),
            transfer.ChecksumError,
            "checksum mismatch",
        ),
        (
            lambda c: c.sendall(struct.pack("<4sBI", MAGIC, VERSION, 5) + b"\xc1\xc1\xc1\xc1\xc1"),
            transfer.ProtocolError,
            "header",
        ),
        (
            lambda c: c.sendall(frame_bytes(Header(op="data", nbytes=1 << 40, more=True))),
            transfer.ProtocolError,
            "over the",
        ),
    ],
    ids=["silent", "garbage", "stalls-mid-frame", "truncated", "bad-checksum", "bad-header", "oversized"],
)
def test_misbehaving_peers_give_a_clear_error_within_the_timeout(behave, error, match):
    peer = RawPeer(behave)
    try:
        conn = transfer.connect(peer.address, io_timeout=1.0, max_payload=1 << 30)
        t0 = time.monotonic()
        with pytest.raises(error, match=match):
            list(conn.stream("get", meta={"keys": []}))
        assert time.monotonic() - t0 < 3.0
        assert conn.broken
        conn.close()
    finally:
        peer.close()


@pytest.mark.parametrize("scheme", ["tcp"])  # raw bytes on a TCP socket
def test_the_listener_survives_garbage_and_keeps_serving(echo):
    host, port = echo.address.removeprefix("tcp://").split(":")
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", struct.pack("<4sBI", MAGIC, VERSION, 1 << 30)):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            reply = b""
            try:
                while chunk := s.recv(1 << 16):  # an error frame, then the listener closes
                    reply += chunk
            except ConnectionResetError:
                pass
            assert reply == b"" or reply.startswith(MAGIC)
    with transfer.connect(echo.address) as conn:
        (frame,) = conn.stream("echo", payload=b"fine")
        assert bytes(frame.payload) == b"fine"


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="scheme"):
        transfer.connect("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        transfer.connect("tcp://nohost")


def test_pool_drops_connections_whose_peer_went_away(scheme):
    service = Echo()
    listener = transfer.listen(f"{scheme}://127.0.0.1:0", service)
    address = listener.address
    pool = transfer.ConnectionPool(transfer.connect)
    with pool.connection(address) as conn:
        conn.call("sleep", meta={"s": 0})
    listener.close()  # the peer restarts on the same port
    time.sleep(0.1)
    with transfer.listen(address, service) as again:
        assert again.address == address
        with pool.connection(address) as conn2:
            assert conn2 is not conn
            assert conn2.call("sleep", meta={"s": 0}).meta == {}
    pool.close()


def test_a_refused_payload_is_drained_and_the_connection_keeps_working(scheme):
    class Picky(Echo):
        def receive_buffer(self, header):
            if header.nbytes > 100:
                raise ValueError("too big for me")
            return bytearray(header.nbytes)

    with transfer.listen(f"{scheme}://127.0.0.1:0", Picky()) as listener, transfer.connect(listener.address) as conn:
        with pytest.raises(transfer.RemoteError, match="too big for me"):
            list(conn.stream("echo", payload=b"x" * 5000))
        (frame,) = conn.stream("echo", payload=b"small")
        assert bytes(frame.payload) == b"small"


def test_a_silent_peer_costs_a_timeout_and_a_dead_one_a_clear_error(scheme):
    with transfer.listen(f"{scheme}://127.0.0.1:0", Echo()) as listener:
        conn = transfer.connect(listener.address, io_timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(transfer.TransferTimeout):
            conn.call("sleep", meta={"s": 3})
        assert time.monotonic() - t0 < 2.5
        conn.close()
        conn = transfer.connect(listener.address, io_timeout=5.0)
        conn.call("sleep", meta={"s": 0})
    with pytest.raises(transfer.TransferError):  # the listener is gone: refused, reset or timed out
        conn.call("sleep", meta={"s": 0})
    conn.close()

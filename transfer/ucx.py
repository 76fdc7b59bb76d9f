"""The UCX backend, on ucxx: the frames of the TCP backend over UCX endpoints; host or CUDA payloads.

ucxx speaks asyncio, the Transport interface is blocking and used from many threads. One event
loop per process, in a daemon thread, owns every UCX endpoint and listener and only moves bytes;
callers hand it one message at a time and wait with the frame's deadline. Headers, checksums and
the Service run in the callers' threads: as over TCP, a listener serves each connection from a
thread of its own, one request at a time.

Connecting: ucx://HOST:PORT is a small TCP socket bound to HOST (ucxx's own listener can only bind
every interface). A client sends it its UCX worker address and a random connection tag; the
listener answers with its worker's address; each side makes an endpoint to the other's worker and
the two directions use tags derived from the connection's. The TCP socket stays open as the
connection's lifeline: when either side closes it, the other stops waiting at once.

A frame is three tagged messages: the wire prefix, the header, and, when it has one, the payload:
straight from the sender's buffer into the receiver's sink buffer, host memory or a CUDA array (UCX
moves device memory with cuda_copy / cuda_ipc or over the network). Host payloads are checksummed
as over TCP; device payloads are not (hashing would copy them to the host).

UCX picks its transports itself (UCX_TLS, UCX_NET_DEVICES narrow them; the tests use
UCX_NET_DEVICES=lo); on a host without GPUs or RDMA that is TCP. ucxx is the maintained successor
of ucx-py: `pip install 'pdrun[ucx]'`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec

from transfer import framed
from transfer.base import Listener, Service, Transport
from transfer.errors import PeerClosed, ProtocolError, Rejected, TransferError, TransferTimeout
from transfer.framed import FramedConnection
from transfer.wire import (
    DEFAULT_MAX_PAYLOAD,
    PREFIX,
    Header,
    Sink,
    as_writable,
    checksum,
    decode_header,
    decode_prefix,
    encode_header,
    verify,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UcxOptions:
    connect_timeout: float = 5.0
    io_timeout: float = 30.0  # per message of a frame
    idle_timeout: float = 600.0  # listener side: a connection quiet this long is closed
    max_payload: int = DEFAULT_MAX_PAYLOAD
    checksums: bool = True  # host payloads: compute on send, verify on receipt


def parse_address(address: str) -> tuple[str, int]:
    parts = urlsplit(address)
    if parts.scheme != "ucx" or not parts.hostname or parts.port is None:
        raise ValueError(f"not a ucx address: {address!r} (expected ucx://HOST:PORT)")
    return parts.hostname, parts.port


def _ucxx() -> Any:
    # ucxx sets UCX variables of its own that this UCX build does not know: no warning per process.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx
    except ImportError as e:
        raise RuntimeError(f"the ucx transport needs ucxx: pip install 'pdrun[ucx]' ({e})") from None
    return ucxx


class _Loop:
    """The process's UCX event loop, in a daemon thread."""

    _instance: _Loop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pdrun-ucx", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _Loop:
        with cls._lock:
            if cls._instance is None:
                _ucxx()  # fail here, clearly, if ucxx is missing
                cls._instance = _Loop()
            return cls._instance

    def submit(self, coro: Coroutine[Any, Any, Any], timeout: float | None) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(_cancellable(coro, timeout), self.loop)

    def wait(self, future: concurrent.futures.Future[Any], timeout: float | None, what: str) -> Any:
        """The result of a submitted coroutine; a timeout, a cancel or a UCX error is a TransferError."""
        try:
            return future.result()
        except TimeoutError:  # asyncio's and concurrent.futures' are this one since Python 3.11
            raise TransferTimeout(f"{what}: no progress within {timeout:.1f}s") from None
        except concurrent.futures.CancelledError:
            raise PeerClosed(f"{what}: the connection was closed") from None
        except TransferError:
            raise
        except Exception as e:  # ucxx's UCXError family and friends: the endpoint is gone
            raise PeerClosed(f"{what}: {type(e).__name__}: {e}") from None

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None, what: str) -> Any:
        return self.wait(self.submit(coro, timeout), timeout, what)


async def _cancellable(coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
    """`coro` with a deadline; cancelled, it ends cancelled even when ucxx reports its own error for
    the cancelled request (else asyncio would log that error as never retrieved)."""
    try:
        return await (asyncio.wait_for(coro, timeout) if timeout is not None else coro)
    except Exception:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        raise


def _readable(payload: Any) -> tuple[Any, int, bool]:
    """(what ucxx sends, nbytes, on a GPU)."""
    if payload is None:
        return None, 0, False
    if hasattr(payload, "__cuda_array_interface__"):
        return payload, int(payload.nbytes), True
    view = memoryview(payload).cast("B")
    return view, view.nbytes, False


def _writable(buf: Any, nbytes: int) -> tuple[Any, bool]:
    if hasattr(buf, "__cuda_array_interface__"):
        if int(buf.nbytes) != nbytes:
            raise ProtocolError(f"receive buffer has {int(buf.nbytes)} bytes, the frame carries {nbytes}")
        return buf, True
    return as_writable(buf, nbytes), False


# The handshake on the connection's TCP socket: magic, version, then
#   client -> listener: the connection tag (u64, even) and the client worker's UCX address
#   listener -> client: the listener worker's UCX address
_HELLO = struct.Struct("<4sBQI")
_HELLO_MAGIC = b"PDRU"


def _send_hello(sock: socket.socket, tag: int, address: bytes) -> None:
    sock.sendall(_HELLO.pack(_HELLO_MAGIC, 1, tag, len(address)) + address)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            raise PeerClosed("the peer closed the connection during the handshake")
        data += got
    return bytes(data)


def _recv_hello(sock: socket.socket) -> tuple[int, bytes]:
    magic, version, tag, length = _HELLO.unpack(_recv_exact(sock, _HELLO.size))
    if magic != _HELLO_MAGIC or version != 1 or length > 1 << 16:
        raise ProtocolError(f"bad ucx handshake {magic!r} v{version}: the peer is not a pdrun ucx endpoint")
    return tag, _recv_exact(sock, length)


async def _worker_address() -> bytes:
    return bytes(_ucxx().get_worker_address().tobytes())


async def _endpoint_to(address: bytes) -> Any:
    ucxx = _ucxx()
    # No UCX peer-failure handling: it rules out the shared-memory transports (host payloads then
    # went over tcp/lo on one GPU host, 1.2 GB/s, and every small message with them); the TCP
    # lifeline already tells each side when the other is gone.
    return await ucxx.create_endpoint_from_worker_address(
        ucxx.get_ucx_address_from_buffer(address), endpoint_error_handling=False
    )


class _Channel:
    """Frames over one UCX endpoint and its tag pair, driven from a caller's thread; `close()` from
    any thread stops a wait in progress."""

    def __init__(
        self,
        ep: Any,
        loop: _Loop,
        options: UcxOptions,
        peer: str,
        send_tag: int,
        recv_tag: int,
        lifeline: socket.socket,
    ):
        self.ep = ep
        self.loop = loop
        self.options = options
        self.peer = peer
        self.send_tag = send_tag
        self.recv_tag = recv_tag
        self.lifeline = lifeline
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[Any] | None = None
        self.closed = False
        threading.Thread(target=self._watch, name="pdrun-ucx-lifeline", daemon=True).start()

    def _watch(self) -> None:
        """The TCP socket carries nothing after the handshake: its end is the connection's end."""
        with contextlib.suppress(OSError):
            self.lifeline.settimeout(None)
            self.lifeline.recv(1)
        self.close()

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        timeout = self.options.io_timeout if timeout is None else timeout
        with self._lock:
            if self.closed:
                coro.close()
                raise PeerClosed(f"{self.peer}: the connection is closed")
            future = self._pending = self.loop.submit(coro, timeout)
        try:
            return self.loop.wait(future, timeout, self.peer)
        finally:
            self._pending = None

    def _send(self, buf: Any) -> None:
        self._run(self.ep.send(buf, tag=self.send_tag, force_tag=True))

    def _recv(self, buf: Any, timeout: float | None = None) -> None:
        self._run(self.ep.recv(buf, tag=self.recv_tag, force_tag=True), timeout)

    def read(
        self, sink: Sink | None, first_timeout: float | None = None, drain_rejected: bool = False
    ) -> tuple[Header, Any]:
        prefix = bytearray(PREFIX.size)
        self._recv(prefix, first_timeout)
        body = bytearray(decode_prefix(bytes(prefix)))
        self._recv(body)
        header = decode_header(bytes(body), self.options.max_payload)
        payload = None
        if header.nbytes:
            try:
                payload = sink(header) if sink is not None else bytearray(header.nbytes)
                buf, on_device = _writable(payload, header.nbytes)
            except Exception as e:
                if drain_rejected:  # keep the tags in step: take the payload and drop it
                    self._recv(bytearray(header.nbytes))
                raise Rejected(str(e)) from e
            self._recv(buf)
            if not on_device:
                verify(header, buf, self.options.checksums)
        return header, payload

    def write(self, header: Header, payload: Any = None) -> None:
        buf, nbytes, on_device = _readable(payload)
        hashed = self.options.checksums and not on_device
        if header.nbytes != nbytes or (nbytes and header.checksum is None and hashed):
            digest = checksum(buf) if nbytes and hashed else None
            header = msgspec.structs.replace(header, nbytes=nbytes, checksum=digest)
        head = encode_header(header)
        self._send(head[: PREFIX.size])
        self._send(head[PREFIX.size :])
        if nbytes:
            self._send(buf)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            pending = self._pending
        if pending is not None:
            pending.cancel()
        with contextlib.suppress(OSError):
            self.lifeline.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.lifeline.close()
        with contextlib.suppress(Exception):
            self.loop.loop.call_soon_threadsafe(self.ep.abort)


class UcxConnection(FramedConnection):
    def __init__(self, address: str, options: UcxOptions):
        self.address = address
        host, port = parse_address(address)
        loop = _Loop.get()
        mine = loop.run(_worker_address(), options.connect_timeout, "ucx worker address")
        tag = secrets.randbits(62) << 1  # unique per connection: the two directions are tag and tag + 1
        try:
            sock = socket.create_connection((host, port), timeout=options.connect_timeout)
        except TimeoutError:
            raise TransferTimeout(f"connect to {address} timed out after {options.connect_timeout:.1f}s") from None
        except OSError as e:
            raise PeerClosed(f"cannot connect to {address}: {e}") from None
        try:
            _send_hello(sock, tag, mine)
            _, theirs = _recv_hello(sock)
            ep = loop.run(_endpoint_to(theirs), options.connect_timeout, f"connect to {address}")
        except (OSError, TransferError) as e:
            sock.close()
            if isinstance(e, TransferError):
                raise
            raise PeerClosed(f"handshake with {address} failed: {e}") from None
        self.channel = _Channel(ep, loop, options, address, send_tag=tag, recv_tag=tag + 1, lifeline=sock)

    @property
    def broken(self) -> bool:
        return self._broken or self.channel.closed

    def stale(self) -> bool:
        return self.channel.closed

    def close(self) -> None:
        self._broken = True
        self.channel.close()


class UcxListener(Listener):
    def __init__(self, address: str, service: Service, options: UcxOptions):
        host, port = parse_address(address)
        self._loop = _Loop.get()
        self._service = service
        self._options = options
        self._worker = self._loop.run(_worker_address(), options.connect_timeout, "ucx worker address")
        self._sock = socket.create_server((host, port), backlog=256)
        self.address = f"ucx://{host}:{self._sock.getsockname()[1]}"
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._channels: set[_Channel] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="pdrun-ucx-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.01)
                continue
            threading.Thread(target=self._connect_and_serve, args=(conn,), name="pdrun-ucx-conn", daemon=True).start()

    def _connect_and_serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self._options.connect_timeout)
            tag, theirs = _recv_hello(conn)
            ep = self._loop.run(_endpoint_to(theirs), self._options.connect_timeout, f"{self.address} accept")
            _send_hello(conn, 0, self._worker)
        except (OSError, TransferError) as e:
            log.warning("%s: refusing a connection: %s", self.address, e)
            conn.close()
            return
        ch = _Channel(ep, self._loop, self._options, self.address, send_tag=tag + 1, recv_tag=tag, lifeline=conn)
        with self._lock:
            if self._closed.is_set():
                ch.close()
                return
            self._channels.add(ch)
        self._serve(ch)

    def _serve(self, ch: _Channel) -> None:
        try:
            framed.serve(ch, self._service, self.address, self._options.idle_timeout, self._closed)
        finally:
            with self._lock:
                self._channels.discard(ch)
            ch.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            channels = list(self._channels)
        for ch in channels:
            ch.close()
        self._thread.join(timeout=2)


class UcxTransport(Transport):
    scheme = "ucx"

    def __init__(self, options: UcxOptions | None = None):
        self.options = options or UcxOptions()

    def listen(self, address: str, service: Service) -> UcxListener:
        return UcxListener(address, service, self.options)

    def connect(self, address: str) -> UcxConnection:
        return UcxConnection(address, self.options)

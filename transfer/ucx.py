"""The UCX backend, on ucxx: the frames of the TCP backend over UCX endpoints; host or CUDA payloads.

One UCX worker per process, progressed by ucxx's own thread (beside a GPU it polls; elsewhere it
blocks on the worker's events and every submitted request wakes it: see `_polling`). Callers post
sends and receives from their own threads and poll the requests for completion, spinning a moment
before backing off to sleeps of at most a millisecond: no event loop between a caller and UCX
(through ucxx's asyncio API each message costs milliseconds of thread hops). As over TCP, a listener
serves each connection from a thread of its own, one request at a time.

Connecting: ucx://HOST:PORT is a small TCP socket bound to HOST (ucxx's own listener can only bind
every interface). A client sends it its UCX worker address and a random connection tag; the
listener answers with its worker's address; each side makes an endpoint to the other's worker and
the two directions use tags derived from the connection's. The TCP socket stays open as the
connection's lifeline and doorbell: the client writes a byte on it with every request, so that an
idle listener thread sleeps on the socket rather than polling UCX, and when either side closes it,
the other stops waiting at once.

A frame is one tagged message holding the wire prefix and the header (two when the header is over
`SMALL_MESSAGE` bytes), then, when it has one, the payload: straight from the sender's buffer into
the receiver's sink buffer, host memory or a CUDA array (UCX moves device memory with cuda_copy /
cuda_ipc or over the network). Sends are not waited for one by one; a reply's frames stream back
with up to `window` payloads in flight at once (`Connection.stream`), so that moving one chunk
overlaps with the caller placing the previous one. Checksums, when on, cover host payloads only
(hashing device memory would copy it to the host); they are off by default here: UCX's shared
memory, cma, cuda_ipc and RDMA transports have integrity of their own, and hashing both ends halves
what a host-staged hand-off moves.

UCX picks its transports itself (UCX_TLS, UCX_NET_DEVICES narrow them; the tests use
UCX_NET_DEVICES=lo); on a host without GPUs or RDMA that is shared memory and TCP. ucxx is the
maintained successor of ucx-py: `pip install 'pdrun[ucx]'`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec

from pdrun.transfer import framed
from pdrun.transfer.base import Service, Transport
from pdrun.transfer.errors import PeerClosed, ProtocolError, Rejected, TransferError, TransferTimeout
from pdrun.transfer.framed import FramedConnection, auth_token_from_env
from pdrun.transfer.wire import (
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

SMALL_MESSAGE = 64 << 10  # a frame's prefix and header travel as one message up to this size
SENDS_IN_FLIGHT = 16  # messages a sender posts before waiting for the oldest
SEND_BYTES_IN_FLIGHT = 1 << 29  # ... and bytes: a payload may be a copy made to be sent (frames of joined chunks)


@dataclass(frozen=True)
class UcxOptions:
    connect_timeout: float = 5.0
    io_timeout: float = 30.0  # per message of a frame
    idle_timeout: float = 600.0  # listener side: a connection quiet this long is closed
    max_payload: int = DEFAULT_MAX_PAYLOAD
    # The deployment's shared secret (default $PDRUN_AUTH_TOKEN): listeners need it, connections give it.
    auth_token: str | None = field(default_factory=auth_token_from_env)
    checksums: bool = False  # host payloads: compute on send, verify on receipt


def parse_address(address: str) -> tuple[str, int]:
    parts = urlsplit(address)
    if parts.scheme != "ucx" or not parts.hostname or parts.port is None:
        raise ValueError(f"not a ucx address: {address!r} (expected ucx://HOST:PORT)")
    return parts.hostname, parts.port


def _libucxx() -> Any:
    # ucxx sets UCX variables of its own that this UCX build does not know: no warning per process.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        from ucxx._lib import libucxx
    except ImportError as e:
        raise RuntimeError(f"the ucx transport needs ucxx: pip install 'pdrun[ucx]' ({e})") from None
    return libucxx


def _array(buf: Any) -> Any:
    from ucxx._lib.arr import Array

    return Array(buf)


def _cuda_device() -> int | None:
    """The GPU this process's CUDA work runs on, if torch has one: UCX's progress thread moves
    device memory and needs that device's context current."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return int(torch.cuda.current_device())


# How long a caller spins on a request before it backs off to sleeps (PDRUN_UCX_SPIN_US, microseconds).
_SPIN_S = float(os.environ.get("PDRUN_UCX_SPIN_US", "200")) * 1e-6


def _make_cuda_current(device: int) -> None:
    sys.modules["torch"].cuda.set_device(device)


def _polling(cuda_device: int | None) -> bool:
    """How UCX's progress thread waits: polling (a core busy, completions seen at once; the default
    beside a GPU, where cuda_ipc / cuda_copy completions are CUDA events no file descriptor
    announces) or blocking on the worker's events (the default elsewhere: CPU-only hosts share their
    cores with the engines). PDRUN_UCX_PROGRESS=polling|blocking overrides."""
    mode = os.environ.get("PDRUN_UCX_PROGRESS", "auto")
    if mode not in ("auto", "polling", "blocking"):
        raise ValueError(f"PDRUN_UCX_PROGRESS={mode!r}: expected auto, polling or blocking")
    return mode == "polling" or (mode == "auto" and cuda_device is not None)


class _Worker:
    """The process's UCX worker and its progress thread."""

    _instance: _Worker | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        ucx = _libucxx()
        self.context = ucx.UCXContext()
        # Delayed submission: requests posted from any thread are handed to the progress thread.
        self.worker = ucx.UCXWorker(self.context, enable_delayed_submission=True, enable_python_future=False)
        device = _cuda_device()
        if device is not None:
            self.worker.set_progress_thread_start_callback(_make_cuda_current, cb_args=(device,))
        self.polling = _polling(device)
        self.worker.start_progress_thread(polling_mode=self.polling, epoll_timeout=100)
        self.address = bytes(self.worker.address.tobytes())
        atexit.register(self.worker.stop_progress_thread)

    @classmethod
    def get(cls) -> _Worker:
        with cls._lock:
            if cls._instance is None:
                cls._instance = _Worker()
            return cls._instance

    def endpoint_to(self, address: bytes) -> Any:
        ucx = _libucxx()
        # No UCX peer-failure handling: it rules out the shared-memory transports, and host payloads
        # and every small message would go over TCP instead, several times slower; the TCP lifeline
        # already tells each side when the other is gone.
        return ucx.UCXEndpoint.create_from_worker_address(
            self.worker, ucx.UCXAddress.create_from_buffer(address), False
        )


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
# and after it, client -> listener: one doorbell byte per request.
_HELLO = struct.Struct("<4sBQI")
_HELLO_MAGIC = b"PDRU"
_HELLO_VERSION = 2


def _send_hello(sock: socket.socket, tag: int, address: bytes) -> None:
    sock.sendall(_HELLO.pack(_HELLO_MAGIC, _HELLO_VERSION, tag, len(address)) + address)


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
    if magic != _HELLO_MAGIC or version != _HELLO_VERSION or length > 1 << 16:
        raise ProtocolError(f"bad ucx handshake {magic!r} v{version}: the peer is not a pdrun ucx endpoint")
    return tag, _recv_exact(sock, length)


@dataclass(eq=False)  # compared by identity: `_posted.remove` must find this very request
class _Pending:
    """A posted UCX request and what must stay alive until it completes."""

    request: Any
    keep: Any
    nbytes: int = 0  # a send's payload


@dataclass
class _Arriving:
    """A reply frame whose payload is still being received."""

    header: Header
    payload: Any
    buf: Any
    on_device: bool
    recv: _Pending


class _Channel:
    """Frames over one UCX endpoint and its tag pair. Used by one thread at a time; `close()` from any
    thread (the lifeline's watcher, a listener closing) stops a wait in progress."""

    def __init__(
        self,
        ep: Any,
        options: UcxOptions,
        peer: str,
        send_tag: int,
        recv_tag: int,
        lifeline: socket.socket,
        rings: bool,
    ):
        ucx = _libucxx()
        self.ep = ep
        self.options = options
        self.peer = peer
        self._send_tag = ucx.UCXXTag(send_tag)
        self._recv_tag = ucx.UCXXTag(recv_tag)
        self.lifeline = lifeline
        self._rings = rings  # client side: ring the doorbell with every request
        self._doorbell = threading.Semaphore(0)
        self._head = bytearray(SMALL_MESSAGE)
        self._sends: deque[_Pending] = deque()
        self._send_bytes = 0  # of the sends not yet settled
        self._posted: list[_Pending] = []  # receives not yet known complete: settled on failure
        self._closing = threading.Lock()  # a request is never posted on an endpoint being closed
        self.closed = False
        threading.Thread(target=self._watch, name="pdrun-ucx-lifeline", daemon=True).start()

    def _watch(self) -> None:
        """Doorbell bytes wake an idle listener thread; the socket's end is the connection's end."""
        with contextlib.suppress(OSError):
            self.lifeline.settimeout(None)
            while rung := len(self.lifeline.recv(4096)):
                for _ in range(rung):
                    self._doorbell.release()
        self.close()

    # -- requests and waiting --
    def _post_send(self, buf: Any, keep: Any = None) -> None:
        arr = _array(buf)
        self._sends.append(_Pending(self._posting(self.ep.tag_send, arr, self._send_tag), (arr, keep), arr.nbytes))
        self._send_bytes += arr.nbytes

    def _post_recv(self, buf: Any) -> _Pending:
        arr = _array(buf)
        pending = _Pending(self._posting(self.ep.tag_recv, arr, self._recv_tag), arr)
        self._posted.append(pending)
        return pending

    def _posting(self, post: Callable[..., Any], arr: Any, tag: Any) -> Any:
        """A request posted; on an endpoint closed meanwhile (the peer left) ucxx raises its own error.
        Posting on an endpoint that `close()` has let go of would crash UCX's progress thread."""
        with self._closing:
            if self.closed:
                raise PeerClosed(f"{self.peer}: the connection was closed")
            try:
                return post(arr, tag)
            except Exception as e:
                raise PeerClosed(f"{self.peer}: {type(e).__name__}: {e}") from None

    def _wait(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Until `done()`, the channel closes or nothing completes for `timeout` (io_timeout) seconds."""
        timeout = self.options.io_timeout if timeout is None else timeout
        start = time.monotonic()
        pause = 0.0
        while not done():
            if self.closed:
                raise PeerClosed(f"{self.peer}: the connection was closed")
            now = time.monotonic()
            if now - start > timeout:
                raise TransferTimeout(f"{self.peer}: no progress within {timeout:.1f}s")
            if now - start > _SPIN_S:  # a message takes microseconds to milliseconds: spin, then back off
                time.sleep(pause)
                pause = min(pause * 2 or 5e-5, 1e-3)

    def _finish(self, pending: _Pending, timeout: float | None = None) -> None:
        self._wait(lambda: pending.request.completed, timeout)
        self._check(pending)

    def _check(self, pending: _Pending) -> None:
        with contextlib.suppress(ValueError):
            self._posted.remove(pending)
        try:
            pending.request.check_error()
        except Exception as e:  # ucxx's UCXError family: the endpoint is gone or was closed
            raise PeerClosed(f"{self.peer}: {type(e).__name__}: {e}") from None

    def _reap_sends(self, keep: int) -> None:
        """Settle sends from the oldest on: those done, then until `keep` messages are left, and
        (the last one apart) no more than SEND_BYTES_IN_FLIGHT bytes."""
        while self._sends and (
            len(self._sends) > keep
            or (len(self._sends) > 1 and self._send_bytes > SEND_BYTES_IN_FLIGHT)
            or self._sends[0].request.completed
        ):
            sent = self._sends.popleft()
            self._send_bytes -= sent.nbytes
            self._finish(sent)

    # -- frames --
    def write(self, header: Header, payload: Any = None) -> None:
        try:
            buf, nbytes, on_device = _readable(payload)
            hashed = self.options.checksums and not on_device
            if header.nbytes != nbytes or (nbytes and header.checksum is None and hashed):
                digest = checksum(buf) if nbytes and hashed else None
                header = msgspec.structs.replace(header, nbytes=nbytes, checksum=digest)
            head = encode_header(header)
            if len(head) <= SMALL_MESSAGE:
                self._post_send(head)
            else:
                self._post_send(head[: PREFIX.size])
                self._post_send(head[PREFIX.size :])
            if nbytes:
                self._post_send(buf, keep=payload)
            if self._rings:
                self.lifeline.sendall(b"\x01")
            self._reap_sends(SENDS_IN_FLIGHT)
        except OSError as e:
            self._fail()
            raise PeerClosed(f"{self.peer}: connection lost while sending: {e}") from None
        except BaseException:
            self._fail()
            raise

    def _read_header(self) -> Header:
        self._finish(self._post_recv(self._head))
        return self._header_from_head()

    def _arrived(self, frame: _Arriving) -> tuple[Header, Any]:
        self._finish(frame.recv)
        self._verify(frame.header, frame.buf, frame.on_device)
        return frame.header, frame.payload

    def _header_from_head(self) -> Header:
        """The header whose first message just landed in `_head` (its body follows when it is long)."""
        length = decode_prefix(bytes(self._head[: PREFIX.size]))
        if PREFIX.size + length <= SMALL_MESSAGE:
            return decode_header(bytes(self._head[PREFIX.size : PREFIX.size + length]), self.options.max_payload)
        body = bytearray(length)
        self._finish(self._post_recv(body))
        return decode_header(bytes(body), self.options.max_payload)

    def _sink(self, sink: Sink | None, header: Header, drain_rejected: bool) -> tuple[Any, Any, bool]:
        try:
            payload = sink(header) if sink is not None else bytearray(header.nbytes)
            buf, on_device = _writable(payload, header.nbytes)
        except Exception as e:
            if drain_rejected:  # keep the tags in step: take the payload and drop it
                self._finish(self._post_recv(bytearray(header.nbytes)))
            raise Rejected(str(e)) from e
        return payload, buf, on_device

    def _verify(self, header: Header, buf: Any, on_device: bool) -> None:
        if not on_device:
            verify(header, buf, self.options.checksums)

    def read(
        self, sink: Sink | None, first_timeout: float | None = None, drain_rejected: bool = False
    ) -> tuple[Header, Any]:
        try:
            if first_timeout is not None:  # a listener waiting for the next request sleeps on the doorbell
                if not self._doorbell.acquire(timeout=first_timeout):
                    raise TransferTimeout(f"{self.peer}: no request within {first_timeout:.1f}s")
                if self.closed:
                    raise PeerClosed(f"{self.peer}: the connection was closed")
            header = self._read_header()
            if not header.nbytes:
                return header, None
            payload, buf, on_device = self._sink(sink, header, drain_rejected)
            self._finish(self._post_recv(buf))
            self._verify(header, buf, on_device)
            return header, payload
        except Rejected:
            raise
        except BaseException:
            self._fail()
            raise

    def replies(self, sink: Sink | None, window: int) -> Iterator[tuple[Header, Any]]:
        """A reply's frames in order, the last one (more=False) included, with up to `window` payloads
        being received while the caller handles earlier frames. Receives are posted in the order
        the frames were sent, which is how UCX matches them to the messages of one tag."""
        arriving: deque[_Arriving] = deque()
        head: _Pending | None = self._post_recv(self._head)
        try:
            while head is not None or arriving:
                if head is not None and len(arriving) < window and head.request.completed:
                    self._check(head)
                    header = self._header_from_head()
                    if header.nbytes:  # its receive goes before the next header's: UCX matches in order
                        payload, buf, on_device = self._sink(sink, header, drain_rejected=False)
                        arriving.append(_Arriving(header, payload, buf, on_device, self._post_recv(buf)))
                    head = self._post_recv(self._head) if header.more else None
                    if header.nbytes:
                        continue
                    while arriving:  # nothing to receive: the frames before it go first
                        yield self._arrived(arriving.popleft())
                    yield header, None
                    continue
                oldest = arriving[0] if arriving else None
                if oldest is not None and (head is None or len(arriving) >= window or oldest.recv.request.completed):
                    if head is not None and len(arriving) < window and _settles(head.request):
                        continue  # a header already here: post its receive before handing out this frame
                    yield self._arrived(arriving.popleft())
                    continue
                assert head is not None
                watch = [head.request] + ([oldest.recv.request] if oldest is not None else [])
                self._wait(lambda reqs=watch: any(r.completed for r in reqs))  # type: ignore[misc]
            self._reap_sends(0)
        except BaseException:
            self._fail()
            raise

    # -- ending --
    def _fail(self) -> None:
        """A frame failed part way: close the endpoint, then wait (briefly) until UCX has let go of
        every buffer it was given, so that none is written or read after its owner frees it."""
        self.close()
        pending = self._posted + list(self._sends)
        deadline = time.monotonic() + 2.0
        while any(not p.request.completed for p in pending) and time.monotonic() < deadline:
            time.sleep(1e-3)
        left = [p for p in pending if not p.request.completed]
        if left:  # never free what UCX may still touch
            log.warning("%s: %d UCX requests outlived their connection; keeping their buffers", self.peer, len(left))
            _ORPHANS.extend(left)
        self._posted.clear()
        self._sends.clear()
        self._send_bytes = 0

    def close(self) -> None:
        with self._closing:
            if self.closed:
                return
            self.closed = True
        self._doorbell.release()
        with contextlib.suppress(OSError):
            self.lifeline.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.lifeline.close()
        with contextlib.suppress(Exception):
            self.ep.close_blocking()  # cancels the receives this endpoint posted (close() leaves them)


_ORPHANS: list[_Pending] = []


def _settles(request: Any, spin_s: float = 2e-4) -> bool:
    """Whether a request just posted completes within `spin_s`: the progress thread takes a moment
    to match a receive with a message that is already here."""
    deadline = time.perf_counter() + spin_s
    while not request.completed:
        if time.perf_counter() > deadline:
            return False
    return True


class UcxConnection(FramedConnection):
    def __init__(self, address: str, options: UcxOptions):
        self.address = address
        host, port = parse_address(address)
        worker = _Worker.get()
        tag = secrets.randbits(62) << 1  # unique per connection: the two directions are tag and tag + 1
        try:
            sock = socket.create_connection((host, port), timeout=options.connect_timeout)
        except TimeoutError:
            raise TransferTimeout(f"connect to {address} timed out after {options.connect_timeout:.1f}s") from None
        except OSError as e:
            raise PeerClosed(f"cannot connect to {address}: {e}") from None
        try:
            _send_hello(sock, tag, worker.address)
            _, theirs = _recv_hello(sock)
            ep = worker.endpoint_to(theirs)
        except (OSError, TransferError) as e:
            sock.close()
            if isinstance(e, TransferError):
                raise
            raise PeerClosed(f"handshake with {address} failed: {e}") from None
        except Exception as e:  # ucxx could not reach the peer's worker
            sock.close()
            raise PeerClosed(f"connect to {address}: {type(e).__name__}: {e}") from None
        self.channel = _Channel(ep, options, address, send_tag=tag, recv_tag=tag + 1, lifeline=sock, rings=True)
        self.authenticate(options.auth_token)

    @property
    def broken(self) -> bool:
        return self._broken or self.channel.closed

    def stale(self) -> bool:
        return self.channel.closed

    def close(self) -> None:
        self._broken = True
        self.channel.close()


class UcxListener(framed.SocketListener["_Channel"]):
    """Its socket takes the peers' handshakes (their UCX worker addresses); frames go over UCX."""

    def __init__(self, address: str, service: Service, options: UcxOptions):
        host, port = parse_address(address)
        self._worker = _Worker.get()
        super().__init__("ucx", host, port, service, options)

    def accepted(self, sock: socket.socket) -> None:
        threading.Thread(target=self._connect_and_serve, args=(sock,), name="pdrun-ucx-conn", daemon=True).start()

    def _connect_and_serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self._options.connect_timeout)
            tag, theirs = _recv_hello(conn)
            ep = self._worker.endpoint_to(theirs)
            _send_hello(conn, 0, self._worker.address)
        except Exception as e:  # OSError, a bad handshake, or ucxx refusing the peer's address
            log.warning("%s: refusing a connection: %s", self.address, e)
            conn.close()
            return
        ch = _Channel(ep, self._options, self.address, send_tag=tag + 1, recv_tag=tag, lifeline=conn, rings=False)
        if not self._admit(ch):
            ch.close()
            return
        self._serve(ch, ch)

    def release(self, conn: _Channel) -> None:
        conn.close()


class UcxTransport(Transport):
    scheme = "ucx"

    def __init__(self, options: UcxOptions | None = None):
        self.options = options or UcxOptions()

    def listen(self, address: str, service: Service) -> UcxListener:
        return UcxListener(address, service, self.options)

    def connect(self, address: str) -> UcxConnection:
        return UcxConnection(address, self.options)

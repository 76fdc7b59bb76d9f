"""Request and reply over any channel that reads and writes whole frames: what the tcp and ucx
backends share. A backend supplies the channel (how a frame's bytes move); this module says what a
request and its reply are, on the caller's side and on the listener's."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from pdrun.transfer.base import Connection, Frame, Listener, Reply, Service
from pdrun.transfer.errors import PeerClosed, ProtocolError, Rejected, RemoteError, TransferError, Unauthorized
from pdrun.transfer.wire import Header, Sink

log = logging.getLogger(__name__)

HELLO = "hello"  # a connection's first request where its listener needs the auth token
AUTH_TOKEN_ENV = "PDRUN_AUTH_TOKEN"
REFUSED_LINGER_S = 1.0  # a refused connection stays open this long at most, for its error to arrive


def auth_token_from_env() -> str | None:
    return os.environ.get(AUTH_TOKEN_ENV) or None


class Channel(Protocol):
    def read(
        self, sink: Sink | None, first_timeout: float | None = None, drain_rejected: bool = False
    ) -> tuple[Header, Any]:
        """One frame; a payload the sink refuses raises `Rejected` (read and dropped first with
        `drain_rejected`, so that the channel stays in step)."""

    def write(self, header: Header, payload: Any = None) -> None: ...

    def replies(self, sink: Sink | None, window: int) -> Iterator[tuple[Header, Any]]:
        """A reply's frames, the final one included; up to `window` of them may be being received
        (their sink buffers handed out) while the caller handles an earlier one."""


def one_by_one(channel: Channel, sink: Sink | None) -> Iterator[tuple[Header, Any]]:
    """`Channel.replies` for a channel that reads one frame at a time."""
    while True:
        header, data = channel.read(sink)
        yield header, data
        if not header.more:
            return


class FramedConnection(Connection):
    """A connection whose requests and replies are frames on one channel."""

    channel: Channel
    _broken: bool = False

    @property
    def broken(self) -> bool:
        return self._broken

    def authenticate(self, token: str | None) -> None:
        """Give the listener the deployment's auth token, first thing on the connection (none: nothing sent)."""
        if token is None:
            return
        try:
            self.call(HELLO, meta={"token": token})
        except RemoteError as e:
            self.close()
            raise Unauthorized(str(e)) from None
        except PeerClosed as e:  # refused, the answer lost as the listener closed (ucx may drop it)
            self.close()
            raise Unauthorized(f"{self.address} closed the connection when given the auth token: {e}") from None

    def stream(
        self,
        op: str,
        *,
        key: bytes = b"",
        meta: dict[str, Any] | None = None,
        payload: Any = None,
        sink: Sink | None = None,
        window: int = 1,
    ) -> Iterator[Frame]:
        if self.broken:
            raise PeerClosed(f"connection to {self.address} is broken")
        self._broken = True  # until the whole reply has been read
        self.channel.write(Header(op=op, key=key, meta=meta or {}), payload)
        final = None
        with contextlib.closing(self.channel.replies(sink, max(1, window))) as replies:
            for header, data in replies:  # to the end: a channel may have work left after the last frame
                if header.more:
                    yield Frame(header, data)
                else:
                    final = header
        if final is None:
            raise ProtocolError("the reply ended without a final frame")
        self._broken = False
        if final.op == "error":
            raise RemoteError(f"{self.address}: {final.meta.get('message', 'unspecified error')}")
        if final.op != "ok":
            self._broken = True
            raise ProtocolError(f"reply ended with {final.op!r}, expected 'ok' or 'error'")
        return dict(final.meta)


def serve(
    channel: Channel,
    service: Service,
    name: str,
    idle_timeout: float,
    closed: threading.Event,
    auth_token: str | None = None,
) -> None:
    """Answer requests on `channel` until the peer leaves, the channel fails or `closed` is set.
    With `auth_token`, the first frame must give it (`FramedConnection.authenticate`), else the
    connection is answered an error and closed before any request reaches the service."""
    try:
        if auth_token is not None and not _admitted(channel, name, idle_timeout, auth_token):
            return
        while not closed.is_set():
            try:
                header, payload = channel.read(service.receive_buffer, first_timeout=idle_timeout, drain_rejected=True)
            except PeerClosed:
                return
            except Rejected as e:  # the channel is still in step: say why and carry on
                channel.write(Header(op="error", meta={"message": str(e)}))
                continue
            except TransferError as e:
                log.warning("%s: dropping a connection: %s", name, e)
                with contextlib.suppress(TransferError):
                    channel.write(Header(op="error", meta={"message": f"{type(e).__name__}: {e}"}))
                return
            if header.op == HELLO:  # a token this listener does not ask for
                channel.write(Header(op="ok"))
                continue
            _reply(channel, service, name, header, payload)
    except TransferError as e:
        log.debug("%s: connection ended while replying: %s", name, e)


def _admitted(channel: Channel, name: str, idle_timeout: float, token: str) -> bool:
    try:
        header, _ = channel.read(_no_payload, first_timeout=idle_timeout)
        given = header.meta.get("token") if header.op == HELLO else None
    except Rejected:
        given = None
    except PeerClosed:
        return False
    if isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode()):
        channel.write(Header(op="ok"))
        return True
    why = "a wrong auth token" if given is not None else "no auth token"
    log.warning("%s: refused a connection that gave %s", name, why)
    with contextlib.suppress(TransferError):
        channel.write(Header(op="error", meta={"message": f"unauthorized: {why}; this port needs the deployment's "
                                               f"auth token ({AUTH_TOKEN_ENV} or --auth-token)"}))  # fmt: skip
        channel.read(_no_payload, first_timeout=REFUSED_LINGER_S)  # until the peer has read it and closed
    return False


def _no_payload(header: Header) -> Any:
    raise ProtocolError("the first frame of a connection carries no payload")


def _reply(channel: Channel, service: Service, name: str, header: Header, payload: Any) -> None:
    try:
        gen = service.handle(header, payload)
        while True:
            try:
                frame = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            channel.write(msgspec.structs.replace(frame.header, more=True), frame.payload)
    except TransferError:
        raise  # the connection itself failed: nothing more can be sent
    except Exception as e:  # the service failed: tell the caller, keep the connection
        log.debug("%s: %s request failed: %s", name, header.op, e)
        channel.write(Header(op="error", meta={"message": f"{type(e).__name__}: {e}"}))
        return
    meta = result.meta if isinstance(result, Reply) else dict(result or {})
    channel.write(Header(op="ok", meta=meta))


Conn = TypeVar("Conn")  # what a backend serves one peer through: a socket, a UCX channel


class SocketListener(Listener, Generic[Conn]):
    """A listener on a TCP socket (the connection itself over tcp, its handshake over ucx), with
    what the backends share: the accept loop, the connections open, serving each until it ends,
    closing. A backend says what a new socket becomes (`accepted`, on the accept thread), how a
    connection is let go once served (`release`) and how one is interrupted at `close`."""

    def __init__(self, scheme: str, host: str, port: int, service: Service, options: Any):
        self._sock = socket.create_server((host, port), backlog=256)
        self.address = f"{scheme}://{host}:{self._sock.getsockname()[1]}"
        self._service = service
        self._options = options
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[Conn] = set()
        self._thread = threading.Thread(target=self._accept_loop, name=f"pdrun-{scheme}-accept", daemon=True)
        self._thread.start()

    def accepted(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def release(self, conn: Conn) -> None:
        raise NotImplementedError

    def interrupt(self, conn: Conn) -> None:
        self.release(conn)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.01)
                continue
            self.accepted(sock)

    def _admit(self, conn: Conn, limit: int | None = None) -> bool:
        """Count `conn` as open, unless the listener is closed or has `limit` open already."""
        with self._lock:
            if self._closed.is_set() or (limit is not None and len(self._open) >= limit):
                return False
            self._open.add(conn)
            return True

    def _serve(self, conn: Conn, channel: Channel) -> None:
        try:
            o = self._options
            serve(channel, self._service, self.address, o.idle_timeout, self._closed, o.auth_token)
        finally:
            with self._lock:
                self._open.discard(conn)
            self.release(conn)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            self.interrupt(conn)
        self._thread.join(timeout=2)

"""The TCP backend: one thread per connection on the listening side, blocking sockets on both.

Payloads are sent straight from the caller's buffer (`sendmsg` with the header) and received with
`recv_into` straight into the buffer the caller's sink gives: no copies in Python. Socket calls
release the GIL, so many connections stream in parallel. Every read has a deadline: a peer that
stops answering costs at most `io_timeout` seconds per frame, never a hang.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec

from pdrun.transfer import framed
from pdrun.transfer.base import Service, Transport
from pdrun.transfer.errors import PeerClosed, Rejected, TransferTimeout
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


@dataclass(frozen=True)
class TcpOptions:
    connect_timeout: float = 5.0
    io_timeout: float = 30.0  # per frame: from its first byte being awaited to its last byte
    idle_timeout: float = 600.0  # listener side: a connection quiet this long is closed
    max_payload: int = DEFAULT_MAX_PAYLOAD
    # The deployment's shared secret (default $PDRUN_AUTH_TOKEN): listeners need it, connections give it.
    auth_token: str | None = field(default_factory=auth_token_from_env)
    checksums: bool = True  # compute on send and verify on receive
    socket_buffer: int = 4 << 20
    max_connections: int = 512  # listener side


def parse_address(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"not a tcp address: {address!r} (expected tcp://HOST:PORT)")
    return parts.hostname, parts.port


def _tune(sock: socket.socket, options: TcpOptions) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):  # capped by the kernel: the default still works
            sock.setsockopt(socket.SOL_SOCKET, opt, options.socket_buffer)


class _FrameIO:
    """Frames over one socket, with per-frame deadlines."""

    def __init__(self, sock: socket.socket, options: TcpOptions):
        self.sock = sock
        self.options = options

    def _recv_into(self, view: memoryview, deadline: float) -> None:
        while view.nbytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransferTimeout(f"peer sent nothing for {self.options.io_timeout:.1f}s in the middle of a frame")
            self.sock.settimeout(remaining)
            try:
                n = self.sock.recv_into(view)
            except TimeoutError:
                raise TransferTimeout(f"no answer from the peer within {self.options.io_timeout:.1f}s") from None
            except OSError as e:
                raise PeerClosed(f"connection lost: {e}") from None
            if n == 0:
                raise PeerClosed("peer closed the connection")
            view = view[n:]

    def read(
        self, sink: Sink | None, first_timeout: float | None = None, drain_rejected: bool = False
    ) -> tuple[Header, Any]:
        """One frame. A payload the sink refuses raises `Rejected`; with `drain_rejected` it is read
        and dropped first, so that the connection stays in step (a listener then answers the error)."""
        start = time.monotonic()
        prefix = bytearray(PREFIX.size)
        first = memoryview(prefix)[:1]
        # The wait for a frame to begin may be longer (an idle connection) than for the rest of it.
        self._recv_into(first, start + (first_timeout or self.options.io_timeout))
        deadline = time.monotonic() + self.options.io_timeout
        self._recv_into(memoryview(prefix)[1:], deadline)
        body = bytearray(decode_prefix(bytes(prefix)))
        self._recv_into(memoryview(body), deadline)
        header = decode_header(bytes(body), self.options.max_payload)
        payload = None
        if header.nbytes:
            try:
                payload = sink(header) if sink is not None else bytearray(header.nbytes)
                view = as_writable(payload, header.nbytes)
            except Exception as e:
                if drain_rejected:
                    self._discard(header.nbytes, deadline)
                raise Rejected(str(e)) from e
            self._recv_into(view, deadline)
            verify(header, payload, self.options.checksums)
        return header, payload

    def replies(self, sink: Sink | None, window: int) -> Iterator[tuple[Header, Any]]:
        return framed.one_by_one(self, sink)  # the socket delivers in order: nothing to overlap

    def _discard(self, nbytes: int, deadline: float) -> None:
        scratch = memoryview(bytearray(min(nbytes, 1 << 20)))
        while nbytes:
            n = min(nbytes, scratch.nbytes)
            self._recv_into(scratch[:n], deadline)
            nbytes -= n

    def write(self, header: Header, payload: Any = None) -> None:
        view = memoryview(payload).cast("B") if payload is not None else None
        nbytes = view.nbytes if view is not None else 0
        if header.nbytes != nbytes or (nbytes and header.checksum is None and self.options.checksums):
            header = msgspec.structs.replace(
                header, nbytes=nbytes, checksum=checksum(view) if nbytes and self.options.checksums else None
            )
        buffers = [memoryview(encode_header(header))]
        if nbytes:
            buffers.append(view)
        self.sock.settimeout(self.options.io_timeout)
        try:
            while buffers:
                sent = self.sock.sendmsg(buffers)
                while sent and buffers:
                    if sent >= buffers[0].nbytes:
                        sent -= buffers.pop(0).nbytes
                    else:
                        buffers[0] = buffers[0][sent:]
                        sent = 0
        except TimeoutError:
            raise TransferTimeout(f"peer took more than {self.options.io_timeout:.1f}s to accept data") from None
        except OSError as e:
            raise PeerClosed(f"connection lost while sending: {e}") from None


class TcpConnection(FramedConnection):
    def __init__(self, address: str, options: TcpOptions):
        self.address = address
        host, port = parse_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=options.connect_timeout)
        except TimeoutError:
            raise TransferTimeout(f"connect to {address} timed out after {options.connect_timeout:.1f}s") from None
        except OSError as e:
            raise PeerClosed(f"cannot connect to {address}: {e}") from None
        _tune(sock, options)
        self.channel = _FrameIO(sock, options)
        self.authenticate(options.auth_token)

    def stale(self) -> bool:
        # An idle connection has nothing to read: EOF, an error or stray bytes all mean it is done.
        sock = self.channel.sock
        timeout = sock.gettimeout()
        sock.settimeout(0.0)  # with a timeout set, Python would wait for data before peeking
        try:
            sock.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(timeout)

    def close(self) -> None:
        self._broken = True
        with contextlib.suppress(OSError):
            self.channel.sock.close()


class TcpListener(framed.SocketListener[socket.socket]):
    def __init__(self, address: str, service: Service, options: TcpOptions):
        host, port = parse_address(address)
        super().__init__("tcp", host, port, service, options)

    def accepted(self, sock: socket.socket) -> None:
        if not self._admit(sock, self._options.max_connections):
            log.warning("%s: refusing a connection, %d already open", self.address, len(self._open))
            sock.close()
            return
        _tune(sock, self._options)
        io = _FrameIO(sock, self._options)
        threading.Thread(target=self._serve, args=(sock, io), name="pdrun-tcp-conn", daemon=True).start()

    def release(self, conn: socket.socket) -> None:
        conn.close()

    def interrupt(self, conn: socket.socket) -> None:
        # Its serving thread, woken, lets it go.
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


class TcpTransport(Transport):
    scheme = "tcp"

    def __init__(self, options: TcpOptions | None = None):
        self.options = options or TcpOptions()

    def listen(self, address: str, service: Service) -> TcpListener:
        return TcpListener(address, service, self.options)

    def connect(self, address: str) -> TcpConnection:
        return TcpConnection(address, self.options)

"""Request and reply over any channel that reads and writes whole frames: what the tcp and ucx
backends share. A backend supplies the channel (how a frame's bytes move); this module says what a
request and its reply are, on the caller's side and on the listener's."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import msgspec

from transfer.base import Connection, Frame, Reply, Service
from transfer.errors import PeerClosed, ProtocolError, Rejected, RemoteError, TransferError
from transfer.wire import Header, Sink

log = logging.getLogger(__name__)


class Channel(Protocol):
    def read(
        self, sink: Sink | None, first_timeout: float | None = None, drain_rejected: bool = False
    ) -> tuple[Header, Any]:
        """One frame; a payload the sink refuses raises `Rejected` (read and dropped first with
        `drain_rejected`, so that the channel stays in step)."""

    def write(self, header: Header, payload: Any = None) -> None: ...


class FramedConnection(Connection):
    """A connection whose requests and replies are frames on one channel."""

    channel: Channel
    _broken: bool = False

    @property
    def broken(self) -> bool:
        return self._broken

    def stream(
        self,
        op: str,
        *,
        key: bytes = b"",
        meta: dict[str, Any] | None = None,
        payload: Any = None,
        sink: Sink | None = None,
    ) -> Iterator[Frame]:
        if self.broken:
            raise PeerClosed(f"connection to {self.address} is broken")
        self._broken = True  # until the whole reply has been read
        self.channel.write(Header(op=op, key=key, meta=meta or {}), payload)
        while True:
            header, data = self.channel.read(sink)
            if header.more:
                yield Frame(header, data)
                continue
            self._broken = False
            if header.op == "error":
                raise RemoteError(f"{self.address}: {header.meta.get('message', 'unspecified error')}")
            if header.op != "ok":
                self._broken = True
                raise ProtocolError(f"reply ended with {header.op!r}, expected 'ok' or 'error'")
            return dict(header.meta)


def serve(channel: Channel, service: Service, name: str, idle_timeout: float, closed: threading.Event) -> None:
    """Answer requests on `channel` until the peer leaves, the channel fails or `closed` is set."""
    try:
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
            _reply(channel, service, name, header, payload)
    except TransferError as e:
        log.debug("%s: connection ended while replying: %s", name, e)


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

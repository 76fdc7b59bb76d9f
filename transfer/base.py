"""The Transport interface: a request gets a stream of reply frames, payloads land in caller buffers.

A request is one frame. Its reply is zero or more data frames (`more=True`), then one final
frame: op "ok" (with meta for the caller) or op "error" (raised as `RemoteError`). Backends (tcp,
ucx) only move frames; what ops mean is up to the `Service` behind a listener and its callers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pdrun.transfer.wire import Header, Sink


@dataclass
class Frame:
    header: Header
    payload: Any = None  # a bytes-like object of header.nbytes bytes, or None


@dataclass
class Reply:
    """What a finished request returned: its final frame's meta."""

    meta: dict[str, Any] = field(default_factory=dict)


class Service(ABC):
    """What a listener serves. Called from the listener's threads, one request at a time per connection."""

    def receive_buffer(self, header: Header) -> Any:
        """Where the payload of an incoming request goes (exactly header.nbytes writable bytes)."""
        return bytearray(header.nbytes)

    @abstractmethod
    def handle(self, request: Header, payload: Any) -> Iterator[Frame]:
        """Yield the data frames of the reply; the final "ok" frame is sent after the last one, with
        the meta of a `Reply` this generator returns (if any). Raising sends an "error" frame."""


class Listener(ABC):
    address: str

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Connection(ABC):
    """One connection to a peer, used by one thread at a time."""

    address: str

    @abstractmethod
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
        """Send a request and yield the data frames of its reply, checksum-verified, each payload in
        the buffer `sink(header)` gave (a fresh bytearray without a sink). Returns the final meta as
        the generator's return value; raises `RemoteError` for an "error" reply. A stream abandoned
        part way leaves the connection unusable (`broken`).

        `window`: how many frames may be in flight at once. A backend that pipelines (ucx) calls the
        sink for up to `window` frames before yielding the first of them, so the buffers it hands out
        for frames not yet yielded must be distinct; the one of a yielded frame may be reused once
        the caller asks for the next frame. Backends that read one frame at a time (tcp) ignore it."""

    def call(self, op: str, *, key: bytes = b"", meta: dict[str, Any] | None = None, payload: Any = None) -> Reply:
        """A request whose reply carries no data frames."""
        gen = self.stream(op, key=key, meta=meta, payload=payload)
        while True:
            try:
                frame = next(gen)
            except StopIteration as stop:
                return Reply(stop.value or {})
            raise_unexpected(frame)

    @property
    @abstractmethod
    def broken(self) -> bool:
        """True once the connection cannot carry another request."""

    def stale(self) -> bool:
        """True if an idle connection is known to be dead (the peer closed or restarted)."""
        return False

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raise_unexpected(frame: Frame) -> None:
    from pdrun.transfer.errors import ProtocolError

    raise ProtocolError(f"unexpected data frame {frame.header.op!r} in a reply that should carry none")


class Transport(ABC):
    """A backend: how to listen and how to connect, for one URL scheme."""

    scheme: str

    @abstractmethod
    def listen(self, address: str, service: Service) -> Listener: ...

    @abstractmethod
    def connect(self, address: str) -> Connection: ...

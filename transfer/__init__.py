"""Moving bytes between processes: one `Transport` interface, chosen by the address's URL scheme.

    listener = transfer.listen("tcp://127.0.0.1:0", service)
    with transfer.connect(listener.address) as conn:
        for frame in conn.stream("get", meta={...}, sink=...): ...

A listener with an auth token (`PDRUN_AUTH_TOKEN` in the environment, unless given as the
`auth_token` option) serves only connections that give the same token first; connections give the
same one.

This package knows nothing of KV caches, storage or vLLM.
"""

from __future__ import annotations

from pdrun.transfer.base import Connection, Frame, Listener, Reply, Service, Transport
from pdrun.transfer.errors import (
    ChecksumError,
    PeerClosed,
    ProtocolError,
    RemoteError,
    TransferError,
    TransferTimeout,
    Unauthorized,
)
from pdrun.transfer.framed import AUTH_TOKEN_ENV
from pdrun.transfer.pool import ConnectionPool
from pdrun.transfer.tcp import TcpOptions, TcpTransport
from pdrun.transfer.wire import Header

__all__ = [
    "AUTH_TOKEN_ENV",
    "ChecksumError",
    "Connection",
    "ConnectionPool",
    "Frame",
    "Header",
    "Listener",
    "PeerClosed",
    "ProtocolError",
    "RemoteError",
    "Reply",
    "Service",
    "TcpOptions",
    "TcpTransport",
    "TransferError",
    "TransferTimeout",
    "Transport",
    "Unauthorized",
    "connect",
    "listen",
    "transport_for",
]

SCHEMES = ("tcp", "ucx")


def transport_for(address: str, **options: object) -> Transport:
    """The backend for `address` ("tcp://HOST:PORT" or "ucx://HOST:PORT"), with backend options
    (e.g. io_timeout=5). The ucx backend is imported only when asked for: it needs ucxx."""
    scheme = address.split("://", 1)[0] if "://" in address else ""
    if scheme == "tcp":
        return TcpTransport(TcpOptions(**options))  # type: ignore[arg-type]
    if scheme == "ucx":
        from pdrun.transfer.ucx import UcxOptions, UcxTransport

        ucx_options = {k: v for k, v in options.items() if k in UcxOptions.__dataclass_fields__}
        return UcxTransport(UcxOptions(**ucx_options))  # type: ignore[arg-type]
    raise ValueError(f"unsupported transfer address {address!r}: the scheme must be one of {', '.join(SCHEMES)}")


def listen(address: str, service: Service, **options: object) -> Listener:
    return transport_for(address, **options).listen(address, service)


def connect(address: str, **options: object) -> Connection:
    return transport_for(address, **options).connect(address)

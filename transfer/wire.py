"""The wire format: a fixed prefix, a validated msgpack header, then the raw payload bytes.

    +------+---------+------------+----------------------+-----------------+
    | PDRN | version | header len | header (msgpack)     | payload         |
    | 4 B  | 1 B     | 4 B (LE)   | `Header`, validated  | header.nbytes B |
    +------+---------+------------+----------------------+-----------------+

The header is decoded by msgspec against `Header`: unknown fields, wrong types and out-of-range
values are rejected, and nothing is ever unpickled. The payload is never copied by this layer: it
is sent from the caller's buffer and received into a buffer the caller provides.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
import xxhash

from pdrun.transfer.errors import ChecksumError, ProtocolError

MAGIC = b"PDRN"
VERSION = 1
PREFIX = struct.Struct("<4sBI")
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_PAYLOAD = 1 << 31  # 2 GiB: a 16k-token 8B prompt in one frame still fits

Op = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Key = Annotated[bytes, msgspec.Meta(max_length=64)]
NBytes = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
Checksum = Annotated[int, msgspec.Meta(ge=0)]


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One frame's header.

    op: what the frame is ("get", "chunk", "ok", "error", ...): the transport only reserves
        "ok" and "error", which end a reply.
    key: an opaque key the frame is about (a chunk key, say), up to 64 bytes.
    nbytes: payload length that follows the header.
    checksum: xxh3-64 of the payload, or None when the sender did not compute one.
    more: True on every reply frame but the last.
    meta: small structured values for the layer above (validated there).
    """

    op: Op
    key: Key = b""
    nbytes: NBytes = 0
    checksum: Checksum | None = None
    more: bool = False
    meta: dict[str, Any] = {}


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


def checksum(payload: Any) -> int:
    """xxh3-64 of a bytes-like object (no copy)."""
    return xxhash.xxh3_64_intdigest(payload)


def encode_header(header: Header) -> bytes:
    body = _encoder.encode(header)
    if len(body) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(body)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    return PREFIX.pack(MAGIC, VERSION, len(body)) + body


def decode_prefix(raw: bytes) -> int:
    """Check the fixed prefix; return the header length."""
    magic, version, length = PREFIX.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: the peer does not speak the pdrun wire format")
    if version != VERSION:
        raise ProtocolError(f"wire version {version} is not supported (this side speaks {VERSION})")
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {length} is over the {MAX_HEADER_BYTES}-byte limit")
    return length


def decode_header(body: bytes, max_payload: int) -> Header:
    try:
        header = _decoder.decode(body)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid header: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"undecodable header: {e}") from None
    if header.nbytes > max_payload:
        raise ProtocolError(f"payload of {header.nbytes} bytes is over the {max_payload}-byte limit")
    return header


def verify(header: Header, payload: Any, enabled: bool = True) -> None:
    if enabled and header.checksum is not None and header.nbytes:
        got = checksum(payload)
        if got != header.checksum:
            raise ChecksumError(
                f"checksum mismatch on {header.op} frame (key {header.key.hex() or '-'}): "
                f"expected {header.checksum:#018x}, got {got:#018x}"
            )


# A sink gives the buffer a frame's payload is received into: exactly header.nbytes writable bytes.
Sink = Callable[[Header], Any]


def as_writable(buf: Any, nbytes: int) -> memoryview:
    view = memoryview(buf).cast("B")
    if view.readonly:
        raise ProtocolError("receive buffer is read-only")
    if view.nbytes != nbytes:
        raise ProtocolError(f"receive buffer has {view.nbytes} bytes, the frame carries {nbytes}")
    return view

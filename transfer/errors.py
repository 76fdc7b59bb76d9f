"""Errors of the transfer layer. Every failure a caller can see is a `TransferError`."""


class TransferError(Exception):
    """Base class: the bytes did not arrive as asked."""


class TransferTimeout(TransferError):
    """The peer did not answer within the timeout."""


class PeerClosed(TransferError):
    """The peer closed the connection or could not be reached."""


class ProtocolError(TransferError):
    """A malformed, truncated or oversized frame."""


class ChecksumError(TransferError):
    """The payload does not match the checksum in its header."""


class RemoteError(TransferError):
    """The peer answered the request with an error."""


class Rejected(TransferError):
    """The receiver refused a frame's payload; the frame was read and dropped, the stream is intact."""


class Unauthorized(TransferError):
    """The peer's port needs the deployment's auth token, and this side did not give it (or gave another)."""

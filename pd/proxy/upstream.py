"""The proxy's HTTP client to its backends, and the failures it acts on, named by what they mean.

On aiohttp: its C parser and lean request path keep the proxy's hop under 2 ms for a 16k-token
request (docs/benchmarks.md, "The proxy's hop"). Every request either answers or raises an
`UpstreamError`:

- `Refused`: no connection could be made (refused, reset as it was made): the backend is gone;
- `NotConnected`: no connection made within the connect timeout (a backend under a burst);
- `ConnectionLost`: an open connection failed (closed by the backend, reset mid-answer); a
  kept-alive connection the backend closed just as a request went out fails this way too;
- `Timeout`: the backend went silent for longer than the request's read timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

# Below the keep-alive of vLLM's server (uvicorn, 5 s): a pooled connection is let go before the
# backend closes it, so requests rarely go out on a connection that is being closed.
KEEPALIVE_S = 4.0


class UpstreamError(Exception):
    """A request to a backend that got no whole answer."""


class Refused(UpstreamError):
    pass


class NotConnected(UpstreamError):
    pass


class ConnectionLost(UpstreamError):
    pass


class Timeout(UpstreamError):
    pass


@dataclass
class Answer:
    """A whole answer."""

    status: int
    content: bytes
    content_type: str | None


class Stream:
    """An answer being read: its status and headers, then its body as it arrives. Close it."""

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.status = response.status
        self.content_type: str | None = response.headers.get("content-type")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive."""
        async with _named_failures():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def read(self) -> bytes:
        async with _named_failures():
            return await self._response.read()

    def close(self) -> None:
        """Done with it: a body read to its end leaves the connection to the next request; one
        left part way closes it, which tells the backend (vLLM aborts the request)."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class Upstream:
    """Pooled connections to the backends (at most `max_connections`, all together)."""

    def __init__(self, connect_timeout_s: float = 15.0, read_timeout_s: float = 600.0, max_connections: int = 2048):
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _timeout(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        """The pool's connect and read timeouts, or `timeout_s` for both."""
        connect, read = (
            (timeout_s, timeout_s) if timeout_s is not None else (self.connect_timeout_s, self.read_timeout_s)
        )
        return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made inside the event loop that uses it
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout(None))
        return self._session

    async def open(self, method: str, url: str, body: bytes | None = None, timeout_s: float | None = None) -> Stream:
        """Send a request (`body`: JSON) and return its answer once its status and headers are in;
        `timeout_s` bounds the connect and each read instead of the pool's timeouts."""
        headers = {"content-type": "application/json"} if body is not None else None
        async with _named_failures():
            response = await self.session.request(
                method, url, data=body, headers=headers, timeout=self._timeout(timeout_s), allow_redirects=False
            )
        return Stream(response)

    async def request(self, method: str, url: str, body: bytes | None = None, timeout_s: float | None = None) -> Answer:
        """Send a request and read its whole answer."""
        stream = await self.open(method, url, body, timeout_s)
        try:
            return Answer(stream.status, await stream.read(), stream.content_type)
        finally:
            stream.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@contextlib.asynccontextmanager
async def _named_failures() -> AsyncIterator[None]:
    """The client library's exceptions as the `UpstreamError` kinds the proxy acts on."""
    try:
        yield
    except UpstreamError:
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {e}".rstrip(": ")
        if isinstance(e, aiohttp.ConnectionTimeoutError):
            raise NotConnected(why) from e
        if isinstance(e, aiohttp.ServerTimeoutError | TimeoutError):  # before OSError: TimeoutError is one
            raise Timeout(why) from e
        if isinstance(e, aiohttp.ClientConnectorError):
            raise Refused(why) from e
        if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | OSError):
            raise ConnectionLost(why) from e
        if isinstance(e, aiohttp.ClientError):
            raise UpstreamError(why) from e
        raise

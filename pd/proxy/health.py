"""Which backends are in rotation: each one's /health, every health_interval_s and at once after a
request to it failed. A refused connection takes a backend out at once; a slow answer does only
several checks in a row (a backend under a burst is busy, not gone)."""

from __future__ import annotations

import asyncio

import httpx

from pdrun.pd.proxy.routing import Backend

SLOW_PROBES_DOWN = 5  # health checks in a row that time out before a backend leaves the rotation
HEALTH_TIMEOUT_S = 2.0
MODELS_TIMEOUT_S = 5.0


class TornDownIsConnectError(httpx.AsyncBaseTransport):
    """A transport whose failures to make a connection are all httpx's ConnectError: httpcore can
    raise a plain exception (AttributeError from a socket already closed) on a connection its dying
    peer tore down as it was made, which would otherwise reach the client as a 500."""

    def __init__(self, inner: httpx.AsyncBaseTransport):
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._inner.handle_async_request(request)
        except httpx.HTTPError:
            raise
        except Exception as e:
            raise httpx.ConnectError(f"{type(e).__name__}: {e}", request=request) from e

    async def aclose(self) -> None:
        await self._inner.aclose()


class Health:
    """The health of `backends`, checked through `client` (set once the proxy has one); the prefills
    waiting on a backend that leaves the rotation are told (`went_down`)."""

    def __init__(self, backends: list[Backend]):
        self.backends = backends
        self.client: httpx.AsyncClient | None = None
        self._checks: set[asyncio.Task[None]] = set()  # checks a failed request asked for
        self._went_down: dict[str, asyncio.Event] = {}  # backend url -> set when it leaves the rotation

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def check(self, b: Backend) -> None:
        assert self.client is not None
        try:
            r = await self._get_health(b)
            b.slow_probes = 0
            if r.status_code != 200:
                self.down(b, f"/health answered {r.status_code}")
                return
            if not b.healthy or not b.models:
                models = (await self.client.get(f"{b.url}/v1/models", timeout=MODELS_TIMEOUT_S)).json()
                b.mark_up(m["id"] for m in models.get("data", []))
        except httpx.TimeoutException:
            b.slow_probes += 1
            if b.slow_probes >= SLOW_PROBES_DOWN:
                self.down(b, f"/health unanswered {b.slow_probes} times in a row")
        except (httpx.HTTPError, ValueError, KeyError) as e:
            self.down(b, f"/health: {type(e).__name__}: {e}".rstrip(": "))

    async def _get_health(self, b: Backend) -> httpx.Response:
        """GET /health; a pooled connection the server had just closed is tried again on a new one
        (a backend that is gone fails that too)."""
        assert self.client is not None
        try:
            return await self.client.get(f"{b.url}/health", timeout=HEALTH_TIMEOUT_S)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            return await self.client.get(f"{b.url}/health", timeout=HEALTH_TIMEOUT_S)

    def down(self, b: Backend, reason: str) -> None:
        """Take b out of rotation; the prefills waiting on it stop waiting."""
        b.mark_down(reason)
        if (went_down := self._went_down.pop(b.url, None)) is not None:
            went_down.set()

    def went_down(self, b: Backend) -> asyncio.Event:
        """Set when b leaves the rotation."""
        return self._went_down.setdefault(b.url, asyncio.Event())

    def failed(self, b: Backend, e: Exception) -> None:
        """A request to b failed. Refused: b is gone, out of rotation now. Anything else (a reset, a
        pooled connection the server had just closed) may be that one connection, not the backend:
        a health check, at once, decides."""
        if isinstance(e, httpx.ConnectError):
            self.down(b, f"{type(e).__name__}: {e}")
        else:
            task = asyncio.create_task(self.check(b))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

"""Which backends are in rotation: each one's /health, every health_interval_s and at once after a
request to it failed. A refused connection takes a backend out at once; a slow answer does only
several checks in a row (a backend under a burst is busy, not gone)."""

from __future__ import annotations

import asyncio
import json

from pdrun.pd.proxy.routing import Backend
from pdrun.pd.proxy.upstream import Answer, ConnectionLost, NotConnected, Refused, Timeout, Upstream, UpstreamError

SLOW_PROBES_DOWN = 5  # health checks in a row that time out before a backend leaves the rotation
HEALTH_TIMEOUT_S = 2.0
MODELS_TIMEOUT_S = 5.0


class Health:
    """The health of `backends`, checked through `client` (set once the proxy has one); the prefills
    waiting on a backend that leaves the rotation are told (`went_down`)."""

    def __init__(self, backends: list[Backend]):
        self.backends = backends
        self.client: Upstream | None = None
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
            if r.status != 200:
                self.down(b, f"/health answered {r.status}")
                return
            if not b.healthy or not b.models:
                answer = await self.client.request("GET", f"{b.url}/v1/models", timeout_s=MODELS_TIMEOUT_S)
                models = json.loads(answer.content)
                b.mark_up(m["id"] for m in models.get("data", []))
        except (Timeout, NotConnected):
            b.slow_probes += 1
            if b.slow_probes >= SLOW_PROBES_DOWN:
                self.down(b, f"/health unanswered {b.slow_probes} times in a row")
        except (UpstreamError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.down(b, f"/health: {type(e).__name__}: {e}".rstrip(": "))

    async def _get_health(self, b: Backend) -> Answer:
        """GET /health; a pooled connection the server had just closed is tried again on a new one
        (a backend that is gone fails that too)."""
        assert self.client is not None
        try:
            return await self.client.request("GET", f"{b.url}/health", timeout_s=HEALTH_TIMEOUT_S)
        except ConnectionLost:
            return await self.client.request("GET", f"{b.url}/health", timeout_s=HEALTH_TIMEOUT_S)

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
        if isinstance(e, Refused):
            self.down(b, f"{type(e).__name__}: {e}")
        else:
            task = asyncio.create_task(self.check(b))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

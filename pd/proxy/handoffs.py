"""Hand-offs no decoder will pull, given back to their prefiller at once.

A prefiller holds a hand-off's chunks in its staging pool until the decoder that pulled them
releases them (or `staging_ttl_s` passes). When the proxy gives up on the decode side of a request
(no decoder took it, the decoder died, the client left before it was done), the decoder may never
pull or release it: the proxy releases it itself. A release is idempotent: one the decoder also
sends, or one for chunks a decoder is pulling as it lands, costs nothing but the message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from pdrun import transfer
from pdrun.pd.params import handoff_of

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 2.0  # a prefiller that does not answer in this long frees it at its TTL


class GiveBack:
    """Releases hand-offs in the background; the request path never waits for them."""

    def __init__(self, timeout_s: float = RELEASE_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, params: dict[str, Any] | None) -> None:
        try:
            handoff = handoff_of(params)
        except ValidationError:
            return
        if handoff is None or not handoff.num_tokens:
            return
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(release, handoff.endpoints, handoff.transfer, self.timeout_s)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the releases under way (the proxy is stopping)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def release(endpoints: list[str], transfer_id: str, timeout_s: float) -> bool:
    """Release `transfer_id` at every TP rank's endpoint; whether all of them answered."""
    answered = True
    for address in endpoints:
        try:
            with transfer.connect(address, connect_timeout=timeout_s, io_timeout=timeout_s) as conn:
                conn.call("release", meta={"transfer": transfer_id})
        except Exception as e:  # its TTL frees it anyway
            why = f"{type(e).__name__}: {e}"
            log.info("could not release hand-off %s at %s (%s); its TTL frees it", transfer_id, address, why)
            answered = False
    return answered

"""The proxy's hint to a decoder-only completion's instance: the request's bytes, sent the moment the
instance is picked, so that the instance copies the prefix the cache tier holds into the GPU while
its front end still handles the request (pd/prefetch.py). The instance reads the prompt's token ids
out of them itself: the proxy's hop costs one copy of the bytes, not a parse of a long prompt. Fire
and forget: a hint that cannot go at once (the instance not taking them, its queue full) is dropped,
and the request loads as usual."""

from __future__ import annotations

import zmq

LINGER_MS = 500
QUEUE = 16  # hints waiting for an instance that is slow to take them; beyond, they are dropped


class Hints:
    def __init__(self, addresses: dict[str, str]):
        """`addresses`: decoder base URL -> the zmq address its worker takes hints on."""
        self._context = zmq.Context()
        self._sockets: dict[str, zmq.Socket] = {}
        for url, address in addresses.items():
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, QUEUE)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # no queue for an instance not connected (yet)
            sock.connect(address)
            self._sockets[url.rstrip("/")] = sock

    def send(self, decoder: str, request: bytes) -> bool:
        """Hint `decoder` at the completion `request` (its JSON body); whether a hint went."""
        sock = self._sockets.get(decoder.rstrip("/"))
        if sock is None:
            return False
        try:
            sock.send(request, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=LINGER_MS)  # hints sent just now still go
        self._context.term()

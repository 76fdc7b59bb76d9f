"""The shared secret: a listener with an auth token serves a connection only once it gave the same
token; nothing reaches the service (no chunk served, none stored) before that. TCP and UCX."""

from __future__ import annotations

import contextlib
import socket

import pytest

from pdrun import transfer
from pdrun.storage.client import CacheClient
from pdrun.storage.server import CacheServer
from pdrun.storage.tiers import MemoryTier, TieredStore
from pdrun.transfer import Frame, Header, Service
from pdrun.transfer.wire import encode_header
from tests.unit.test_tiers import CHUNK, key, payload

TOKEN = "s3cret-token"


class Counting(Service):
    """Answers "get" with one data frame, and counts every request it sees."""

    def __init__(self):
        self.requests = 0

    def handle(self, request, payload):
        self.requests += 1
        yield Frame(Header(op="data"), b"kv bytes")
        return {}


@pytest.fixture(params=["tcp", "ucx"])
def guarded(request):
    service = Counting()
    with transfer.listen(f"{request.param}://127.0.0.1:0", service, io_timeout=5, auth_token=TOKEN) as listener:
        yield listener, service


def get(address: str, **options) -> list[bytes]:
    with transfer.connect(address, io_timeout=5, **options) as conn:
        return [bytes(f.payload) for f in conn.stream("get")]


def test_the_right_token_is_served(guarded):
    listener, service = guarded
    assert get(listener.address, auth_token=TOKEN) == [b"kv bytes"]
    assert service.requests == 1


def test_a_connection_without_the_token_is_refused_before_its_request_is_served(guarded):
    listener, service = guarded
    with pytest.raises(transfer.RemoteError, match="unauthorized: no auth token"):
        get(listener.address, auth_token=None)
    assert service.requests == 0


def test_a_wrong_token_is_refused_at_connect(guarded):
    listener, service = guarded
    with pytest.raises(transfer.Unauthorized, match="auth token"):
        get(listener.address, auth_token="guess")
    assert service.requests == 0


def test_a_payload_sent_first_is_not_read():
    """A put before the token: refused on its header, the connection closed, its bytes never taken in."""
    service = Counting()
    with transfer.listen("tcp://127.0.0.1:0", service, auth_token=TOKEN) as listener:
        host, port = listener.address.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(encode_header(Header(op="put", nbytes=1 << 30)) + b"x" * 1024)
            assert b"unauthorized" in sock.recv(4096)
            with contextlib.suppress(ConnectionResetError):  # reset: the bytes sent were left unread
                assert sock.recv(4096) == b""  # closed, not waiting for the rest of the gigabyte
    assert service.requests == 0


def test_a_listener_without_a_token_serves_a_connection_that_gives_one():
    service = Counting()
    with transfer.listen("tcp://127.0.0.1:0", service, auth_token=None) as listener:
        assert get(listener.address, auth_token=TOKEN) == [b"kv bytes"]


def test_the_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(transfer.AUTH_TOKEN_ENV, TOKEN)
    service = Counting()
    with transfer.listen("tcp://127.0.0.1:0", service) as listener:
        assert get(listener.address) == [b"kv bytes"]
        monkeypatch.delenv(transfer.AUTH_TOKEN_ENV)
        with pytest.raises(transfer.RemoteError, match="unauthorized"):
            get(listener.address)


def test_the_cache_tier_takes_puts_and_answers_lookups_only_from_peers_with_the_token():
    store = TieredStore(MemoryTier(8 * CHUNK))
    with CacheServer("tcp://127.0.0.1:0", store, local=False, auth_token=TOKEN) as server:
        stranger = CacheClient(server.address, lambda a: transfer.connect(a, auth_token=None))
        assert not stranger.put(key(0), payload(0), {})  # refused: a miss, never an error
        peer = CacheClient(server.address, lambda a: transfer.connect(a, auth_token=TOKEN))
        assert peer.lookup([key(0)]) == 0  # the stranger stored nothing
        assert peer.put(key(1), payload(1), {})
        assert stranger.lookup([key(1)]) == 0
        assert peer.lookup([key(1)]) == 1
        stranger.close()
        peer.close()

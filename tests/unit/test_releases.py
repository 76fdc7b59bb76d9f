"""A decoder's releases over real connections to a real staging endpoint: taken at once, sent again
while the prefiller does not answer (until it does), given up after a while."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from pdrun import transfer
from pdrun.pd import releases
from pdrun.pd.releases import Releaser
from pdrun.pd.staging import StagingPool, StagingService


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def staged(*transfers: str) -> StagingPool:
    pool = StagingPool(1 << 20, ttl_s=600)
    for i, t in enumerate(transfers):
        pool.stage(t, bytes([i]) * 16, 1, 64, lambda buf: None)
    return pool


def wait_until(check, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


@pytest.fixture
def releaser():
    def send(address: str, transfer_id: str) -> None:
        with transfer.connect(address, connect_timeout=0.5, io_timeout=0.5) as conn:
            conn.call("release", meta={"transfer": transfer_id})

    r = Releaser(send)
    yield r
    r.close()


def test_releases_are_taken(releaser):
    pool = staged("t1", "t2")
    with transfer.listen("tcp://127.0.0.1:0", StagingService(pool, "L1")) as listener:
        releaser.release(listener.address, "t1")
        releaser.release(listener.address, "t2")
        assert wait_until(lambda: pool.held() == 0)
    assert releaser.pending() == 0


def test_releases_a_prefiller_did_not_take_go_again_once_it_answers(releaser, monkeypatch):
    monkeypatch.setattr(releases, "RETRY_S", 0.2)
    address = free_address()  # the prefiller restarting: nobody listens there yet
    pool = staged("t1", "t2", "t3")
    for t in ("t1", "t2", "t3"):
        releaser.release(address, t)
    assert wait_until(lambda: releaser.pending() == 3)  # the first failed; the others wait with it
    with transfer.listen(address, StagingService(pool, "L1")):
        assert wait_until(lambda: pool.held() == 0)
    assert releaser.pending() == 0


def test_a_release_is_given_up_after_a_while(releaser, monkeypatch, caplog):
    monkeypatch.setattr(releases, "RETRY_S", 0.05)
    monkeypatch.setattr(releases, "GIVE_UP_S", 0.3)
    with caplog.at_level(logging.INFO, logger="pdrun"):
        releaser.release(free_address(), "t1")  # a prefiller gone for good
        assert wait_until(lambda: "the prefiller's TTL frees it" in caplog.text)
    assert releaser.pending() == 0

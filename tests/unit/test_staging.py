import threading
import time

import pytest
import torch

from pdrun import transfer
from pdrun.pd.staging import StagingPool, StagingService
from tests.unit.conftest import LateCopy


def fill_with(value):
    def fill(buf):
        buf.fill_(value)

    return fill


def key(i):
    return bytes([i]) * 16


def test_stage_serves_and_dedups():
    pool = StagingPool(budget_bytes=1000, ttl_s=60)
    calls = []
    assert pool.stage("r1", key(1), 1, 100, lambda b: calls.append(b.fill_(7)))
    assert pool.stage("r2", key(1), 1, 100, lambda b: calls.append(b))  # same chunk: no second copy
    assert len(calls) == 1 and len(pool) == 1 and pool.nbytes == 100
    assert pool.get(key(1)).transfers == {"r1", "r2"}
    assert int(pool.get(key(1)).buffer[0]) == 7


def test_budget_evicts_unreferenced_first_then_oldest_referenced():
    pool = StagingPool(budget_bytes=300, ttl_s=60)
    pool.stage("a", key(1), 1, 100, fill_with(1))
    pool.stage("b", key(2), 1, 100, fill_with(2))
    pool.stage("c", key(3), 1, 100, fill_with(3))
    pool.release("b")  # key 2 now unreferenced
    pool.stage("d", key(4), 1, 100, fill_with(4))
    assert pool.get(key(2)) is None and pool.get(key(1)) is not None
    pool.stage("e", key(5), 1, 100, fill_with(5))  # nothing unreferenced: the least recently used goes
    assert pool.get(key(3)) is None
    assert pool.evicted_referenced == 1
    assert pool.nbytes == 300
    assert not pool.stage("f", key(6), 1, 301, fill_with(6))  # can never fit


def test_a_full_pool_waits_for_decoders_to_release_what_they_pulled_instead_of_evicting_it():
    pool = StagingPool(budget_bytes=200, ttl_s=60, wait_s=30)
    pool.stage("a", key(1), 1, 100, fill_with(1))
    pool.stage("b", key(2), 1, 100, fill_with(2))
    pool.handed("a")
    pool.handed("b")
    staged = threading.Event()
    stager = threading.Thread(target=lambda: staged.set() if pool.stage("c", key(3), 1, 100, fill_with(3)) else None)
    stager.start()
    assert not staged.wait(0.3)  # paused: both chunks are about to be pulled
    assert pool.get(key(1)) is not None and pool.get(key(2)) is not None
    pool.release("a")  # a decoder pulled it
    stager.join(timeout=10)
    assert staged.is_set() and pool.get(key(1)) is None and pool.get(key(2)) is not None
    assert pool.evicted_referenced == 0 and pool.waited_s > 0


def test_a_decoder_that_never_comes_is_waited_for_only_wait_s_once():
    pool = StagingPool(budget_bytes=200, ttl_s=60, wait_s=0.2)
    pool.stage("a", key(1), 1, 100, fill_with(1))
    pool.stage("b", key(2), 1, 100, fill_with(2))
    pool.handed("a")
    t0 = time.monotonic()
    pool.stage("c", key(3), 1, 100, fill_with(3))  # waits for "a", then evicts the oldest
    assert 0.2 <= time.monotonic() - t0 < 5 and pool.get(key(1)) is None and pool.evicted_referenced == 1
    t0 = time.monotonic()
    pool.stage("d", key(4), 1, 100, fill_with(4))  # nothing handed is staged any more: no wait
    assert time.monotonic() - t0 < 0.1 and pool.evicted_referenced == 2


def test_chunks_of_prefills_still_running_are_not_waited_for():
    pool = StagingPool(budget_bytes=200, ttl_s=60, wait_s=30)
    pool.stage("a", key(1), 1, 100, fill_with(1))
    pool.stage("b", key(2), 1, 100, fill_with(2))
    t0 = time.monotonic()
    pool.stage("c", key(3), 1, 100, fill_with(3))  # no decoder will release "a" before it finishes
    assert time.monotonic() - t0 < 0.1 and pool.evicted_referenced == 1


def test_unreleased_transfers_expire():
    pool = StagingPool(budget_bytes=200, ttl_s=0.05)
    pool.stage("a", key(1), 1, 100, fill_with(1))
    time.sleep(0.1)
    pool.stage("b", key(2), 1, 100, fill_with(2))  # expires "a" on the way
    assert pool.get(key(1)).transfers == set()
    pool.stage("c", key(3), 1, 100, fill_with(3))
    assert pool.get(key(1)) is None  # the expired one made room, the live one stayed
    assert pool.get(key(2)) is not None


@pytest.fixture
def served():
    pool = StagingPool(budget_bytes=1 << 20, ttl_s=60)
    served_bytes = []
    with transfer.listen("tcp://127.0.0.1:0", StagingService(pool, "L1", served_bytes.append)) as listener:
        yield pool, listener, served_bytes


def test_service_streams_chunks_in_order_and_stops_at_the_first_missing(served):
    pool, listener, served_bytes = served
    pool.stage("r", key(1), 2, 64, fill_with(1))
    pool.stage("r", key(2), 1, 32, fill_with(2))
    with transfer.connect(listener.address) as conn:
        frames = list(conn.stream("get", meta={"keys": [key(2).hex(), key(1).hex()]}))
        assert [f.header.key for f in frames] == [key(2), key(1)]
        assert [f.header.meta for f in frames] == [{"layout": "L1", "blocks": [1]}, {"layout": "L1", "blocks": [2]}]
        assert bytes(frames[1].payload) == bytes([1]) * 64
        got = []
        with pytest.raises(transfer.RemoteError, match="not staged"):
            for f in conn.stream("get", meta={"keys": [key(1).hex(), key(9).hex()]}):
                got.append(f.header.key)
        assert got == [key(1)]  # what came before the missing chunk is usable
        assert conn.call("ping").meta == {"layout": "L1", "staged": 2, "held": 1}
        conn.call("release", meta={"transfer": "r"})
    assert pool.get(key(1)).transfers == set()
    assert served_bytes == [32, 64, 64]


def test_service_rejects_bad_requests(served):
    _, listener, _ = served
    with transfer.connect(listener.address) as conn:
        for op, meta, match in [
            ("get", {"keys": "nope"}, "hex chunk keys"),
            ("get", {"keys": ["zz"]}, "hex chunk keys"),
            ("release", {"transfer": 5}, "must be a string"),
            ("drop_tables", {}, "unknown op"),
        ]:
            with pytest.raises(transfer.RemoteError, match=match):
                conn.call(op, meta=meta)
        with pytest.raises(transfer.RemoteError, match="no payload"):
            conn.call("get", meta={"keys": []}, payload=b"unexpected")


def test_a_staged_chunk_holds_what_its_copy_wrote():
    pool = StagingPool(budget_bytes=100, ttl_s=60)
    pool.stage("a", key(1), 1, 10, fill_with(3))
    assert torch.equal(pool.get(key(1)).buffer, torch.full((10,), 3, dtype=torch.uint8))


def test_a_chunk_is_served_only_once_its_copy_is_done():
    pool = StagingPool(budget_bytes=1 << 20, ttl_s=60, allocate=lambda n: torch.zeros(n, dtype=torch.uint8))
    assert pool.stage("r", key(1), 1, 1 << 16, lambda buf: LateCopy(buf, 9, delay_s=0.3))
    assert int(pool.get(key(1)).buffer[-1]) == 0  # the copy is still running
    listener = transfer.listen("tcp://127.0.0.1:0", StagingService(pool, "L"))
    with listener, transfer.connect(listener.address) as conn:
        frames = list(conn.stream("get", meta={"keys": [key(1).hex()]}))
    assert bytes(frames[0].payload) == bytes([9]) * (1 << 16)

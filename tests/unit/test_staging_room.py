from pdrun.pd.staging import StagingPool
from pdrun.pd.staging_room import StagingRoom
from pdrun.pd.stats import STAGING_CAPACITY, STAGING_LET_GO, PDStats


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_prefills_wait_while_unpulled_hand_offs_fill_the_pool_and_run_once_released():
    room = StagingRoom(workers=1, wait_s=30)
    room.reported(10, [])
    assert room.admit("a", 6) and room.admit("b", 4)  # 10 of 10 chunks
    assert not room.admit("c", 1)
    room.new_pass()
    assert not room.admit("c", 1)  # asked again next pass: still no room
    room.handed("a")
    room.reported(None, ["a"])  # a's decoder pulled and released it
    room.new_pass()
    assert room.admit("c", 1)
    assert room.take_deferred() == 1  # held back once, however many passes
    assert room.take_deferred() == 0


def test_the_oldest_waiting_prefill_goes_first():
    room = StagingRoom(workers=1, wait_s=30)
    room.reported(10, [])
    assert room.admit("a", 8)
    assert not room.admit("big", 5)
    assert not room.admit("small", 1)  # would fit, but waits behind the older one
    room.new_pass()
    room.reported(None, ["a"])
    assert room.admit("big", 5) and room.admit("small", 1)


def test_a_prefill_larger_than_the_pool_runs_alone():
    room = StagingRoom(workers=1, wait_s=30)
    room.reported(4, [])
    assert room.admit("a", 1)
    assert not room.admit("huge", 9)
    room.new_pass()
    room.reported(None, ["a"])
    assert room.admit("huge", 9)


def test_room_is_unbounded_until_a_worker_reports_the_capacity():
    room = StagingRoom(workers=1, wait_s=30)
    assert room.admit("a", 1000) and room.admit("b", 1000)


def test_a_hand_off_counts_until_every_rank_let_it_go():
    room = StagingRoom(workers=2, wait_s=30)
    room.reported(4, [])
    assert room.admit("a", 4)
    room.reported(None, ["a"])  # one of two ranks
    room.new_pass()
    assert not room.admit("b", 1)
    room.reported(None, ["a"])
    room.new_pass()
    assert room.admit("b", 1)


def test_a_hand_off_no_decoder_pulls_within_wait_s_stops_holding_room():
    clock = Clock()
    room = StagingRoom(workers=1, wait_s=30, clock=clock)
    room.reported(4, [])
    assert room.admit("a", 4)
    clock.now += 60  # still prefilling: it holds its room however long that takes
    assert not room.admit("b", 1)
    room.new_pass()
    room.handed("a")
    clock.now += 29
    assert not room.admit("b", 1)
    room.new_pass()
    clock.now += 2  # its decoder is late or gone: the pool evicts it if it must
    assert room.admit("b", 1)


def test_a_forgotten_prefill_holds_nothing():
    room = StagingRoom(workers=1, wait_s=30)
    room.reported(4, [])
    assert room.admit("a", 4)
    room.forget("a")  # aborted, or answered whole at its first token
    assert room.admit("b", 4) and len(room) == 1


def test_the_pool_reports_what_it_let_go():
    pool = StagingPool(budget_bytes=1000, ttl_s=60)
    pool.stage("a", b"k" * 16, 1, 100, lambda buf: None)
    pool.stage("b", b"l" * 16, 1, 100, lambda buf: None)
    pool.handed("a")
    pool.handed("nothing-staged")  # holds no room: let go at once
    assert pool.take_let_go() == ["nothing-staged"]
    pool.release("a")
    pool.release("a")  # released twice (decoder and proxy): reported once
    pool.release("never-staged")
    assert pool.take_let_go() == ["a"]
    pool.release("b")  # pulled and released before the worker learns it was handed
    pool.handed("b")
    assert pool.take_let_go() == ["b"]
    assert pool.take_let_go() == []


def test_the_stats_of_several_ranks_carry_the_smallest_room_and_every_release():
    a = PDStats(data={"staged_chunks": 2, STAGING_CAPACITY: 12, STAGING_LET_GO: ["x"]})
    b = PDStats(data={"staged_chunks": 3, STAGING_CAPACITY: 10, STAGING_LET_GO: ["x", "y"]})
    total = a.aggregate(b)
    assert total.data[STAGING_CAPACITY] == 10 and total.data[STAGING_LET_GO] == ["x", "x", "y"]
    assert total.reduce() == {"staged_chunks": 5}  # the room is for the scheduler, not the metrics

"""The cache tiers on real memory and real files: budgets under churn, restart persistence,
corrupt files dropped, a dead disk degrading to memory, and no torn reads under concurrency."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import xxhash

from pdrun.storage.tiers import DiskTier, MemoryTier, TieredStore

CHUNK = 4096


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(str(i).encode())


def payload(i: int, version: int = 0, size: int = CHUNK) -> bytes:
    seed = xxhash.xxh3_64_digest(f"{i}/{version}".encode())
    return (seed * (size // len(seed) + 1))[:size]


def test_memory_tier_keeps_its_budget_and_evicts_the_least_recently_used():
    mem = MemoryTier(budget_bytes=10 * CHUNK)
    for i in range(10):
        assert mem.put(key(i), payload(i), {"tokens": 256})
    assert mem.get(key(0)).data == payload(0)  # 0 is now the most recently used
    for i in range(10, 15):
        mem.put(key(i), payload(i))
    s = mem.stats()["memory"]
    assert s["bytes_used"] == 10 * CHUNK and s["entries"] == 10 and s["evictions"] == 5
    assert key(0) in mem and all(key(i) not in mem for i in range(1, 6))
    assert mem.get(key(0)).meta == {"tokens": 256}
    assert mem.lookup([key(0), key(6), key(7), key(1), key(8)]) == 3  # leading run only
    assert not mem.put(key(99), b"x" * (11 * CHUNK))  # larger than the whole budget


def test_memory_tier_reuses_the_slots_of_evicted_chunks():
    mem = MemoryTier(budget_bytes=4 * CHUNK)
    for i in range(100):
        assert mem.put(key(i), payload(i))
    assert mem.arena.used == 4 * CHUNK  # the budget's worth of slots, for 100 puts
    assert all(mem.get(key(i)).data == payload(i) for i in range(96, 100))
    mem.close()


def test_a_pinned_or_reserved_chunk_is_never_evicted_and_a_held_key_is_not_copied_again():
    mem = MemoryTier(budget_bytes=2 * CHUNK)
    mem.put(key(0), payload(0))
    (pinned,) = mem.pin([key(0)])
    writing = mem.reserve(key(1), CHUNK, {"i": 1})
    assert writing is not None and key(1) not in mem  # not served before it is committed
    assert mem.reserve(key(2), CHUNK) is None  # both slots pinned: no room, nothing evicted
    assert mem.reserve(key(0), CHUNK) is None and mem.put(key(0), payload(9))  # held: not copied again
    assert mem.get(key(0)).data == payload(0)
    mem.arena.view(writing.offset, CHUNK)[:] = payload(1)
    assert mem.commit(key(1)) and mem.get(key(1)).data == payload(1)
    mem.unpin([pinned])
    assert mem.put(key(2), payload(2))  # now 0, the least recently used, gives its slot
    assert key(0) not in mem and mem.get(key(2)).data == payload(2)
    assert mem.reserve(key(3), CHUNK) is not None  # evicts 1
    mem.abort(key(3))  # an abandoned reservation frees its slot
    assert key(3) not in mem and key(2) in mem and mem.stats()["memory"]["entries"] == 1
    assert mem.arena.used == CHUNK
    mem.close()


def test_disk_tier_survives_a_restart_and_rebuilds_its_index(tmp_path):
    disk = DiskTier(tmp_path, budget_bytes=100 * CHUNK)
    for i in range(5):
        assert disk.put(key(i), payload(i), {"layout": "L4", "i": i})
    again = DiskTier(tmp_path, budget_bytes=100 * CHUNK)
    assert again.lookup([key(i) for i in range(6)]) == 5
    assert all(again.get(key(i)).data == payload(i) for i in range(5))
    assert again.get(key(3)).meta == {"layout": "L4", "i": 3}
    assert again.stats()["disk"]["entries"] == 5


def test_the_disk_tier_creates_its_directories_owner_only(tmp_path):
    disk = DiskTier(tmp_path / "cache", budget_bytes=100 * CHUNK)
    assert disk.put(key(0), payload(0), {})
    made = [tmp_path / "cache", *(d for d in (tmp_path / "cache").iterdir() if d.is_dir())]
    assert len(made) >= 2 and all(d.stat().st_mode & 0o777 == 0o700 for d in made)


def test_disk_tier_keeps_its_budget_under_churn(tmp_path):
    disk = DiskTier(tmp_path, budget_bytes=8 * (CHUNK + 200))
    for i in range(50):
        disk.put(key(i), payload(i))
    s = disk.stats()["disk"]
    assert s["bytes_used"] <= 8 * (CHUNK + 200) and s["evictions"] >= 42
    files = list(tmp_path.glob("*/*.chunk"))
    assert len(files) == s["entries"] and sum(f.stat().st_size for f in files) == s["bytes_used"]
    assert disk.get(key(49)).data == payload(49) and disk.get(key(0)) is None


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "empty", "garbage-header", "other-key"])
def test_a_damaged_chunk_file_is_dropped_not_served(tmp_path, damage):
    disk = DiskTier(tmp_path, budget_bytes=100 * CHUNK)
    disk.put(key(1), payload(1))
    disk.put(key(2), payload(2))
    path = disk._path(key(1))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip-a-byte":
        raw[-CHUNK // 2] ^= 0x01
    elif damage == "empty":
        raw = bytearray()
    elif damage == "garbage-header":
        raw[:16] = b"\x00" * 16
    else:
        raw = bytearray(disk._path(key(2)).read_bytes())
    path.write_bytes(raw)
    assert disk.get(key(1)) is None
    assert not path.exists() and key(1) not in disk
    assert disk.stats()["disk"]["dropped_corrupt"] == 1
    assert disk.get(key(2)).data == payload(2)


def test_unfinished_writes_are_cleaned_up_at_start(tmp_path):
    disk = DiskTier(tmp_path, budget_bytes=100 * CHUNK)
    disk.put(key(1), payload(1))
    leftover = disk._path(key(2)).with_name("deadbeef.chunk.1234.tmp")
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"half a chunk")
    DiskTier(tmp_path, budget_bytes=100 * CHUNK)
    assert not leftover.exists()


def test_an_unwritable_directory_means_memory_only_with_a_warning(tmp_path, caplog):
    (tmp_path / "a-file").write_text("not a directory")
    store = TieredStore(MemoryTier(10 * CHUNK), DiskTier(tmp_path / "a-file" / "cache", 10 * CHUNK))
    assert store.disk.disabled and "memory only" in caplog.text and "cannot write" in caplog.text
    assert store.put(key(1), payload(1)) and store.get(key(1)).data == payload(1)
    store.close()


FULL_DISK = """
import resource, signal, sys, time
from pdrun.storage.tiers import DiskTier, MemoryTier, TieredStore
from tests.unit.test_tiers import CHUNK, key, payload
store = TieredStore(MemoryTier(10 * CHUNK), DiskTier(sys.argv[1], 100 * CHUNK, retry_s=0.2))
store.put(key(0), payload(0))
store.flush()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # from here on, a write past 1000 bytes fails
store.put(key(1), payload(1))
store.flush()
assert store.disk.disabled and store.stats()["disk"]["writable"] == 0, "disk tier still on"
store.put(key(2), payload(2))
assert [store.get(key(i)).data == payload(i) for i in range(3)] == [True] * 3
assert not list(__import__("pathlib").Path(sys.argv[1]).glob("*/*.tmp")), "temporary file left"
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again
deadline = time.monotonic() + 10
while store.disk.disabled and time.monotonic() < deadline:  # the idle writer probes every retry_s
    time.sleep(0.05)
store.put(key(3), payload(3))
store.flush()
assert not store.disk.disabled and key(3) in store.disk, "disk tier not back on"
assert store.stats()["disk"]["writable"] == 1
print("ok")
"""


def test_a_disk_that_fails_writes_means_memory_only_until_it_takes_writes_again(tmp_path):
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, cwd=root, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "disk cache tier off, memory only until a write succeeds" in r.stderr and "too large" in r.stderr
    assert "disk cache tier back on" in r.stderr


def test_tiered_store_writes_behind_and_promotes_disk_hits(tmp_path):
    store = TieredStore(MemoryTier(4 * CHUNK), DiskTier(tmp_path, 100 * CHUNK))
    for i in range(10):
        store.put(key(i), payload(i), {"i": i})
    store.flush()
    s = store.stats()
    assert s["memory"]["entries"] == 4 and s["disk"]["entries"] == 10
    assert store.lookup([key(i) for i in range(10)]) == 10
    chunk = store.get(key(0))  # from disk, then in memory
    assert chunk.data == payload(0) and chunk.meta == {"i": 0}
    assert key(0) in store.memory and store.stats()["disk"]["hits"] == 1
    store.close()
    reopened = TieredStore(MemoryTier(4 * CHUNK), DiskTier(tmp_path, 100 * CHUNK))
    assert reopened.get(key(7)).data == payload(7)
    reopened.close()


def test_concurrent_puts_and_gets_never_tear(tmp_path):
    store = TieredStore(MemoryTier(16 * CHUNK), DiskTier(tmp_path, 64 * (CHUNK + 200)))
    errors: list[str] = []

    def worker(w: int) -> None:
        for n in range(300):
            i = (w * 7 + n) % 40
            store.put(key(i), payload(i), {"i": i})
            j = (i + 5) % 40
            got = store.get(key(j))
            if got is not None and (got.data != payload(j) or got.meta != {"i": j}):
                errors.append(f"torn read of chunk {j}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock"
    store.close()
    assert not errors


def test_every_chunk_reaches_the_disk_while_memory_holds_it(tmp_path):
    store = TieredStore(MemoryTier(64 * CHUNK), DiskTier(tmp_path, 64 * (CHUNK + 200)))
    for i in range(20):
        assert store.put(key(i), payload(i))
    store.flush()
    assert store.disk is not None and store.disk.lookup([key(i) for i in range(20)]) == 20
    assert store.write_behind_dropped == 0
    store.close()

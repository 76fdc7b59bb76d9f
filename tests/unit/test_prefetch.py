"""Prefixes copied out of the arena ahead of their requests on the proxy's hint (pd/prefetch.py,
pd/proxy/hints.py), on a real cache server, arena, zmq sockets and a paged cache: a hinted prompt's
chunks are copied in, and the load that follows scatters them from there, alone or with the rest
from the arena, beside the steps and inside one."""

from __future__ import annotations

import json

import pytest

from pdrun.launch.systems import free_port
from pdrun.pd import plan
from pdrun.pd.connector import PDMetadata
from pdrun.pd.keys import chained_keys
from pdrun.pd.loader import LoadJob, TierPin
from pdrun.pd.loads import Loads
from pdrun.pd.prefetch import Prefetch
from pdrun.pd.proxy.body import parse_head
from pdrun.pd.proxy.hints import Hints
from pdrun.pd.stats import PDStats, StatsCounter
from pdrun.pd.tier import TierLink
from tests.unit.test_shared_tier import BLOCK, CHUNK, CHUNKS, DST, PER, SRC, pinned_loads, step, tier, until

SEED = b"s" * 16
TOKENS = list(range(100, 100 + CHUNKS * CHUNK + 2))  # the last two are computed, never looked up
KEYS = chained_keys(SEED, CHUNK, TOKENS[:-2], full_only=True)
DECODER = "http://127.0.0.1:9"
__all__ = ["tier"]  # the fixture, shared


@pytest.fixture
def hinted(tier):
    """The tier holding the prompt's chunks, a prefetch pool of `room` chunks and a proxy's hints to it."""
    server, t, cache, _ = tier
    t.store([(k, SRC[i * PER : (i + 1) * PER]) for i, k in enumerate(KEYS)])
    t.flush()
    made = []

    def make(room: int) -> tuple[Prefetch, Hints]:
        port = free_port()
        budget = room * cache.nbytes(PER)
        link = TierLink(t, lambda: None, 5.0)
        prefetch = Prefetch(cache, link, SEED, CHUNK, 0, budget, port, StatsCounter())
        hints = Hints({DECODER: f"tcp://127.0.0.1:{port}"})
        made.append((prefetch, hints))
        return prefetch, hints

    yield server, t, cache, make
    for prefetch, hints in made:
        hints.close()
        prefetch.close()


def copied(prefetch: Prefetch) -> int:
    """Chunks copied in, their pins let go."""
    return sum(f.checked.is_set() for f in list(prefetch._copies.values()))


def hint(hints: Hints, prefetch: Prefetch, chunks: int) -> None:
    """Hint the prompt as the proxy does (its first sends may go before the socket is connected)."""
    assert until(lambda: hints.send(DECODER, request(TOKENS))), "the hint never went"
    assert until(lambda: copied(prefetch) >= chunks), "never copied in"


def request(prompt: object, **fields: object) -> bytes:
    """A completion request's body, as the proxy sends it on."""
    return json.dumps({"model": "m", "prompt": prompt, "max_tokens": 4, **fields}).encode()


def job(pin: TierPin | None = None) -> LoadJob:
    tokens = CHUNKS * CHUNK
    chunks = plan.plan_load(KEYS, tokens, 0, tokens, DST, CHUNK, BLOCK)
    return LoadJob("", [], chunks, 0, tokens, DST, pin is not None, 0, pin)


def loaded(t, cache, prefetch: Prefetch) -> tuple[Loads, PDStats | None]:
    """The hinted prompt loaded beside the steps, its blocks checked byte for byte: the loads
    (for the caller to shut down) and the counters it moved."""
    loads, stats = pinned_loads(t, cache)
    loads.prefetch = prefetch
    loads.start(PDMetadata(loads={"r": job()}))
    assert until(lambda: loads.take_finished_loads() == {"r"})
    assert loads.take_load_errors() == set()
    for layer in cache.layers:
        assert layer[SRC].eq(layer[DST]).all()
    return loads, stats.take()


def test_a_hinted_prefix_is_loaded_from_its_copies_not_the_arena(hinted):
    server, t, cache, make = hinted
    prefetch, hints = make(room=CHUNKS)
    hint(hints, prefetch, CHUNKS)
    assert server.local.leases() == 0  # the copies' pins went as soon as they were done
    t.memory.zero_()  # the arena's bytes gone: only the copies hold the prompt now
    loads, taken = loaded(t, cache, prefetch)
    assert taken is not None and taken.data["cache_prefetched_tokens"] == CHUNKS * CHUNK
    assert copied(prefetch) == 0 and server.local.leases() == 0
    loads.shutdown()


def test_a_pool_too_small_copies_the_head_and_the_load_takes_the_rest_from_the_arena(hinted):
    server, t, cache, make = hinted
    prefetch, hints = make(room=4)
    hint(hints, prefetch, 4)
    assert prefetch.hint(None, TOKENS) == 0  # hinted again: its head stays, not its tail
    assert list(prefetch._copies) == KEYS[:4]
    loads, taken = loaded(t, cache, prefetch)
    assert taken is not None and taken.data["cache_loaded_tokens"] == CHUNKS * CHUNK
    assert taken.data["cache_prefetched_tokens"] == 4 * CHUNK
    assert server.local.leases() == 0
    loads.shutdown()


def test_a_copy_no_load_took_in_time_is_dropped_not_served(hinted, monkeypatch):
    """The pool bridges a request's front end; it is no second cache beside vLLM's own."""
    _, t, cache, make = hinted
    prefetch, hints = make(room=CHUNKS)
    hint(hints, prefetch, CHUNKS)
    monkeypatch.setattr("pdrun.pd.prefetch.COPY_TTL_S", 0.0)
    loads, taken = loaded(t, cache, prefetch)
    assert taken is not None and taken.data["cache_loaded_tokens"] == CHUNKS * CHUNK
    assert taken.data["cache_prefetched_tokens"] == 0
    assert prefetch.hint(None, TOKENS) == CHUNKS  # copied in again, not counted as held
    loads.shutdown()


def test_a_full_pool_keeps_an_earlier_hints_copies_for_its_load(hinted, monkeypatch):
    """Requests are scheduled in the order they came: a later prompt's hint does not take the pool
    from the earlier one's copies, which its load then finds whole."""
    _, t, cache, make = hinted
    later = list(range(5000, 5000 + CHUNKS * CHUNK + 2))
    later_keys = chained_keys(SEED, CHUNK, later[:-2], full_only=True)
    t.store([(k, SRC[i * PER : (i + 1) * PER]) for i, k in enumerate(later_keys)])
    t.flush()
    prefetch, hints = make(room=CHUNKS)
    hint(hints, prefetch, CHUNKS)
    assert prefetch.hint(None, later) == 0  # the pool is full of copies awaiting their load
    assert list(prefetch._copies) == KEYS
    loads, taken = loaded(t, cache, prefetch)
    assert taken is not None and taken.data["cache_prefetched_tokens"] == CHUNKS * CHUNK
    assert prefetch.hint(None, later) == CHUNKS  # the slots are free once the load has read them
    monkeypatch.setattr("pdrun.pd.prefetch.COPY_TTL_S", 0.0)
    assert prefetch.hint(None, TOKENS) == CHUNKS  # copies no load took in time make room
    loads.shutdown()


def test_a_load_inside_the_step_reads_the_copies_too(hinted):
    server, t, cache, make = hinted
    prefetch, hints = make(room=CHUNKS)
    hint(hints, prefetch, CHUNKS)
    lease, slots = t.client.read(KEYS)  # as the scheduler pins them at its lookup
    pin = TierPin(lease, t.client.info.token, [(s.offset, s.nbytes, s.meta) for s in slots])
    t.memory.zero_()
    loads, stats = pinned_loads(t, cache)
    loads.prefetch = prefetch
    assert step(loads, job(pin), cache) == set()
    for layer in cache.layers:
        assert layer[SRC].eq(layer[DST]).all()
    taken = stats.take()
    assert taken is not None and taken.data["cache_in_step_tokens"] == CHUNKS * CHUNK
    assert taken.data["cache_prefetched_tokens"] == CHUNKS * CHUNK
    assert server.local.leases() == 0
    loads.shutdown()


def test_only_completions_given_as_token_ids_are_hints(hinted):
    """The proxy sends a decoder-only completion's bytes as they came; the pool reads its prompt."""
    _, _, _, make = hinted
    prefetch, hints = make(room=CHUNKS)
    assert not hints.send("http://127.0.0.1:8", request(TOKENS))  # no hints taken there
    for bad in (
        request("text, tokenized by the instance"),
        request([1, -2]),  # not token ids: vLLM answers the request with why
        request([1.5, 2]),
        request(TOKENS, cache_salt=7),
        request([]),
        b'{"messages": [{"role": "user", "content": "hi"}]}',
        b"[1, 2]",
        b"{not json",
    ):
        assert prefetch.hint_request(bad) == 0, bad
    assert prefetch._copies == {}
    assert prefetch.hint_request(request(TOKENS, cache_salt=None)) == CHUNKS
    assert prefetch.hint_request(request(TOKENS, cache_salt="other")) == 0  # another salt: other keys
    assert "prompt" not in parse_head(request(TOKENS))  # the proxy itself leaves the ids unread

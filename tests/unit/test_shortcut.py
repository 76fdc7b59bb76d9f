"""The proxy's tier shortcut: the chunk keys it computes are the instances' own, and it takes a
request only where the tier holds the prompt but a short tail."""

from __future__ import annotations

import asyncio

import pytest

from pdrun.pd.keys import Fingerprint, chained_keys, chunk_keys
from pdrun.pd.proxy.shortcut import TierShortcut
from pdrun.pd.proxy.upstream import Upstream
from pdrun.storage.client import CacheClient
from pdrun.storage.server import CacheServer
from pdrun.storage.tiers import MemoryTier, TieredStore
from tests.unit.test_tiers import CHUNK, payload

FP = Fingerprint("m", "bfloat16", "cuda:[2,B,N,H,D]:bs16", chunk_size=256)
TOKENS = list(range(1160))  # an instance loads at most 1158 of them: 4 full chunks


@pytest.fixture
def tier():
    """A cache server holding the 4 chunks of TOKENS, as an instance stored them."""
    with CacheServer("tcp://127.0.0.1:0", TieredStore(MemoryTier(8 * CHUNK))) as server:
        client = CacheClient(server.address)
        for i, k in enumerate(chunk_keys(FP, TOKENS, full_only=True)):
            assert client.put(k, payload(i), {})
        yield client
        client.close()


def learned(tier: CacheClient, tail: int = 512) -> TierShortcut:
    s = TierShortcut(tier, tail)
    s.learn("m", {"pdrun": {"fingerprint": FP.seed().hex(), "chunk_size": FP.chunk_size}})
    return s


def held(s: TierShortcut, body: dict) -> tuple[int, int]:
    async def go():
        client = Upstream()
        try:
            return await s.held(client, "http://127.0.0.1:9", "/v1/completions", body)
        finally:
            await client.close()

    return asyncio.run(go())


def test_the_keys_from_a_seed_are_the_instances_keys():
    assert chained_keys(FP.seed(), 256, TOKENS, full_only=True) == chunk_keys(FP, TOKENS, full_only=True)


def test_it_finds_the_chunks_an_instance_stored_and_takes_a_short_tail_only(tier):
    s = learned(tier)
    assert held(s, {"model": "m", "prompt": TOKENS}) == (1160, 1024)
    assert held(s, {"prompt": TOKENS}) == (1160, 1024)  # no model named: the deployment's
    assert held(s, {"model": "m", "prompt": [7, *TOKENS[1:]]}) == (1160, 0)  # another prefix
    assert s.takes(1160, 1024)
    assert not s.takes(1600, 1024)  # 576 tokens for the decoder to compute: the prefill hop
    assert not s.takes(1160, 0)
    assert not learned(tier, tail=100).takes(1160, 1024)


def test_it_finds_nothing_before_it_knows_the_keys_or_for_a_prompt_shorter_than_a_chunk(tier):
    unknown = TierShortcut(tier, 512)
    assert held(unknown, {"model": "m", "prompt": TOKENS}) == (0, 0)
    unknown.learn("m", {"pdrun": {"fingerprint": "not hex", "chunk_size": 256}})  # ignored
    assert held(unknown, {"model": "m", "prompt": TOKENS}) == (0, 0)
    s = learned(tier)
    assert held(s, {"model": "m", "prompt": TOKENS[:200]}) == (0, 0)
    assert held(s, {"model": "m", "prompt": "a short text"}) == (0, 0)
    assert held(s, {"model": "other", "prompt": TOKENS}) == (0, 0)


def test_a_cache_salt_names_other_chunks(tier):
    s = learned(tier)
    assert chunk_keys(FP, TOKENS, salt="tenant-a") != chunk_keys(FP, TOKENS) != chunk_keys(FP, TOKENS, salt="b")
    assert chunk_keys(FP, TOKENS, salt="") == chunk_keys(FP, TOKENS)
    assert held(s, {"model": "m", "prompt": TOKENS, "cache_salt": "tenant-a"}) == (1160, 0)
    assert held(s, {"model": "m", "prompt": TOKENS, "cache_salt": 7}) == (0, 0)  # vLLM refuses it: no lookup


def test_text_it_cannot_tokenize_is_a_miss(tier):
    s = learned(tier)
    assert held(s, {"model": "m", "prompt": "word " * 400}) == (0, 0)  # no decoder at that address

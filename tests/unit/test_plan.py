"""The hand-off arithmetic, checked end to end on token-addressable fake caches."""

import random

import pytest
import torch

from pdrun.pd import plan
from pdrun.pd.codec import PagedKV
from pdrun.pd.keys import Fingerprint, chunk_keys


def fake_cache(num_blocks, block_size):
    # One "layer" whose slot holds the position of the token written there (0 = empty).
    return {"layer": torch.zeros(num_blocks, block_size)}


def write_tokens(cache, block_ids, num_tokens, block_size):
    for t in range(num_tokens):
        cache["layer"][block_ids[t // block_size], t % block_size] = t + 1


@pytest.mark.parametrize("seed", range(30))
def test_saves_then_loads_put_every_token_in_place(seed):
    rng = random.Random(seed)
    block_size = rng.choice([16, 32, 128])
    chunk_size = block_size * rng.choice([1, 2, 4])
    prompt = rng.randrange(2, 3000)
    handed = prompt - 1
    n_blocks = 200
    keys = chunk_keys(Fingerprint("m", "f", "l", chunk_size), list(range(handed)))

    # Producer: the prompt in scattered blocks, computed over several steps of chunked prefill.
    p_ids = rng.sample(range(n_blocks), -(-prompt // block_size))
    p_cache = fake_cache(n_blocks, block_size)
    write_tokens(p_cache, p_ids, prompt, block_size)
    producer = PagedKV(p_cache, n_blocks, block_size)
    staged, saved, computed = {}, 0, 0
    while computed < prompt:
        computed = min(prompt, computed + rng.randrange(1, 700))
        for s in plan.ready_saves("r", keys, handed, computed, saved, p_ids, chunk_size, block_size):
            buf = torch.empty(producer.nbytes(len(s.block_ids)), dtype=torch.uint8)
            producer.gather(s.block_ids, buf)
            staged[s.key] = (len(s.block_ids), buf)
            saved += 1
    assert saved == len(keys) == plan.num_chunks(handed, chunk_size)

    # Consumer: a local prefix hit of some whole blocks, the rest loaded into its own blocks.
    d_ids = rng.sample(range(n_blocks), -(-prompt // block_size))
    start = rng.randrange(0, handed // block_size + 1) * block_size
    d_cache = fake_cache(n_blocks, block_size)
    consumer = PagedKV(d_cache, n_blocks, block_size)
    loads = plan.plan_load(keys, handed, start, handed, d_ids, chunk_size, block_size)
    for c in loads:
        blocks, buf = staged[c.key]
        assert blocks == c.src_blocks
        consumer.scatter(c.block_ids, buf, c.src_blocks, c.skip_blocks)
    assert (loads[-1].token_end if loads else start) == handed
    got = [int(d_cache["layer"][d_ids[t // block_size], t % block_size]) for t in range(prompt)]
    assert got[start:handed] == list(range(start + 1, handed + 1))
    assert not any(got[:start])  # the local prefix is never overwritten


def test_only_computed_chunks_are_saved():
    keys = [bytes([i]) * 16 for i in range(3)]
    saves = plan.ready_saves(
        "r", keys, handed=600, computed=300, saved=0, block_ids=list(range(5)), chunk_size=256, block_size=128
    )
    assert [s.index for s in saves] == [0] and saves[0].block_ids == [0, 1]
    saves = plan.ready_saves(
        "r", keys, handed=600, computed=601, saved=1, block_ids=list(range(5)), chunk_size=256, block_size=128
    )
    assert [s.index for s in saves] == [1, 2] and saves[1].block_ids == [4]  # the partial last chunk


def test_failed_load_names_the_blocks_to_recompute():
    assert plan.blocks_from(256, 600, [7, 8, 9, 10, 11], 128) == {9, 10, 11}
    assert plan.blocks_from(600, 600, [7, 8, 9, 10, 11], 128) == set()


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="block size"):
        plan.plan_load([b"k" * 16], 100, 10, 100, [0], 256, 128)
    with pytest.raises(ValueError, match="bad load range"):
        plan.plan_load([b"k" * 16], 100, 0, 101, [0], 256, 128)


def test_full_chunks_from_cache_from_on_are_cached_and_partial_ones_never():
    keys = [bytes([i]) * 16 for i in range(3)]
    args = dict(handed=600, computed=601, saved=0, block_ids=list(range(5)), chunk_size=256, block_size=128)
    saves = plan.ready_saves("r", keys, **args, stage=True, cache_from=1)
    assert [(s.index, s.stage, s.cache) for s in saves] == [(0, True, False), (1, True, True), (2, True, False)]
    saves = plan.ready_saves("r", keys, **args, stage=False, cache_from=0)
    assert [(s.index, s.stage, s.cache) for s in saves] == [(0, False, True), (1, False, True), (2, False, False)]
    saves = plan.ready_saves("r", keys, **args, stage=True)
    assert not any(s.cache for s in saves)  # no cache tier


def test_a_tier_lookup_asks_for_the_full_chunks_up_to_the_last_block_computed_here():
    # 16384 tokens: the last two are computed here, so a load places 16368 (the last block is the
    # request's own) and the lookup still asks for all 64 chunks, the last one loaded in part.
    assert plan.tier_reach(16384, 256, 16) == (64, 16368)
    assert plan.tier_reach(16384 + 100, 256, 16) == (64, 16480)  # the partial chunk at the end: not in the tier
    assert plan.tier_reach(256, 256, 16) == (1, 240)
    assert plan.tier_reach(1, 256, 16) == (0, 0)

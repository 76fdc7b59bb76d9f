"""Which blocks make which chunk: the arithmetic of a hand-off, free of vLLM.

Tokens [a, b) of a request live in the blocks at positions [a // block_size, ceil(b / block_size))
of its block list. Chunk c of a hand-off of `handed` tokens covers tokens
[c * chunk_size, min((c + 1) * chunk_size, handed)); chunk_size is a multiple of block_size, so
chunks start on block boundaries and only the last one may end inside a block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdrun.pd.keys import chained_keys


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def computed_here(continues: bool) -> int:
    """The prompt tokens an instance computes itself after loading the rest. vLLM computes at
    least the last one. A decoder that continues after the prefiller's first token computes just
    that token's position, as one vLLM's next decode step does. An instance that samples the
    first output token itself computes the prompt's last two: a one-token step may run a decode
    kernel that sums in another order than the prefill it replaces, and a near tie then goes the
    other way."""
    return 1 if continues else 2


def tier_reach(prompt_len: int, chunk_size: int, block_size: int) -> tuple[int, int]:
    """What a lookup in the cache tier asks for a prompt of `prompt_len` tokens computed here from
    its start: its leading full chunks (the tier holds no partial one), and the tokens a load may
    place, up to the last whole block this instance does not compute itself."""
    limit = max(0, prompt_len - computed_here(False))
    limit -= limit % block_size
    return min(prompt_len // chunk_size, num_chunks(limit, chunk_size)), limit


def chunk_token_range(index: int, handed: int, chunk_size: int) -> tuple[int, int]:
    start = index * chunk_size
    return start, min(start + chunk_size, handed)


def num_chunks(handed: int, chunk_size: int) -> int:
    return _ceil_div(handed, chunk_size)


@dataclass(frozen=True)
class ChunkSave:
    """Copy these blocks out as chunk `key` of `transfer`: into the staging pool for a decoder
    (`stage`), and behind to the cache tier (`cache`)."""

    transfer: str
    index: int
    key: bytes
    block_ids: list[int]
    stage: bool = True
    cache: bool = False


@dataclass(frozen=True)
class ChunkLoad:
    """Consumer: chunk `key` (`src_blocks` blocks as staged) goes, minus its first `skip_blocks`
    blocks, into `block_ids`; after it, tokens [0, token_end) are in place."""

    key: bytes
    src_blocks: int
    skip_blocks: int
    block_ids: list[int]
    token_end: int


def ready_saves(
    transfer: str,
    keys: Sequence[bytes],
    handed: int,
    computed: int,
    saved: int,
    block_ids: Sequence[int],
    chunk_size: int,
    block_size: int,
    *,
    stage: bool = True,
    cache_from: int | None = None,
) -> list[ChunkSave]:
    """The chunks after the first `saved` whose tokens are all computed now. Each is staged if
    `stage`, and cached if it is full and its index is `cache_from` or later (None: none is)."""
    out = []
    for index in range(saved, len(keys)):
        start, end = chunk_token_range(index, handed, chunk_size)
        if end > computed:
            break
        cache = cache_from is not None and index >= cache_from and end - start == chunk_size
        ids = list(block_ids[start // block_size : _ceil_div(end, block_size)])
        out.append(ChunkSave(transfer, index, keys[index], ids, stage=stage, cache=cache))
    return out


def answer_saves(
    transfer: str,
    tokens: Sequence[int],
    computed: int,
    start: int,
    prev_key: bytes,
    block_ids: Sequence[int],
    chunk_size: int,
    block_size: int,
) -> list[ChunkSave]:
    """Chunks `start` and on of a request's tokens past its prompt's full chunks (the prompt's last
    chunk completed by the answer, then the answer's own), for the cache tier, as far as they are
    full, computed and known: `tokens` are the ids so far, of which the first `computed` have
    their KV in `block_ids` (a decode step may compute a token's KV before the scheduler knows the
    token, and knows a sampled token before its KV is computed). `prev_key`: the key of chunk
    `start - 1`, which the keys of these chain on."""
    end = min(computed, len(tokens), len(block_ids) * block_size) // chunk_size
    if end <= start:
        return []
    keys = chained_keys(prev_key, chunk_size, tokens[start * chunk_size : end * chunk_size])
    per_chunk = chunk_size // block_size
    return [
        ChunkSave(
            transfer,
            start + i,
            key,
            list(block_ids[(start + i) * per_chunk : (start + i + 1) * per_chunk]),
            stage=False,
            cache=True,
        )
        for i, key in enumerate(keys)
    ]


def plan_load(
    keys: Sequence[bytes],
    handed: int,
    start: int,
    end: int,
    block_ids: Sequence[int],
    chunk_size: int,
    block_size: int,
) -> list[ChunkLoad]:
    """Chunks to pull so that tokens [start, end) land in `block_ids`; `start` is block aligned
    (what is before it is already here) and `end` <= `handed`."""
    if start % block_size:
        raise ValueError(f"load start {start} is not a multiple of the block size {block_size}")
    if not 0 <= start <= end <= handed:
        raise ValueError(f"bad load range [{start}, {end}) of {handed} handed tokens")
    plan = []
    for index in range(start // chunk_size, num_chunks(end, chunk_size)):
        c_start, c_end = chunk_token_range(index, handed, chunk_size)
        lo, hi = max(start, c_start), min(end, c_end)
        plan.append(
            ChunkLoad(
                key=keys[index],
                src_blocks=_ceil_div(c_end - c_start, block_size),
                skip_blocks=(lo - c_start) // block_size,
                block_ids=list(block_ids[lo // block_size : _ceil_div(hi, block_size)]),
                token_end=hi,
            )
        )
    return plan


def blocks_from(token: int, end: int, block_ids: Sequence[int], block_size: int) -> set[int]:
    """The blocks holding tokens [token, end): what must be recomputed when a load stops at `token`."""
    if token >= end:
        return set()
    return set(block_ids[token // block_size : _ceil_div(end, block_size)])

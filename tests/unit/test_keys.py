import os
import random
import subprocess
import sys

import pytest

from pdrun.pd.keys import Fingerprint, chunk_keys, matching_prefix, rank_key

FP = Fingerprint(model="m", dtype="float32", layout="cpu:bs128", chunk_size=4)


def test_keys_match_the_golden_values():
    # Changing the key scheme silently would orphan every cache on disk: it must be deliberate.
    assert [k.hex() for k in chunk_keys(FP, list(range(10)))] == [
        "0847acd8c21a4b2714df56af4071a2ea",
        "060549ed603962d4a88afca82d9c9194",
        "380f6d350a430295a2fd2387273b25b2",
    ]


def test_same_keys_in_another_process_with_another_hash_seed():
    code = (
        "from pdrun.pd.keys import Fingerprint, chunk_keys;"
        "fp = Fingerprint(model='m', dtype='float32', layout='cpu:bs128', chunk_size=4);"
        "print(','.join(k.hex() for k in chunk_keys(fp, list(range(10)))))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().split(",") == [k.hex() for k in chunk_keys(FP, list(range(10)))]


def test_a_key_names_the_whole_prefix():
    a = list(range(100, 112))
    b = [*a[:4], 999, *a[5:]]  # differs in chunk 1 only
    ka, kb = chunk_keys(FP, a), chunk_keys(FP, b)
    assert ka[0] == kb[0]
    assert ka[1] != kb[1] and ka[2] != kb[2]  # every later key changes too
    assert matching_prefix(ka, kb) == 1
    assert chunk_keys(FP, a[:8]) == ka[:2]


def test_partial_chunk_has_its_own_key_and_full_only_drops_it():
    tokens = list(range(10))
    keys = chunk_keys(FP, tokens)
    assert len(keys) == 3
    assert chunk_keys(FP, tokens, full_only=True) == keys[:2]
    assert chunk_keys(FP, [*tokens, 10, 11])[2] != keys[2]


@pytest.mark.parametrize(
    "other",
    [
        Fingerprint(model="m2", dtype="float32", layout="cpu:bs128", chunk_size=4),
        Fingerprint(model="m", dtype="bfloat16", layout="cpu:bs128", chunk_size=4),
        Fingerprint(model="m", dtype="float32", layout="cuda:bs16", chunk_size=4),
        Fingerprint(model="m", dtype="float32", layout="cpu:bs128", chunk_size=8),
        Fingerprint(model="m", dtype="float32", layout="cpu:bs128", chunk_size=4, tp_size=2),
        Fingerprint(model="m", dtype="float32", layout="cpu:bs128", chunk_size=4, tp_rank=1, tp_size=2),
        Fingerprint(model="m", dtype="float32", layout="cpu:bs128", chunk_size=4, extra="rev2"),
    ],
)
def test_different_models_or_layouts_never_share_keys(other):
    tokens = list(range(16))
    assert not set(chunk_keys(FP, tokens)) & set(chunk_keys(other, tokens))


def test_no_collisions_among_many_prompts():
    rng = random.Random(0)
    seen = set()
    n = 0
    for _ in range(2000):
        tokens = [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
        for i, k in enumerate(chunk_keys(FP, tokens)):
            seen.add((k, tuple(tokens[: (i + 1) * 4])))
            n += 1
    keys = {k for k, _ in seen}
    prefixes = {p for _, p in seen}
    assert len(keys) == len(prefixes)  # one key per distinct prefix, and no two prefixes share one


def test_bad_input_is_refused():
    with pytest.raises(OverflowError):
        chunk_keys(FP, [1, -2, 3])
    with pytest.raises(ValueError):
        chunk_keys(Fingerprint(model="m", dtype="f", layout="l", chunk_size=0), [1])


def test_each_tp_rank_has_its_own_cache_key_and_rank_0_keeps_the_chunk_key():
    k = chunk_keys(FP, list(range(256)))[0]
    assert rank_key(k, 0) == k
    ranks = {rank_key(k, r) for r in range(8)}
    assert len(ranks) == 8 and all(len(r) == 16 for r in ranks)
    assert rank_key(k, 3) == rank_key(k, 3)

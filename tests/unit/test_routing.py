"""Routing policies: turns, least outstanding, prefix affinity that survives a prefiller leaving, and
decoders picked by the prompts they were sent."""

from __future__ import annotations

import pytest

from pdrun.pd.proxy.prefixes import SentPrefixes, pieces
from pdrun.pd.proxy.routing import Router, affinity_key, prompt_tokens

P = [f"http://p{i}:8000" for i in range(4)]
D = ["http://d0:8000", "http://d1:8000"]


def router(policy: str, prefill=P, decode=D) -> Router:
    r = Router(prefill, decode, policy)  # type: ignore[arg-type]
    for b in r.backends:
        b.mark_up(["m"])
    return r


def test_round_robin_takes_turns():
    r = router("round_robin")
    assert [r.pick_decoder().url for _ in range(4)] == [D[0], D[1], D[0], D[1]]


def test_least_outstanding_prefers_the_idle_and_rotates_ties():
    r = router("least_outstanding")
    r.decoders[0].outstanding = 3
    assert {r.pick_decoder().url for _ in range(5)} == {D[1]}
    r.decoders[0].outstanding = 0
    assert {r.pick_decoder().url for _ in range(4)} == set(D)


def test_out_of_rotation_and_excluded_backends_are_skipped():
    r = router("least_outstanding")
    r.decoders[1].mark_down("gone")
    assert r.pick_decoder().url == D[0]
    assert r.pick_decoder(exclude=[r.decoders[0]]) is None
    for p in r.prefillers:
        p.mark_down("gone")
    assert r.pick_prefiller({"prompt": "x"}) is None
    assert r.models() == {"m"}  # the decoder still up


def test_prefix_aware_sends_a_shared_prefix_to_one_prefiller_and_spreads_the_rest():
    r = router("prefix_aware")
    head = "system: you are helpful. " * 100
    chosen = {r.pick_prefiller({"prompt": head + f"question {i}"}).url for i in range(20)}
    assert len(chosen) == 1  # the first 1024 characters decide
    spread = {r.pick_prefiller({"prompt": f"{i} unrelated prompt"}).url for i in range(200)}
    assert spread == set(P)


def test_prefix_aware_moves_a_hot_prefix_on_only_when_its_prefiller_has_over_its_share():
    r = router("prefix_aware")
    head = {"prompt": "system: you are helpful. " * 100}
    home = r.pick_prefiller(head, 1000)
    # Requests of the hot prefix arrive and stay in flight: its prefiller takes them until it holds
    # 1.25x the mean of the prompt tokens in flight, the next ones go to others.
    placed = []
    for _ in range(40):
        b = r.pick_prefiller(head, 1000)
        b.pending_tokens += 1000
        placed.append(b)
    mean = sum(b.pending_tokens for b in r.prefillers) / len(P)
    assert placed[0] is home and home.pending_tokens <= 1.25 * mean
    assert len({b.url for b in placed}) > 1  # spilled over
    assert all(b.pending_tokens <= 1.25 * mean for b in r.prefillers)  # no prefiller over its bound
    # Once the load is gone the prefix goes home again.
    for b in r.prefillers:
        b.pending_tokens = 0
    assert r.pick_prefiller(head, 1000) is home


def test_prompt_tokens_count_ids_and_estimate_text():
    assert prompt_tokens({"prompt": list(range(300))}) == 300
    assert prompt_tokens({"prompt": "x" * 400}) == 101
    assert prompt_tokens({"messages": [{"role": "user", "content": "y" * 80}, "junk"]}) == 21
    assert prompt_tokens({"prompt": None}) == 1


def test_prefix_aware_moves_only_the_prompts_of_a_prefiller_that_left():
    r = router("prefix_aware")
    bodies = [{"prompt": f"prompt number {i}"} for i in range(300)]
    before = [r.pick_prefiller(b).url for b in bodies]
    r.prefillers[2].mark_down("gone")
    after = [r.pick_prefiller(b).url for b in bodies]
    for a, b in zip(before, after, strict=True):
        assert a == b or a == P[2]
    assert P[2] not in after


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"prompt": "abc"}, b"abc"),
        ({"prompt": ["abc", "def"]}, b"abc"),
        ({"prompt": [1, 2, 3]}, b"1,2,3"),
        ({"messages": [{"role": "user", "content": "hi"}]}, b'[{"content": "hi", "role": "user"}]'),
    ],
)
def test_affinity_key_reads_every_prompt_form(body, key):
    assert affinity_key(body) == key


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        Router(P, D, "fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decoder"):
        Router(P, [], "round_robin")


def test_a_request_without_a_hand_off_goes_to_the_decoder_that_was_sent_most_of_its_prompt():
    r = router("prefix_aware")
    turn1 = {"prompt": list(range(1000, 1700))}  # 2 whole pieces
    first = r.pick_decoder(prompt=pieces(turn1))
    r.sent_to(first, pieces(turn1))
    other = next(d for d in r.decoders if d is not first)
    # The next turn (the history and more) goes where the history is, every time: without the
    # prefix the decoders would take turns.
    turn2 = {"prompt": turn1["prompt"] + list(range(5000, 5300))}
    assert [r.pick_decoder(prompt=pieces(turn2)) for _ in range(4)] == [first] * 4
    # A prompt it does not share, and a request with a hand-off (no pieces), go by load as before.
    fresh = pieces({"prompt": list(range(9000, 9600))})
    assert {r.pick_decoder(prompt=fresh).url for _ in range(4)} == set(D)
    first.outstanding = 1
    assert r.pick_decoder() is other
    # A decoder keeps its prompts until it holds more than 1.25x its share of the requests in
    # flight and one more; past that, the least loaded takes them.
    assert r.pick_decoder(prompt=pieces(turn2)) is first  # 2 of 2 in flight: within 1.25 x 1 + 1
    first.outstanding = 2
    assert r.pick_decoder(prompt=pieces(turn2)) is other  # 3 of 3: past 1.25 x 1.5 + 1
    other.outstanding = 2
    assert r.pick_decoder(prompt=pieces(turn2)) is first
    # Other policies, and one decoder, keep nothing.
    for kept in (router("least_outstanding"), Router(P, D[:1], "prefix_aware")):
        kept.sent_to(kept.decoders[0], pieces(turn1))
        assert len(kept.sent) == 0


def test_a_prompt_is_named_by_its_whole_pieces_in_every_form():
    ids = list(range(100, 900))
    assert len(pieces({"prompt": ids})) == 3  # 800 ids: 3 whole pieces of 256
    assert pieces({"prompt": ids + [7] * 100})[:3] == pieces({"prompt": ids})  # a longer prompt shares them
    new_head = pieces({"prompt": [5, *ids[1:]]})
    assert not set(new_head) & set(pieces({"prompt": ids}))  # chained: another head, no piece the same
    text = "word " * 500
    assert len(pieces({"prompt": text})) == 2 and pieces({"prompt": text + "more"}) == pieces({"prompt": text})
    chat = [{"role": "user", "content": "x" * 3000}]
    assert pieces({"messages": [*chat, {"role": "assistant", "content": "y"}]})[:2] == pieces({"messages": chat})[:2]
    for odd in ({"prompt": [[1, 2]]}, {"prompt": [-1] * 300}, {"prompt": [1.5] * 300}, {"prompt": None}, {}):
        assert pieces(odd) == []


def test_what_decoders_were_sent_is_bounded_and_keeps_prompts_heads_longest():
    kept = SentPrefixes(capacity=10)
    a, b = pieces({"prompt": list(range(8 * 256))}), pieces({"prompt": list(range(1, 1 + 8 * 256))})
    kept.sent(1, a)
    kept.sent(1, b)
    assert len(kept) == 10
    assert kept.depth(1, b) == 8 and kept.depth(1, a) == 2  # a's head outlived its tail
    assert kept.depth(2, b) == 0  # another decoder was sent none of it

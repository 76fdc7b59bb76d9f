import pytest
from pydantic import ValidationError

from pdrun.pd.params import HandOff, handoff_of, handoff_params, wants_handoff

GOOD = dict(
    endpoints=["tcp://127.0.0.1:1"],
    transfer="r1",
    num_tokens=300,
    keys=["ab" * 16, "cd" * 16],
    fingerprint="ef" * 16,
    chunk_size=256,
)


def test_round_trip():
    h = HandOff(**GOOD)
    params = handoff_params(h)
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert handoff_of(params) == h
    assert h.key_bytes() == [bytes.fromhex("ab" * 16), bytes.fromhex("cd" * 16)]


def test_absent_is_none():
    assert handoff_of(None) is None
    assert handoff_of({"do_remote_decode": True}) is None
    assert handoff_of({"do_remote_prefill": False, "pdrun": GOOD}) is None
    assert wants_handoff({"do_remote_decode": True}) and not wants_handoff({"do_remote_decode": "yes"})
    assert not wants_handoff(None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("keys", ["xyz"]),
        ("num_tokens", -1),
        ("endpoints", []),
        ("fingerprint", "short"),
        ("chunk_size", 0),
        ("surprise", 1),
    ],
)
def test_malformed_is_a_validation_error(field, value):
    with pytest.raises(ValidationError):
        handoff_of({"do_remote_prefill": True, "pdrun": {**GOOD, field: value}})

"""What the proxy accepts, and which requests it cannot hand off."""

from __future__ import annotations

import json

import pytest

from pdrun.pd.proxy.body import BadRequest, decode_only_reason, parse_body
from pdrun.pd.proxy.continuation import CHAT, COMPLETIONS


def parse(body, path=COMPLETIONS):
    return parse_body(body if isinstance(body, bytes) else json.dumps(body).encode(), path)


@pytest.mark.parametrize(
    ("raw", "path", "says", "param"),
    [
        (b"{", COMPLETIONS, "not valid JSON", None),
        (b"\xff\xfe", COMPLETIONS, "not valid JSON", None),
        (b'"text"', COMPLETIONS, "must be a JSON object, not str", None),
        (b'{"model": "m"}', COMPLETIONS, "'prompt': Field required", "prompt"),
        (b'{"prompt": "x", "max_tokens": -1}', COMPLETIONS, "'max_tokens'", "max_tokens"),
        (b'{"prompt": "x", "n": 0}', COMPLETIONS, "'n'", "n"),
        (b'{"prompt": {"a": 1}}', COMPLETIONS, "'prompt'", "prompt"),
        (b'{"prompt": [1, "x"]}', COMPLETIONS, "'prompt'", "prompt"),
        (b'{"prompt": [1, 2], "max_tokens": "many"}', COMPLETIONS, "'max_tokens'", "max_tokens"),
        (b'{"prompt": "x", "stream": "maybe"}', COMPLETIONS, "'stream'", "stream"),
        (b'{"prompt": "x", "kv_transfer_params": {"do_remote_prefill": true}}', COMPLETIONS, "set by the proxy",
         "kv_transfer_params"),
        (b'{"messages": []}', CHAT, "'messages'", "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}', CHAT,
         "'max_completion_tokens'", "max_completion_tokens"),
    ],
)  # fmt: skip
def test_bad_bodies_are_refused_with_the_field_named(raw, path, says, param):
    with pytest.raises(BadRequest, match=None) as e:
        parse_body(raw, path)
    assert says in str(e.value)
    assert e.value.param == param and e.value.status == 400


def test_good_bodies_pass_untouched_with_unknown_fields():
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 5, "top_k": 3, "vendor_field": {"x": 1}}
    assert parse(body) == body
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert parse(chat, CHAT) == chat


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"prompt": "x"}, None),
        ({"prompt": ["only one"]}, None),
        ({"prompt": [[1, 2], [3]]}, "batched prompts"),
        ({"prompt": ["a", "b"]}, "batched prompts"),
        ({"prompt": "x", "n": 2}, "n > 1"),
        ({"prompt": "x", "best_of": 3}, "n > 1"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "prompt logprobs"),
        ({"prompt": "x", "prompt_logprobs": 0}, "prompt logprobs"),
        ({"prompt": "x", "echo": True}, None),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens = 0"),
    ],
)
def test_requests_a_hand_off_cannot_serve_go_to_a_decoder_alone(body, reason):
    assert decode_only_reason(body) == reason

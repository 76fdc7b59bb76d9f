"""When a streamed completion may take its first token from the prefiller, the decoder's request
that continues after it, and the decoder's stream rewritten as the rest of the client's."""

from __future__ import annotations

import json

import pytest

from pd.first_token import Continuation, eligible, first_token


def answer(text="ab", finish="length", ids=(42,), prompt_ids=(1, 2, 3)):
    """A prefiller's non-streamed answer with return_token_ids, as vLLM gives it."""
    choice = {
        "index": 0,
        "text": text,
        "finish_reason": finish,
        "token_ids": list(ids),
        "prompt_token_ids": list(prompt_ids),
    }
    return {"id": "cmpl-p", "object": "text_completion", "created": 7, "model": "m", "choices": [choice]}


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"stream": True}, True),
        ({"stream": True, "max_tokens": None}, True),
        ({"stream": False}, False),  # no first token to hurry: one answer
        ({"stream": True, "max_tokens": 1}, False),  # nothing left for a decoder
        ({"stream": True, "logprobs": 0}, False),  # the prefiller computes none
        ({"stream": True, "seed": 3, "temperature": 0.8}, False),  # one generator for every token
        ({"stream": True, "seed": 3, "temperature": 0}, True),
        ({"stream": True, "truncate_prompt_tokens": 100}, False),
        ({"stream": True, "echo": True}, False),  # the decoder would echo the first token as prompt
        ({"stream": True, "structured_outputs": {"json": {}}}, False),  # a grammar started after the token
        ({"stream": True, "response_format": {"type": "json_object"}}, False),
        ({"stream": True, "presence_penalty": 0.5}, False),  # counts output tokens, the first among them
        ({"stream": True, "presence_penalty": 0, "repetition_penalty": 1.2}, True),  # prompt and output alike
    ],
)
def test_which_requests_take_the_prefillers_token(body, ok):
    assert eligible(body) is ok


@pytest.mark.parametrize(
    ("kw", "body"),
    [
        ({"finish": "stop"}, {}),  # an end of sequence, possibly under min_tokens the prefiller was not given
        ({"text": "\ufffd"}, {}),  # part of a UTF-8 sequence
        ({"text": ""}, {}),
        ({"ids": (4, 5)}, {}),
        ({"text": "x\n"}, {"stop": ["\n\n"]}),  # a stop string could start in it
        ({"text": "ab"}, {"stop": "bc"}),
    ],
)
def test_no_continuation_where_it_would_not_be_exact(kw, body):
    assert first_token(body, answer(**kw)) is None


def test_the_decoder_goes_on_after_the_token_with_one_token_fewer():
    body = {"model": "m", "prompt": "hello", "stream": True, "min_tokens": 3, "stop": ["zz"]}
    first = first_token(body, answer(text="ab"))
    assert first is not None
    params = {"do_remote_prefill": True}
    d = first.decoder_body(body, params)
    assert d["prompt"] == [1, 2, 3, 42] and d["max_tokens"] == 15 and d["min_tokens"] == 2  # vLLM's default 16
    assert d["kv_transfer_params"] is params and d["stop"] == ["zz"] and body["prompt"] == "hello"
    assert first.decoder_body({**body, "max_tokens": None}, params)["max_tokens"] is None
    event = first.event({**body, "return_token_ids": True, "stream_options": {"continuous_usage_stats": True}})
    data = json.loads(event.removeprefix(b"data: ").removesuffix(b"\n\n"))
    assert data["id"] == "cmpl-p" and data["choices"][0]["text"] == "ab"
    assert data["choices"][0]["token_ids"] == [42] and data["choices"][0]["prompt_token_ids"] == [1, 2, 3]
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def test_the_decoders_stream_reads_as_the_rest_of_the_clients():
    first = first_token({}, answer())
    assert first is not None
    events = [
        {"id": "cmpl-d", "choices": [{"index": 0, "text": "c", "prompt_token_ids": [1, 2, 3, 42], "token_ids": [9]}]},
        {"id": "cmpl-d", "choices": [{"index": 0, "text": "d", "finish_reason": "length"}]},
        {"id": "cmpl-d", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
    ]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    rest = Continuation(first)
    fed = [rest.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)]  # events split anywhere
    out = b"".join(part for part, _ in fed) + rest.flush()
    got = out.split(b"\n\n")
    assert got[-2:] == [b"data: [DONE]", b""]
    datas = [json.loads(e.removeprefix(b"data: ")) for e in got[:-2]]
    assert [d["id"] for d in datas] == ["cmpl-p"] * 3
    assert datas[0]["choices"][0] == {"index": 0, "text": "c", "token_ids": [9]}  # the prompt ids came first
    assert datas[2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert [data for _, seen in fed for data in seen] == datas  # what the proxy's clocks read, parsed once

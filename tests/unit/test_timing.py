"""The proxy's per-request timing: the SSE reading behind TTFT and TPOT, and the connectors' reports."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdrun.pd.params import TIMING
from pdrun.pd.proxy.app import _prefill_timing, _take_decoder_timing
from pdrun.pd.proxy.timing import RequestTiming, SSEEvents, StreamClock, TimingLog


def event(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


COMPLETION_STREAM = [
    event({"choices": [{"index": 0, "text": " one"}]}),
    event({"choices": [{"index": 0, "text": " two"}]}),
    event({"choices": [{"index": 0, "text": " three", "finish_reason": "length"}]}),
    event({"choices": [], "usage": {"completion_tokens": 3}}),
    event("[DONE]"),
]
CHAT_STREAM = [
    event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
    event({"choices": [{"index": 0, "delta": {"content": "a"}}]}),
    event({"choices": [{"index": 0, "delta": {"content": "b"}}]}),
    event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    event("[DONE]"),
]


@pytest.mark.parametrize(("stream", "tokens"), [(COMPLETION_STREAM, 3), (CHAT_STREAM, 2)])
@pytest.mark.parametrize("cut", [1, 7, 50])
def test_stream_clock_times_token_events_however_the_bytes_are_cut(stream, tokens, cut):
    clock = StreamClock()
    for i, ev in enumerate(stream):  # event i arrives at time 10 + i, in pieces of `cut` bytes
        for start in range(0, len(ev), cut):
            clock.feed(ev[start : start + cut], 10.0 + i)
    assert clock.events == tokens
    first_token_event = 0 if stream is COMPLETION_STREAM else 1
    assert clock.first == 10.0 + first_token_event
    assert clock.last == 10.0 + first_token_event + tokens - 1
    assert clock.per_token == pytest.approx(1.0)
    # All in one piece: the same events, at one time.
    whole = StreamClock()
    whole.feed(b"".join(stream), 5.0)
    assert (whole.events, whole.first, whole.last, whole.per_token) == (tokens, 5.0, 5.0, 0.0)


SSE_BYTES = st.lists(st.sampled_from([b"a", b"{", b"\n"]), max_size=40).map(b"".join)


@given(SSE_BYTES, st.lists(st.integers(0, 40), max_size=6))
def test_sse_events_are_the_stream_split_at_blank_lines_however_the_bytes_are_cut(data, cuts):
    pieces = [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)]
    events = SSEEvents()
    seen = [e for piece in pieces for e in events.feed(piece)]
    *whole, rest = data.split(b"\n\n")
    assert (seen, events.rest()) == (whole, rest)


def test_one_token_has_no_per_token_time():
    clock = StreamClock()
    clock.feed(COMPLETION_STREAM[0] + event("[DONE]"), 1.0)
    assert clock.events == 1 and clock.per_token is None


def test_prefill_time_splits_into_queue_and_compute():
    t = RequestTiming("r", "/v1/completions", stream=False)
    answer = {"usage": {"prompt_tokens": 300}, "kv_transfer_params": {TIMING: {"queued_s": 0.1, "prefill_s": 0.25}}}
    _prefill_timing(t, answer, round_trip=0.4)
    assert (t.prefill, t.queue, t.prompt_tokens) == (0.25, pytest.approx(0.15), 300)
    # No report (or one that cannot be true): the whole round trip is the prefill, queue unknown.
    for params in ({}, {TIMING: {"prefill_s": 9.0}}, {TIMING: {"prefill_s": "x"}}):
        t = RequestTiming("r", "/v1/completions", stream=False)
        _prefill_timing(t, {"kv_transfer_params": params}, round_trip=0.4)
        assert (t.prefill, t.queue) == (0.4, None)


def test_the_decoders_report_is_recorded_and_the_answer_is_plain_vllms():
    t = RequestTiming("r", "/v1/completions", stream=False)
    answer = {
        "choices": [{"text": "hi"}],
        "usage": {"completion_tokens": 7},
        "kv_transfer_params": {TIMING: {"queued_s": 0.01, "load_s": 0.02}},
    }
    out = json.loads(_take_decoder_timing(t, json.dumps(answer).encode()))
    assert out == {**answer, "kv_transfer_params": None}
    assert (t.handoff, t.decoder_queue, t.output_tokens) == (0.02, 0.01, 7)
    # Anything else passes byte for byte.
    for raw in (b'{"choices": []}', b"not json " + TIMING.encode(), json.dumps({"kv_transfer_params": None}).encode()):
        assert _take_decoder_timing(RequestTiming("r", "/", stream=False), raw) == raw


def test_timing_log_keeps_the_last_records():
    log = TimingLog(capacity=3)
    for i in range(5):
        log.add(RequestTiming(str(i), "/v1/completions", stream=False))
    assert [log.get(str(i)) is not None for i in range(5)] == [False, False, True, True, True]
    assert set(log.get("4").to_json()) >= {"queue", "prefill", "handoff", "first_token", "total", "ttft", "tpot"}


def test_tokens_merged_into_one_event_are_counted_from_the_usage_chunk():
    # vLLM puts several tokens in one event when its reader lags; the usage chunk has the count.
    clock = StreamClock()
    clock.feed(event({"choices": [{"index": 0, "text": " a"}]}), 1.0)
    clock.feed(event({"choices": [{"index": 0, "text": " b c d"}]}), 4.0)
    clock.feed(event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}) + event("[DONE]"), 4.0)
    assert (clock.events, clock.tokens, clock.per_token) == (2, 4, pytest.approx(1.0))


def test_events_of_unexpected_shapes_are_read_as_the_dict_reader_reads_them():
    # A first event with the prompt's ids; a text that is not a string; a delta that is a list (counted
    # as no token, never an error that would break the relayed stream).
    events = [
        {"choices": [{"index": 0, "text": "", "prompt_token_ids": list(range(5000)), "token_ids": []}]},
        {"choices": [{"index": 0, "text": 7}]},
        {"choices": [{"index": 0, "delta": ["x"]}]},
        {"choices": [{"index": 0, "delta": {"content": "y", "role": "assistant"}}], "usage": None},
        {"choices": None, "usage": {"completion_tokens": "many"}},
    ]
    for i, data in enumerate(events):
        fast, whole = StreamClock(), StreamClock()
        fast.feed(event(data), 1.0 + i)
        whole.see(json.loads(event(data)[6:]), 1.0 + i)
        assert (fast.events, fast.first, fast.usage_tokens) == (whole.events, whole.first, whole.usage_tokens), data

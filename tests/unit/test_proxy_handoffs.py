"""Hand-offs the proxy gives up on go back to their prefiller at once: a real staging pool served
over a real connection, a real proxy, decoders that refuse, answer or die mid-stream. And a proxy
with decoders alone serves them without counting a fallback."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from pdrun import transfer
from pdrun.pd.params import HandOff, handoff_params
from pdrun.pd.proxy.app import REQUEST_ID, Proxy, ProxySettings, create_app
from pdrun.pd.proxy.body import parse_body
from pdrun.pd.proxy.continuation import COMPLETIONS, Continuation
from pdrun.pd.proxy.handoffs import release
from pdrun.pd.proxy.timing import RequestTiming
from pdrun.pd.proxy.upstream import Upstream
from pdrun.pd.staging import StagingPool, StagingService
from tests.unit.http_stub import Streaming, serving
from tests.unit.test_continuation import completion_answer
from tests.unit.test_proxy_health import refused_url

KEY = bytes(range(16))


@pytest.fixture
def prefiller():
    """A staging pool holding one hand-off, "t1", served where a decoder would pull it."""
    pool = StagingPool(budget_bytes=1 << 20, ttl_s=600)
    pool.stage("t1", KEY, 1, 64, lambda buf: None)
    with transfer.listen("tcp://127.0.0.1:0", StagingService(pool, "L1")) as listener:
        handoff = HandOff(
            endpoints=[listener.address], transfer="t1", num_tokens=3, keys=[KEY.hex()], fingerprint="0" * 32,
            chunk_size=256,
        )  # fmt: skip
        yield pool, handoff_params(handoff)


class Decoder(Streaming):
    """Streams two events and the end, or (`dies`) one event and then closes the connection
    mid-stream, as a decoder whose process is killed."""

    dies = False
    bodies: list[bytes] = []  # what each request sent

    def do_POST(self):
        type(self).bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        event = b'data: {"choices": [{"index": 0, "text": "c", "token_ids": [9], "finish_reason": null}]}\n\n'
        self.start_stream()
        self.chunk(event)
        if type(self).dies:
            self.die()
            return
        self.chunk(event)
        self.end_stream()


@pytest.fixture
def decoder():
    with serving(Decoder) as url:
        yield url
    Decoder.dies = False
    Decoder.bodies = []


def stream_through(proxy: Proxy, params: dict, body: dict | None = None) -> bytes:
    """The client's whole stream of a continued completion, then the releases under way."""
    first = Continuation(COMPLETIONS, body or {"prompt": [1, 2, 3], "stream": True}, completion_answer())

    async def run() -> bytes:
        proxy.client = Upstream(connect_timeout_s=5, read_timeout_s=5)
        try:
            timing = RequestTiming("r", COMPLETIONS, stream=True)
            out = b"".join([chunk async for chunk in proxy._continue(first, params, time.monotonic(), timing)])
            await proxy.give_back.drain()
            return out
        finally:
            await proxy.client.close()

    return asyncio.run(run())


def proxy_to(*decoders: str) -> Proxy:
    proxy = Proxy(ProxySettings(decode=list(decoders)))
    for b in proxy.router.decoders:
        b.mark_up(["m"])
    return proxy


def test_a_hand_off_no_decoder_takes_is_released_at_once(prefiller):
    pool, params = prefiller
    out = stream_through(proxy_to(refused_url()), params)
    assert b"no decoder in rotation" in out
    assert pool.held() == 0


def test_a_hand_off_whose_decoder_dies_mid_stream_is_released(prefiller, decoder):
    pool, params = prefiller
    Decoder.dies = True
    out = stream_through(proxy_to(decoder), params)
    assert b"decoder failed mid-stream" in out
    assert pool.held() == 0


class Scripted(Streaming):
    """The first request it (or any decoder of its kind) gets streams two tokens and dies; later
    ones stream two more and the end."""

    bodies: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        first = not Scripted.bodies
        Scripted.bodies.append(body)
        self.start_stream()
        tokens = [(9, "c"), (10, "d")] if first else [(11, "e"), (12, "f")]
        for i, (token, text) in enumerate(tokens):
            last = not first and i == len(tokens) - 1
            choice = {"index": 0, "text": text, "token_ids": [token], "finish_reason": "length" if last else None}
            self.chunk(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        if first:
            self.die()
        else:
            self.end_stream()


def test_a_stream_whose_decoder_dies_goes_on_on_another_after_the_tokens_it_streamed(prefiller):
    pool, params = prefiller
    Scripted.bodies = []
    with serving(Scripted) as a, serving(Scripted) as b:
        proxy = proxy_to(a, b)
        out = stream_through(proxy, params, {"prompt": [1, 2, 3], "stream": True, "max_tokens": 5})
    texts = [c["text"] for e in out.split(b"\n\n") if e.startswith(b"data: {") for c in json.loads(e[6:])["choices"]]
    assert texts == ["ab", "c", "d", "e", "f"] and out.endswith(b"data: [DONE]\n\n") and b"failed" not in out
    handed, resumed = Scripted.bodies
    assert handed["kv_transfer_params"] == params and handed["prompt"] == [1, 2, 3, 42]
    # The other decoder: the prompt, the first token and the two streamed, for the two left.
    assert resumed == {"prompt": [1, 2, 3, 42, 9, 10], "stream": True, "max_tokens": 2, "return_token_ids": True}
    assert pool.held() == 0  # the hand-off is given back: the next decoder loads or computes what it needs
    assert proxy.metrics.resumed._value.get() == 1


def test_a_hand_off_a_decoder_streamed_to_its_end_is_left_to_that_decoder(prefiller, decoder):
    pool, params = prefiller
    out = stream_through(proxy_to(decoder), params)
    assert out.endswith(b"data: [DONE]\n\n") and b"failed" not in out
    assert pool.held() == 1  # the decoder releases what it pulled


def test_a_non_streamed_decode_that_fails_releases_its_hand_off(prefiller):
    pool, params = prefiller
    proxy = proxy_to(refused_url())

    async def run() -> int:
        proxy.client = Upstream(connect_timeout_s=5, read_timeout_s=5)
        try:
            timing = RequestTiming("r", COMPLETIONS, stream=False)
            body = {"prompt": [1, 2, 3, 42], "kv_transfer_params": params}
            r = await proxy._decode(COMPLETIONS, body, time.monotonic(), timing)
            await proxy.give_back.drain()
            return r.status_code
        finally:
            await proxy.client.close()

    assert asyncio.run(run()) == 503
    assert pool.held() == 0


def test_a_release_the_prefiller_refuses_is_left_to_its_ttl(prefiller, caplog):
    _, params = prefiller
    dead = refused_url().replace("http", "tcp")
    with caplog.at_level(logging.INFO, logger="pdrun"):
        assert not release([dead], params["pdrun"]["transfer"], timeout_s=1.0)
    assert "its TTL frees it" in caplog.text


def test_decoders_alone_serve_every_request_without_a_fallback(decoder):
    proxy = proxy_to(decoder)  # no prefiller configured: decode-only by design, not a fallback

    timing = RequestTiming("r", COMPLETIONS, stream=True)

    async def run() -> tuple[int, str]:
        proxy.client = Upstream(connect_timeout_s=5, read_timeout_s=5)
        try:
            body = {"prompt": [1, 2, 3], "stream": True}
            r = await proxy._serve(COMPLETIONS, body, None, time.monotonic(), timing)
            async for _ in r.body_iterator:
                pass
            return r.status_code, timing.mode
        finally:
            await proxy.client.close()

    assert asyncio.run(run()) == (200, "decode")
    # The relay's clock read every event, each after it went on to the client: both tokens counted.
    assert timing.output_tokens == 2 and timing.ttft is not None and 0 < timing.ttft <= timing.total
    assert not [s for m in proxy.metrics.fallbacks.collect() for s in m.samples if s.value]


def test_a_request_that_goes_on_unchanged_is_sent_as_the_client_wrote_it(decoder):
    """Not decoded and encoded again: a long prompt's ids cost the proxy that time for nothing."""
    proxy = proxy_to(decoder)
    raw = b'{ "prompt" : [1,2,  3], "stream": true, "x": 1.50 }'

    async def run() -> None:
        proxy.client = Upstream(connect_timeout_s=5, read_timeout_s=5)
        try:
            body = parse_body(raw, COMPLETIONS)
            r = await proxy._serve(
                COMPLETIONS, body, raw, time.monotonic(), RequestTiming("r", COMPLETIONS, stream=True)
            )
            async for _ in r.body_iterator:
                pass
        finally:
            await proxy.client.close()

    asyncio.run(run())
    assert Decoder.bodies == [raw]


def test_decoders_alone_get_the_body_as_it_came_and_the_proxy_refuses_only_what_it_must(decoder):
    """Before decoders alone the proxy reads only what it routes on: a field it does not act on is
    the decoder's to judge (as plain vLLM does), while a body that is not JSON, or that sets
    kv_transfer_params (which would tell a decoder where to pull KV from), never reaches it."""
    app = create_app(ProxySettings(decode=[decoder]))
    proxy = app.state.proxy
    for b in proxy.router.decoders:
        b.mark_up(["m"])
    sent = b'{"model": "m", "prompt": [1, 2, 3], "temperature": "hot", "stream": "true"}'
    refused = [b'{"prompt": [1', b"[1, 2]", b'{"prompt": [1], "kv_transfer_params": {"do_remote_prefill": true}}']

    async def run() -> tuple[list[int], int, str]:
        proxy.client = Upstream(connect_timeout_s=5, read_timeout_s=5)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
                statuses = [(await c.post(COMPLETIONS, content=body)).status_code for body in refused]
                r = await c.post(COMPLETIONS, content=sent)
                return statuses, r.status_code, r.headers[REQUEST_ID]
        finally:
            await proxy.client.close()

    statuses, status, request_id = asyncio.run(run())
    assert statuses == [400, 400, 400]
    assert status == 200 and proxy.timings.get(request_id).stream  # "true" streams, as vLLM reads it
    assert Decoder.bodies == [sent]


def test_decoders_alone_each_get_the_conversations_they_answered_before(decoder):
    """Several decoders alone: the proxy reads the prompt too, and a conversation's next turn (its
    history and more) goes to the decoder that answered its last, whose prefix cache holds it;
    prompts that share nothing still spread over the decoders."""

    def turns(seed: int) -> list[bytes]:
        history, out = list(range(seed, seed + 600)), []
        for turn in range(3):
            history += [7] * 300
            out.append(json.dumps({"model": "m", "prompt": history, "stream": turn == 1}).encode())
        return out

    async def run(urls: list[str]) -> list[str]:
        app = create_app(ProxySettings(decode=urls))
        proxy = app.state.proxy
        for b in proxy.router.decoders:
            b.mark_up(["m"])
        proxy.client = Upstream(connect_timeout_s=5, read_timeout_s=5)
        served = []
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
                for body in [b for seed in (1000, 5000, 9000, 13000) for b in turns(seed)]:
                    before = {d.url: d.served for d in proxy.router.decoders}
                    assert (await c.post(COMPLETIONS, content=body)).status_code == 200
                    served += [d.url for d in proxy.router.decoders if d.served > before[d.url]]
            return served
        finally:
            await proxy.client.close()

    with serving(Decoder) as second:
        urls = [decoder, second]
        served = asyncio.run(run(urls))
    conversations = [served[i : i + 3] for i in range(0, 12, 3)]
    assert all(len(set(c)) == 1 for c in conversations), conversations  # taking turns, they would alternate
    assert {c[0] for c in conversations} == set(urls)
    assert len(Decoder.bodies) == 12  # each body as it came

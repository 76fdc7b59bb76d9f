"""The one OpenAI endpoint in front of prefillers and decoders.

Each completion or chat completion runs in two phases (pd/proxy/continuation.py): the request goes to a
prefiller for its first token, with `kv_transfer_params={"do_remote_decode": true}`; then a
decoder, given the prompt's token ids with that token appended and the `kv_transfer_params` the
prefiller returned, loads the prompt's KV and generates the rest. The client reads one answer,
streamed or not, as one vLLM would give it; a streamed one gets the first token as soon as the
prefill answers. A request the hand-off cannot serve (no prefiller in rotation, a prefiller
failing, prompt logprobs, n > 1, batched prompts) is sent to a decoder alone, which prefills it
itself; so is one whose prompt the cache tier holds but a short tail (pd/proxy/shortcut.py), which the
decoder loads from the tier. A decoder that cannot be reached before it has answered anything is
replaced by another.
A client that goes away cancels the upstream requests. vLLM's own errors pass through with their
status.

Every routed request's answer carries an `x-pdrun-request-id` header; `GET /pdrun/requests/{id}` tells where that
request's time went (pd/proxy/timing.py), and /metrics has the same phases as histograms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from pdrun import transfer
from pdrun.pd.params import TIMING
from pdrun.pd.proxy.body import BadRequest, decode_only_reason, error_response, parse_body, parse_head
from pdrun.pd.proxy.continuation import CHAT, COMPLETIONS, Continuation, Relayed, inexact_reason, prefill_body
from pdrun.pd.proxy.handoffs import GiveBack
from pdrun.pd.proxy.health import Health
from pdrun.pd.proxy.hints import Hints
from pdrun.pd.proxy.metrics import ProxyMetrics
from pdrun.pd.proxy.prefixes import pieces
from pdrun.pd.proxy.routing import Backend, Policy, Router, prompt_tokens
from pdrun.pd.proxy.shortcut import TierShortcut
from pdrun.pd.proxy.timing import RequestTiming, SSEEvents, StreamClock, TimingLog, event_data
from pdrun.pd.proxy.upstream import (
    Answer,
    ConnectionLost,
    NotConnected,
    Refused,
    Stream,
    Timeout,
    Upstream,
    UpstreamError,
)
from pdrun.storage.client import CacheClient

log = logging.getLogger("pdrun.pd.proxy")

# Retried on another decoder: the request never reached one (a connection refused, or not made in
# time under a burst), or the decoder died before answering.
RETRIABLE = (Refused, NotConnected, ConnectionLost)
REQUEST_ID = "x-pdrun-request-id"
DONE = b"data: [DONE]"  # a stream's last event
IN_TIER = "prompt in the cache tier"  # the decode-only reason of the tier shortcut
SHORTCUT_LOOKUP_TIMEOUT_S = 0.5  # a cache slower than this is a miss: the request takes the prefill hop


class ProxySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefill: list[str] = Field(default_factory=list, description="prefiller vLLM base URLs")
    decode: list[str] = Field(min_length=1, description="decoder vLLM base URLs")
    policy: Policy = "prefix_aware"
    chat_parsing: bool = Field(
        False,
        description="the vLLM instances parse chat answers (--reasoning-parser, --tool-call-parser): the decoder "
        "then samples a chat's first token itself instead of continuing after the prefiller's",
    )
    health_interval_s: float = Field(1.0, gt=0)
    connect_timeout_s: float = Field(
        15.0, gt=0, description="a connection to a backend not made by then is tried on another (a refusal at once)"
    )
    prefill_timeout_s: float = Field(300.0, gt=0, description="longest wait for a prefiller's answer")
    read_timeout_s: float = Field(600.0, gt=0, description="longest silence from a decoder")
    max_connections: int = Field(2048, ge=1, description="upstream connections, all backends together")
    cache: str | None = Field(
        None,
        description="the deployment's cache server (tcp://HOST:PORT): prompts it holds skip the prefill hop",
    )
    hints: dict[str, str] = Field(
        default_factory=dict,
        description="decoder base URL -> the zmq address (tcp://127.0.0.1:PORT) its worker takes prefetch hints on "
        "(cache_prefetch_gb): a decoder-only completion's token ids go there as the decoder is picked",
    )
    tier_shortcut_tokens: int = Field(
        512,
        ge=0,
        description="with a cache: a request whose prompt the tier holds but for at most this many tokens goes to "
        "a decoder alone, which loads it from the tier and computes that tail itself; 0: always the prefill hop",
    )


class Proxy:
    def __init__(self, settings: ProxySettings):
        self.settings = settings
        self.router = Router(settings.prefill, settings.decode, settings.policy)
        self.metrics = ProxyMetrics(self.router)
        self.timings = TimingLog()
        self.shortcut = _shortcut(settings)
        self.health = Health(self.router.backends)
        self.give_back = GiveBack()
        self.hints = Hints(settings.hints) if settings.hints else None

    @property
    def client(self) -> Upstream | None:
        """The pooled client every upstream request and health check goes through."""
        return self.health.client

    @client.setter
    def client(self, client: Upstream | None) -> None:
        self.health.client = client

    # ---- lifecycle ----
    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        s = self.settings
        self.client = Upstream(s.connect_timeout_s, s.read_timeout_s, s.max_connections)
        checker = asyncio.create_task(self.health.run(self.settings.health_interval_s))
        try:
            await self.health.check_all()
            yield
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
            await self.give_back.drain()
            await self.client.close()
            if self.shortcut is not None:
                self.shortcut.close()
            if self.hints is not None:
                self.hints.close()

    async def _prefill_from(self, p: Backend, path: str, pbody: dict[str, Any]) -> Answer | None:
        """p's answer to the prefill, or None if p left the rotation first (a prefiller that stopped
        answering costs its requests the health checks that find it out, not prefill_timeout_s)."""
        assert self.client is not None
        down = self.health.went_down(p)
        post = asyncio.ensure_future(
            self.client.request("POST", f"{p.url}{path}", _encode(pbody), timeout_s=self.settings.prefill_timeout_s)
        )
        gone = asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait({post, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            answered = post.done()
            if not answered:
                post.cancel()
        return post.result() if answered else None

    # ---- requests ----
    async def handle(self, request: Request, path: str) -> Response:
        t0 = time.monotonic()
        raw = await request.body()
        try:
            # Decoders alone get the body as it came: the proxy reads only what it routes on.
            body = parse_body(raw, path) if self.router.prefillers else parse_head(raw, self.router.tracks_prefixes)
            self._check_model(body.get("model"))
        except BadRequest as e:
            return self._count(path, error_response(e.status, str(e), e.param))
        timing = RequestTiming(uuid.uuid4().hex, path, stream=bool(body.get("stream")))
        self.timings.add(timing)
        response = await _unless_disconnected(request.receive, self._serve(path, body, raw, t0, timing))
        response.headers[REQUEST_ID] = timing.id
        timing.status = response.status_code
        if not isinstance(response, RelayResponse):
            self._finish(timing, t0)
        return self._count(path, response)

    def _finish(self, timing: RequestTiming, t0: float) -> None:
        """Once per request, when its last byte has gone (or it failed)."""
        if timing.finished.is_set():
            return
        if timing.total is None:
            timing.total = time.monotonic() - t0
        self.metrics.observe(timing)
        timing.finished.set()

    async def request_timing(self, request_id: str, wait_s: float) -> Response:
        t = self.timings.get(request_id)
        if t is None:
            return error_response(404, f"no request {request_id!r} among the last {self.timings.capacity}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(t.finished.wait(), wait_s)
        return JSONResponse(t.to_json())

    def _check_model(self, model: str | None) -> None:
        known = self.router.models()
        if not known:
            raise BadRequest("no decoder is in rotation yet; retry shortly", status=503)
        if model is not None and model not in known:
            raise BadRequest(f"The model `{model}` does not exist.", "model", status=404)

    def _count(self, path: str, response: Response) -> Response:
        self.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    async def _serve(
        self, path: str, body: dict[str, Any], raw: bytes | None, t0: float, timing: RequestTiming
    ) -> Response:
        """`raw`: the client's body, sent on as it came where the request goes on unchanged."""
        if not self.router.prefillers:  # decoders alone, by design: nothing falls back
            timing.mode = "decode"
            return await self._decode(path, body, t0, timing, raw)
        reason = decode_only_reason(body)
        if reason is None and await self._in_tier(path, body):
            reason = IN_TIER
        if reason is None:
            answer = await self._prefill(path, body, timing)
            if isinstance(answer, Response):
                return answer  # the prefiller refused the request itself (4xx): the client's to fix
            if isinstance(answer, str):
                reason = answer
            elif answer.final:
                self.metrics.prefill_only.inc()
                timing.mode = "prefill only"
                return self._prefill_answer(body, answer, t0, timing)
            elif not (params := answer.answer.get("kv_transfer_params")):
                reason = "no kv_transfer_params from the prefiller"
            else:
                if self.shortcut is not None:
                    self.shortcut.learn(body.get("model"), params)
                self.metrics.handoffs.inc()
                self.metrics.handoff_tokens.inc((params.get("pdrun") or {}).get("num_tokens", 0))
                inexact = inexact_reason(path, body, self.settings.chat_parsing) or answer.inexact()
                if inexact is None:
                    self.metrics.continued.inc()
                    timing.mode = "pd"
                    if not body.get("stream"):
                        return await self._continue_whole(answer, params, t0, timing)
                    return RelayResponse(
                        self._continue(answer, params, t0, timing),
                        on_close=partial(self._closed, timing, t0),
                        media_type="text/event-stream",
                    )
                self.metrics.decoder_first_tokens.labels(inexact).inc()
                timing.mode = f"pd, first token from the decoder: {inexact}"
                body, raw = {**body, "kv_transfer_params": params}, None
        if reason is not None:
            self.metrics.fallbacks.labels(reason).inc()
            timing.mode = f"decode-only: {reason}"
            if reason != IN_TIER:
                log.info("decode-only request: %s", reason)
        return await self._decode(path, body, t0, timing, raw)

    async def _in_tier(self, path: str, body: dict[str, Any]) -> bool:
        """Whether the cache tier holds the prompt but a short tail (the prefill hop is then skipped)."""
        if self.shortcut is None or not any(b.healthy for b in self.router.prefillers):
            return False
        decoder = next((b for b in self.router.decoders if b.healthy), None)
        if decoder is None:
            return False
        assert self.client is not None
        tokens, held = await self.shortcut.held(self.client, decoder.url, path, body)
        return self.shortcut.takes(tokens, held)

    async def _prefill(self, path: str, body: dict[str, Any], timing: RequestTiming) -> Continuation | Response | str:
        """The prefiller's first token, its 4xx, or why the decoder prefills instead."""
        assert self.client is not None
        pbody = prefill_body(path, body)
        tried: list[Backend] = []
        reason = "no prefiller in rotation"
        t0 = time.monotonic()
        tokens = prompt_tokens(body)
        while (p := self.router.pick_prefiller(body, tokens)) is not None and p not in tried:
            tried.append(p)
            p.outstanding += 1
            p.pending_tokens += tokens
            try:
                r = await self._prefill_from(p, path, pbody)
                if r is None:
                    reason = "prefiller out of rotation"
                    continue
            except Timeout:
                return "prefiller timed out"
            except UpstreamError as e:
                self.health.failed(p, e)
                reason = "prefiller unreachable"
                continue
            finally:
                p.outstanding -= 1
                p.pending_tokens -= tokens
            p.served += 1
            if 400 <= r.status < 500:
                return _passthrough(r.status, r.content, r.content_type)
            if r.status != 200:
                log.warning("prefiller %s answered %d: %s", p.url, r.status, r.content[:200].decode(errors="replace"))
                return "prefiller error"
            try:
                answer = msgspec.json.decode(r.content)
                first = Continuation(path, body, answer)
            except ValueError as e:
                log.warning("prefiller %s: %s", p.url, e)
                return "prefiller answer unreadable"
            _prefill_timing(timing, answer, time.monotonic() - t0)
            return first
        return reason

    def _prefill_answer(self, body: dict[str, Any], first: Continuation, t0: float, timing: RequestTiming) -> Response:
        """The prefiller's answer is the whole answer (it stopped, or one token was asked for)."""
        timing.output_tokens = 1
        if body.get("stream"):
            timing.ttft = time.monotonic() - t0
            return Response(first.head(), media_type="text/event-stream")
        return JSONResponse(first.whole())

    async def _open_decoder(
        self, path: str, body: dict[str, Any], raw: bytes | None = None, client_body: dict[str, Any] | None = None
    ) -> _Opened | Response:
        """A decoder's answer with its first bytes read (one that fails before sending any is
        replaced by another), or the error to answer with. The caller closes what it gets.
        `client_body`: the request as the client sent it, where `body` continues it."""
        assert self.client is not None
        content = raw if raw is not None else _encode(body)
        tried: list[Backend] = []
        asked_again: set[str] = set()
        prompt = pieces(client_body or body) if self.router.tracks_prefixes else []
        # With a hand-off the KV comes with it, whichever decoder takes it; without, the decoder
        # whose own cache holds the prompt's head skips computing or loading it.
        by_prefix = () if body.get("kv_transfer_params") else prompt
        while (d := self.router.pick_decoder(exclude=tried, prompt=by_prefix)) is not None:
            if self.hints is not None and path == COMPLETIONS and "kv_transfer_params" not in body:
                self.hints.send(d.url, content)  # its prefix crosses into the GPU meanwhile
            sent = time.monotonic()
            d.outstanding += 1
            upstream: Stream | None = None
            try:
                upstream = await self.client.open("POST", f"{d.url}{path}", content)
                chunks = upstream.chunks()
                first = await anext(chunks, b"")
            except BaseException as e:
                d.outstanding -= 1
                if upstream is not None:
                    upstream.close()
                if isinstance(e, RETRIABLE):
                    self.metrics.retries.inc()
                    if isinstance(e, ConnectionLost) and d.url not in asked_again:
                        # Most likely a kept-alive connection the decoder had just closed: it stays
                        # a candidate, on a new connection (one that is gone refuses that).
                        asked_again.add(d.url)
                        continue
                    tried.append(d)
                    self.health.failed(d, e)
                    continue
                if isinstance(e, Timeout):
                    return error_response(504, f"decoder {d.url} sent nothing for {self.settings.read_timeout_s}s")
                if isinstance(e, UpstreamError):
                    return error_response(502, f"decoder {d.url}: {e}")
                raise
            d.served += 1
            self.router.sent_to(d, prompt)
            return _Opened(d, upstream, first, chunks, sent)
        return error_response(503, "no decoder in rotation")

    async def _decode(
        self,
        path: str,
        body: dict[str, Any],
        t0: float,
        timing: RequestTiming,
        raw: bytes | None = None,
        client_body: dict[str, Any] | None = None,
    ) -> Response:
        """A decoder's answer; the request's hand-off, if any, is given back unless a decoder took it."""
        params = body.get("kv_transfer_params")
        taken = False
        try:
            opened = await self._open_decoder(path, body, raw, client_body)
            if isinstance(opened, Response):
                return opened
            d, upstream, first, chunks, sent = opened.d, opened.upstream, opened.first, opened.chunks, opened.sent
            handed_on = False
            try:
                if upstream.status != 200 or not body.get("stream"):
                    rest = b"".join([first] + [c async for c in chunks])
                    timing.decode = time.monotonic() - sent  # no first-token time: one answer
                    if upstream.status == 200:
                        taken = True
                        rest = _take_decoder_timing(timing, rest)
                    return _passthrough(upstream.status, rest, upstream.content_type)
                handed_on = taken = True  # the relay gives it back if the stream breaks
                return RelayResponse(
                    self._relay(d, first, chunks, t0, sent, timing, params),
                    on_close=partial(self._release, d, upstream, timing, t0),
                    media_type=upstream.content_type or "text/event-stream",
                )
            except RETRIABLE as e:
                self.health.failed(d, e)
                return error_response(502, f"decoder {d.url} failed mid-answer: {e}")
            finally:
                if not handed_on:
                    d.outstanding -= 1
                    upstream.close()
        finally:
            if not taken:
                self.give_back(params)

    async def _continue(
        self, first: Continuation, params: dict[str, Any], t0: float, timing: RequestTiming
    ) -> AsyncIterator[bytes]:
        """The client's stream: the prefiller's token at once, then the decoder's continuation; a
        decoder dying mid-stream is followed by another going on after what it streamed. Unless a
        decoder streams it to its end, the hand-off is given back (it may never be pulled)."""
        clock, decoder_clock = StreamClock(), StreamClock()
        head = first.head()
        clock.feed(head, time.monotonic())
        # With another decoder to go on on, the proxy reads the ids of the tokens it relays.
        movable = len(self.router.decoders) > 1
        body: dict[str, Any] | None = first.decoder_body(params, read_ids=movable)
        finished, sent = False, None  # sent: when the first decoder was asked (the decode phase's start)
        try:
            yield head
            while body is not None:
                opened = await self._open_decoder(COMPLETIONS, body, client_body=first.body)
                if isinstance(opened, Response):
                    log.warning("no decoder took the rest of a streamed answer: %s", bytes(opened.body)[:200])
                    yield _error_event(opened.status_code, bytes(opened.body))
                    return
                d, events, relayed = opened.d, SSEEvents(), Relayed()
                sent = sent if sent is not None else opened.sent
                body = None
                try:
                    if opened.upstream.status != 200:
                        answer = opened.first + b"".join([c async for c in opened.chunks])
                        log.warning("decoder %s refused the rest of a streamed answer: %s", d.url, answer[:200])
                        yield _error_event(opened.upstream.status, answer)
                        return
                    async for chunk in _chain(opened.first, opened.chunks):
                        now, out = time.monotonic(), []
                        for event in events.feed(chunk):
                            data = event_data(event)
                            if data is not None:  # else [DONE], comments: as they are
                                decoder_clock.see(data, now)
                                relayed.see(data)
                                data = first.rewrite(data)
                                clock.see(data, now)
                                event = b"data: " + msgspec.json.encode(data)
                            else:
                                relayed.done = relayed.done or event == DONE
                            out.append(event + b"\n\n")
                        yield b"".join(out)
                    yield events.rest()
                    finished = True
                    end = time.monotonic()
                    timing.decode, timing.total = end - sent, end - t0
                    timing.ttft = clock.first - t0 if clock.first is not None else None
                    if decoder_clock.first is not None:
                        timing.first_token = decoder_clock.first - sent
                    timing.output_tokens, timing.tpot = clock.tokens, clock.per_token
                except RETRIABLE as e:
                    self.health.failed(d, e)
                    if relayed.ended:  # it died after its last token: the answer is whole
                        if not relayed.done:
                            yield DONE + b"\n\n"
                        finished = True
                        return
                    body = first.resumed(relayed) if movable else None
                    if body is None:
                        yield _error_event(502, f"decoder failed mid-stream: {e}".encode())
                        return
                    self.metrics.resumed.inc()
                    log.info("decoder %s failed mid-stream after %d tokens (%s): another goes on after them",
                             d.url, first.carried, e)  # fmt: skip
                    self.give_back(params)  # what the new decoder needs, it loads or computes
                    params = {}
                finally:
                    d.outstanding -= 1
                    opened.upstream.close()
        finally:
            if not finished:
                self.give_back(params)

    async def _continue_whole(
        self, first: Continuation, params: dict[str, Any], t0: float, timing: RequestTiming
    ) -> Response:
        """The client's one answer: the prefiller's token and the decoder's continuation, joined."""
        answer = await self._decode(COMPLETIONS, first.decoder_body(params), t0, timing, client_body=first.body)
        if answer.status_code != 200:
            return answer
        try:
            whole = first.whole(msgspec.json.decode(bytes(answer.body)))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            log.warning("a decoder answered what the proxy cannot read: %s", e)
            return error_response(502, f"the decoder answered what the proxy cannot read: {e}")
        timing.output_tokens = (whole.get("usage") or {}).get("completion_tokens")
        return JSONResponse(whole)

    async def _closed(self, timing: RequestTiming, t0: float) -> None:
        self._finish(timing, t0)

    async def _relay(
        self,
        d: Backend,
        first: bytes,
        chunks: AsyncIterator[bytes],
        t0: float,
        sent: float,
        timing: RequestTiming,
        params: dict[str, Any] | None,
    ) -> AsyncIterator[bytes]:
        """The decoder's events; a decoder dying mid-stream ends it with an error event the client sees
        (and its hand-off, if any, is given back, as when the client leaves first)."""
        clock = StreamClock()
        finished = False
        try:
            # Each chunk goes to the client before the clock reads it (at the time it came): the
            # first event echoes a long prompt's ids, and reading it is not the client's wait.
            came = time.monotonic()
            yield first
            clock.feed(first, came)
            async for chunk in chunks:
                came = time.monotonic()
                yield chunk
                clock.feed(chunk, came)
            end = time.monotonic()  # the last chunk has gone to the client: closing upstream is not its time
            timing.decode, timing.total = end - sent, end - t0
            if clock.first is not None:
                timing.first_token, timing.ttft = clock.first - sent, clock.first - t0
            timing.output_tokens, timing.tpot = clock.tokens, clock.per_token
            finished = True
        except RETRIABLE as e:
            self.health.failed(d, e)
            yield _error_event(502, f"decoder failed mid-stream: {e}".encode())
        finally:
            if not finished:
                self.give_back(params)

    async def _release(self, d: Backend, upstream: Stream, timing: RequestTiming, t0: float) -> None:
        d.outstanding -= 1
        upstream.close()
        self._finish(timing, t0)

    async def models(self) -> Response:
        data = [{"id": m, "object": "model", "owned_by": "pdrun"} for m in sorted(self.router.models())]
        return JSONResponse({"object": "list", "data": data})

    def health_state(self) -> Response:
        """GET /health: 200 while a decoder is in rotation (else 503), with every backend's state."""
        ok = any(b.healthy for b in self.router.decoders)
        state = {
            "healthy": ok,
            "policy": self.router.policy,
            "prefill": [b.describe() for b in self.router.prefillers],
            "decode": [b.describe() for b in self.router.decoders],
        }
        return JSONResponse(state, status_code=200 if ok else 503)


def _prefill_timing(timing: RequestTiming, answer: dict[str, Any], round_trip: float) -> None:
    """The prefiller's compute as its connector reports it; the rest of the round trip is queue."""
    reported = (answer.get("kv_transfer_params") or {}).get(TIMING) or {}
    compute = reported.get("prefill_s")
    if isinstance(compute, int | float) and 0 <= compute <= round_trip:
        timing.prefill, timing.queue = compute, round_trip - compute
    else:
        timing.prefill = round_trip
    timing.prompt_tokens = (answer.get("usage") or {}).get("prompt_tokens")


def _take_decoder_timing(timing: RequestTiming, content: bytes) -> bytes:
    """Record the decoder connector's report from a non-streamed answer and answer without it, as
    plain vLLM would (`kv_transfer_params: null`)."""
    if TIMING.encode() not in content:
        return content
    try:
        answer = msgspec.json.decode(content)
        reported = answer["kv_transfer_params"].pop(TIMING)
    except (ValueError, KeyError, TypeError, AttributeError):
        return content
    timing.handoff, timing.decoder_queue = reported.get("load_s"), reported.get("queued_s")
    timing.output_tokens = (answer.get("usage") or {}).get("completion_tokens")
    answer["kv_transfer_params"] = answer["kv_transfer_params"] or None
    return msgspec.json.encode(answer)


@dataclass
class _Opened:
    d: Backend
    upstream: Stream
    first: bytes  # its first bytes
    chunks: AsyncIterator[bytes]  # the rest
    sent: float


def _shortcut(settings: ProxySettings) -> TierShortcut | None:
    if settings.cache is None or settings.tier_shortcut_tokens == 0 or not settings.prefill:
        return None
    timeout = SHORTCUT_LOOKUP_TIMEOUT_S
    connect = partial(transfer.connect, connect_timeout=timeout, io_timeout=timeout)
    return TierShortcut(CacheClient(settings.cache, connect, retry_after_s=5.0), settings.tier_shortcut_tokens)


def _encode(body: dict[str, Any]) -> bytes:
    """An upstream request's JSON body (msgspec: a long prompt's ids encode in a tenth of json's time)."""
    return msgspec.json.encode(body)


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


def _error_event(status: int, answer: bytes) -> bytes:
    """An error that comes after the stream started, as the client sees it: an event, then the end.
    `answer` is an error body (its message is kept) or the message itself."""
    message = answer.decode(errors="replace")
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        parsed = json.loads(answer)
        message = str((parsed.get("error") or parsed)["message"])  # vLLM's newer and older error bodies
    err = {"error": {"message": message, "type": "APIError", "code": status}}
    return f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()


def _passthrough(status: int, content: bytes, content_type: str | None) -> Response:
    return Response(content=content, status_code=status, media_type=content_type or "application/json")


class RelayResponse(StreamingResponse):
    """A stream that stops, and closes its source (the upstream request), as soon as the client leaves:
    whatever the server's ASGI version, and not only at the next write."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await _unless_disconnected(receive, self.stream_response(send))
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.on_close()


async def _unless_disconnected(receive: Any, work: Awaitable[Any]) -> Any:
    """Run `work` unless the client hangs up first; then cancel it, and with it the upstream requests."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return error_response(499, "client closed the request")
    return task.result()


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(settings: ProxySettings) -> FastAPI:
    proxy = Proxy(settings)
    app = FastAPI(title="pdrun proxy", lifespan=proxy.lifespan, docs_url=None, redoc_url=None)
    app.state.proxy = proxy

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await proxy.handle(request, COMPLETIONS)

    @app.post(CHAT)
    async def chat(request: Request) -> Response:
        return await proxy.handle(request, CHAT)

    @app.get("/v1/models")
    async def models() -> Response:
        return await proxy.models()

    @app.get("/health")
    async def health() -> Response:
        return proxy.health_state()

    @app.get("/pdrun/requests/{request_id}")
    async def request_timing(request_id: str, wait_s: float = 10.0) -> Response:
        """Where a request's time went (waits up to wait_s for one still being answered)."""
        return await proxy.request_timing(request_id, min(max(wait_s, 0.0), 60.0))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(settings: ProxySettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)

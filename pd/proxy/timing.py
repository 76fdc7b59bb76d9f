"""Where each request's time went, as the proxy saw it: kept for `GET /pdrun/requests/{id}`.

Phases, in seconds (None where unknown):
    queue        proxy arrival to the prefiller starting to compute it (routing, HTTP, tokenizing,
                 the prefiller's queue): the prefill round trip less the prefiller's compute
    prefill      the prefiller's compute, first scheduled to finished (its connector reports it)
    handoff      the decoder loading the KV, as its connector reports it (non-streamed answers
                 only: vLLM returns the report there only)
    first_token  decode request sent to the first token (streamed answers only)
    decode       decode request sent to the last byte
    total        proxy arrival to the last byte
and, for streamed answers, ttft (proxy arrival to the first token) and tpot (time per output
token after the first: from the first to the last token-carrying event, over the output tokens
less 1; the count is the usage chunk's when the client asked for usage, else one per event).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any

import msgspec

PHASES = ("queue", "prefill", "handoff", "first_token", "decode", "total")


@dataclass
class RequestTiming:
    id: str
    endpoint: str
    stream: bool
    started_at: float = field(default_factory=time.time)  # wall clock, for the record
    mode: str = "pd"  # or "pd, first token from the decoder: <reason>", "prefill only", "decode-only: <reason>"
    status: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None  # streamed: the usage chunk's count, else events that carried tokens
    decoder_queue: float | None = None
    queue: float | None = None
    prefill: float | None = None
    handoff: float | None = None
    first_token: float | None = None
    decode: float | None = None
    total: float | None = None
    ttft: float | None = None
    tpot: float | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "finished"}
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


class TimingLog:
    """The last `capacity` requests' timings, by id."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._records: OrderedDict[str, RequestTiming] = OrderedDict()

    def add(self, t: RequestTiming) -> None:
        self._records[t.id] = t
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def get(self, request_id: str) -> RequestTiming | None:
        return self._records.get(request_id)


class SSEEvents:
    """Whole server-sent events out of a byte stream that may split them anywhere."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        # Only the new bytes (and the one before them) are searched, a newline at a time: a long
        # event (a prompt's ids echoed back) comes in many pieces, and a search for the two-byte
        # separator is many times slower than one for a single byte.
        buf = self._pending
        start = max(len(buf) - 1, 0)
        buf += chunk
        i = buf.find(b"\n", start)
        events, head = [], 0
        while i >= 0:
            if buf[i + 1 : i + 2] == b"\n":
                events.append(bytes(buf[head:i]))
                head = i + 2
                i = buf.find(b"\n", head)
            else:
                i = buf.find(b"\n", i + 1)
        del buf[:head]
        return events

    def rest(self) -> bytes:
        """What came after the last whole event."""
        rest = bytes(self._pending)
        self._pending.clear()
        return rest


class StreamClock:
    """Reads a relayed SSE stream for the times of its first and last token-carrying events, and
    the output token count: from the usage chunk when the client asked for one (vLLM may put
    several tokens in one event when its reader lags), else one per event."""

    def __init__(self) -> None:
        self._events = SSEEvents()
        self.first: float | None = None
        self.last: float | None = None
        self.events = 0  # events that carried tokens
        self.usage_tokens: int | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        for event in self._events.feed(chunk):
            if not event.startswith(b"data: {"):
                continue
            try:
                e = _read_event(event[6:])
            except msgspec.ValidationError:  # a shape of its own: read whole
                self.see(event_data(event), now)
                continue
            except msgspec.DecodeError:
                continue
            carries = any(c.text or (c.delta is not None and c.delta.content) for c in e.choices or ())
            self._tick(carries, e.usage.completion_tokens if e.usage is not None else None, now)

    def see(self, data: dict[str, Any] | None, now: float) -> None:
        """One event, already parsed (`event_data`)."""
        if data is None:
            return
        choices, usage = data.get("choices"), data.get("usage")
        carries = isinstance(choices, list) and any(_carries_tokens(c) for c in choices)
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        self._tick(carries, tokens if isinstance(tokens, int) else None, now)

    def _tick(self, carries_tokens: bool, usage_tokens: int | None, now: float) -> None:
        if carries_tokens:
            self.events += 1
            self.first = now if self.first is None else self.first
            self.last = now
        if usage_tokens is not None:
            self.usage_tokens = usage_tokens

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.events

    @property
    def per_token(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        return (self.last - self.first) / (self.tokens - 1)


def event_data(event: bytes) -> dict[str, Any] | None:
    """An event's JSON object; None for `[DONE]`, comments or anything else."""
    if not event.startswith(b"data: {"):
        return None
    try:
        data = msgspec.json.decode(event[6:])
    except msgspec.DecodeError:
        return None
    return data if isinstance(data, dict) else None


def _carries_tokens(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    return bool(choice.get("text") or (isinstance(delta, dict) and delta.get("content")))


# What StreamClock reads of an event, and nothing else: a first event may carry the prompt's
# token ids, which are skipped unread.
class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None


_read_event = msgspec.json.Decoder(_Event).decode

"""The prefiller's first token, streamed to the client at once: TTFT is then the prefiller's.

A streamed completion's first token is the one the prefiller sampled. The proxy sends it to the
client as soon as the prefill answers, and asks the decoder for the rest: the prompt as token ids
with that token appended, one token fewer. The decoder loads the hand-off (all prompt tokens but
the last), computes the last prompt token and the first output token, and samples the second:
what one vLLM would have sampled after that first token. Its stream is relayed under the first
event's id, without the prompt ids it echoes (`return_token_ids`), its usage counted as the
client's request (one prompt token fewer, one output token more).

Only when that continuation is exact; otherwise the decoder samples the first token itself:
- completions only: a chat prompt cannot be sent as token ids (re-rendering the first token's
  text into the template need not give that token back);
- no logprobs (the prefiller computes none), no seed with sampling (a seeded one vLLM draws every
  token from one generator; the decoder would start a new one), no prompt truncation, nothing that
  looks at the output so far (echo, structured output, presence or frequency penalties, bad words,
  logits processors);
- the prefiller stopped for length after exactly one token whose text is whole (an incomplete
  UTF-8 sequence decodes differently with more context), and no stop string may start inside it
  (the decoder only looks for them in its own output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pd.timing import SSEEvents, event_data

DEFAULT_MAX_TOKENS = 16  # vLLM's, for a completion that names none

# Fields that make the continuation inexact (see above): the decoder would see the first token as
# part of the prompt where they look at the output (echoed text, a grammar's state, penalties on
# output tokens, bad word sequences, custom processors).
INEXACT = (
    "logprobs",
    "prompt_logprobs",
    "echo",
    "truncate_prompt_tokens",
    "suffix",
    "prompt_embeds",
    "use_beam_search",
    "structured_outputs",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "bad_words",
    "logits_processors",
)
OUTPUT_PENALTIES = ("presence_penalty", "frequency_penalty")


def eligible(body: dict[str, Any]) -> bool:
    """Whether this completion request can take its first token from the prefiller."""
    if not body.get("stream") or any(body.get(f) is not None and body.get(f) is not False for f in INEXACT):
        return False
    if any(body.get(f) for f in OUTPUT_PENALTIES):
        return False
    if body.get("seed") is not None and body.get("temperature") != 0:
        return False
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    return max_tokens is None or max_tokens > 1


@dataclass
class FirstToken:
    """What the prefiller answered, as the client's stream starts with it."""

    id: str
    created: int
    model: str
    text: str
    token: int
    prompt_ids: list[int]

    def event(self, body: dict[str, Any]) -> bytes:
        """The client's first event, as vLLM would have streamed it."""
        choice: dict[str, Any] = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": None}
        if body.get("return_token_ids"):
            choice.update(prompt_token_ids=self.prompt_ids, token_ids=[self.token])
        data: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if (body.get("stream_options") or {}).get("continuous_usage_stats"):
            n = len(self.prompt_ids)
            data["usage"] = {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def decoder_body(self, body: dict[str, Any], kv_transfer_params: dict[str, Any]) -> dict[str, Any]:
        """The decoder's request: the rest of the completion, after this token."""
        out = {**body, "prompt": [*self.prompt_ids, self.token], "kv_transfer_params": kv_transfer_params}
        max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        out["max_tokens"] = None if max_tokens is None else max_tokens - 1
        if body.get("min_tokens"):
            out["min_tokens"] = body["min_tokens"] - 1
        return out


def first_token(body: dict[str, Any], answer: dict[str, Any]) -> FirstToken | None:
    """The prefiller's token, when the decoder can continue exactly after it (see the module)."""
    try:
        choice = answer["choices"][0]
        text, ids, prompt_ids = choice["text"], choice["token_ids"], choice["prompt_token_ids"]
        first = FirstToken(answer["id"], int(answer["created"]), answer["model"], text, ids[0], list(prompt_ids))
    except (KeyError, IndexError, TypeError, ValueError):
        return None  # a vLLM that does not return token ids
    if choice.get("finish_reason") != "length" or len(ids) != 1 or not text or "\ufffd" in text:
        return None
    stops = body.get("stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        if any(text.endswith(stop[:k]) for k in range(1, len(stop))):
            return None
    return first


class Continuation:
    """Rewrites the decoder's SSE stream as the rest of the client's: the first event's id, no
    echoed prompt ids, usage as the client's request counts it. Events may span chunks."""

    def __init__(self, first: FirstToken):
        self.id = first.id
        self._events = SSEEvents()

    def feed(self, chunk: bytes) -> tuple[bytes, list[dict[str, Any]]]:
        """The whole events in `chunk` so far, rewritten, and each one's data as rewritten (for
        whoever reads the stream's timing, without parsing it again)."""
        out, seen = [], []
        for event in self._events.feed(chunk):
            data = event_data(event)
            if data is not None:  # else [DONE], comments: as they are
                self._rewrite(data)
                seen.append(data)
                event = b"data: " + json.dumps(data).encode()
            out.append(event + b"\n\n")
        return b"".join(out), seen

    def flush(self) -> bytes:
        return self._events.rest()

    def _rewrite(self, data: dict[str, Any]) -> None:
        data["id"] = self.id
        for choice in data.get("choices") or []:
            choice.pop("prompt_token_ids", None)
        usage = data.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            usage["prompt_tokens"] -= 1
            usage["completion_tokens"] = (usage.get("completion_tokens") or 0) + 1

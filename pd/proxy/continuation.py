"""Exact PD: the decoder continues after the prefiller's first token.

The prefiller computes the whole prompt and samples the first output token, as one vLLM would.
Its connector hands off the KV of every prompt position; the proxy asks the decoder for the rest
of the answer: the prompt's token ids (the chat template applied once, by the prefiller) with
that first token appended, one token fewer to generate. The decoder loads the whole prompt's KV,
computes only the first token's position and samples the second: it runs exactly the step one
vLLM runs after its first token, so with greedy decoding the answer is one vLLM's, token for
token. The decoder answers as a completion; the client reads the answer to the request it sent,
streamed or not: a chat completion's message, text and token ids joined, usage as its request
counts it, a completion's logprobs joined. A prefiller that finished (an end of sequence, a stop
string, or `max_tokens` 1) has given the whole answer: no decoder is asked.

Where the decoder cannot continue exactly (`inexact_reason` and `Continuation.inexact` say when),
it samples the first token itself after loading all prompt positions but the last two, which it
computes as a prefill step (pd/plan.py `computed_here`): the first token's logits then come
from another split of the prompt than the prefiller's, and a near tie can go the other way.

A streamed answer whose decoder dies after some tokens goes on on another decoder (`resumed`): the
prompt's ids, the first token and the tokens streamed so far make its prompt, which that decoder
loads from the cache tier or computes; the client's stream goes on where it stopped. Tokens whose
text the client has not had yet (the start of a character of several) are left for that decoder
to sample again, as its detokenizer gives no text after a prompt that ends inside a character;
their ids, which the client has, are not sent twice. Those tokens' KV is computed as a prefill
rather than step by step, so with greedy decoding the rest may part from one vLLM's answer at a
near tie (where the stream cannot go on, it ends with an error, as it would without this).
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
DEFAULT_MAX_TOKENS = 16  # vLLM's, for a completion that names none

# Requests whose continuation would not be exact: the decoder would see the first token as part
# of the prompt where these look at the output (a grammar's state, penalties on output tokens,
# bad word sequences, custom processors, repetition checks).
INEXACT = (
    "prompt_embeds",
    "suffix",
    "use_beam_search",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "bad_words",
    "logits_processors",
    "repetition_detection",
    "thinking_token_budget",
)
OUTPUT_PENALTIES = ("presence_penalty", "frequency_penalty")
# Chat fields that shape the prompt or the chat answer: the prefiller applies them, the decoder's
# completion request leaves them out (`logprobs` and `echo` mean something else there).
CHAT_ONLY = (
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "reasoning_effort",
    "include_reasoning",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "documents",
    "chat_template",
    "chat_template_kwargs",
    "media_io_kwargs",
    "mm_processor_kwargs",
    "return_prompt_text",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "logprob_token_ids",
    "echo",
)


def _set(body: dict[str, Any], name: str) -> bool:
    return body.get(name) is not None and body.get(name) is not False


def inexact_reason(path: str, body: dict[str, Any], chat_parsing: bool = False) -> str | None:
    """Why the decoder must sample this request's first token itself, if it must. `chat_parsing`:
    the instances parse chat answers (a reasoning or tool-call parser), which a chat continued as
    a completion would not be."""
    for name in INEXACT:
        if _set(body, name):
            return name
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") not in (None, "text"):
        return "response_format"
    if any(body.get(f) for f in OUTPUT_PENALTIES):
        return "presence or frequency penalty"
    if body.get("seed") is not None and body.get("temperature") != 0:
        return "seeded sampling"  # one vLLM draws every token from one generator
    if path == CHAT:
        if chat_parsing:
            return "chat answers parsed by vLLM"
        if body.get("tools") and body.get("tool_choice") != "none":
            return "tools"  # vLLM may parse the answer into tool calls
        if body.get("logprobs") or body.get("top_logprobs") or body.get("logprob_token_ids"):
            return "chat logprobs"
        if body.get("echo"):
            return "chat echo"
    return None


def requested_max_tokens(path: str, body: dict[str, Any]) -> int | None:
    """The output tokens the client asked for (None: up to the context's end)."""
    if path == CHAT:
        given = body.get("max_completion_tokens")
        return given if given is not None else body.get("max_tokens")
    return body.get("max_tokens", DEFAULT_MAX_TOKENS)


def prefill_body(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """What the prefiller gets: the client's request for one token, not streamed, with the prompt's
    and the token's ids. Its answer is the first token exactly as one vLLM gives it (logprobs and
    all); the KV is staged for a decoder unless that token is the whole answer."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "max_completion_tokens")}
    out.update(stream=False, max_tokens=1, return_token_ids=True)
    if body.get("min_tokens"):
        out["min_tokens"] = 1  # an end of sequence is no first token
    out["kv_transfer_params"] = {"do_remote_decode": requested_max_tokens(path, body) != 1}
    return out


class Continuation:
    """One request's answer: the prefiller's first token, then whatever the decoder adds after it.
    Raises ValueError when the prefiller's answer lacks what a continuation needs."""

    def __init__(self, path: str, body: dict[str, Any], answer: dict[str, Any]):
        self.path, self.body, self.answer = path, body, answer
        try:
            choice = answer["choices"][0]
            ids = choice["token_ids"]
            self.prompt_ids = list(choice["prompt_token_ids"] if path == COMPLETIONS else answer["prompt_token_ids"])
            self.text: str = choice["text"] if path == COMPLETIONS else choice["message"]["content"] or ""
            self.token: int = ids[0]
            self.finish_reason: str | None = choice["finish_reason"]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"the prefiller's answer has no token ids ({type(e).__name__}: {e})") from None
        if len(ids) != 1 or not all(isinstance(t, int) for t in self.prompt_ids):
            raise ValueError(f"the prefiller answered {len(ids)} tokens, not 1")
        self.id: str = answer.get("id", "")
        self.created: int = answer.get("created", 0)
        self.model: str = answer.get("model", "")
        self.logprobs: dict[str, Any] | None = choice.get("logprobs")
        self._offset = _end_offset(self.logprobs)  # where the decoder's logprob offsets start
        # Output the client has before the decoder's: the first token, and what a decoder that
        # died streamed (`streamed`, its ids; `_text`, the whole text so far); `_resent`: ids the
        # client has that the next decoder samples again.
        self.carried = 1
        self.streamed: list[int] = []
        self._text = self.text
        self._resent = 0

    # ---- what the prefiller said ----
    @property
    def final(self) -> bool:
        """The prefiller's answer is the whole answer: no decoder is asked."""
        return self.finish_reason != "length" or requested_max_tokens(self.path, self.body) == 1

    def inexact(self) -> str | None:
        """Why this first token cannot be continued exactly, if it cannot."""
        if not self.text or "\ufffd" in self.text:
            # Part of a UTF-8 sequence: vLLM's detokenizer, primed with a prompt that ends inside
            # one, does not give the text that one vLLM gives.
            return "first token not whole text"
        if self._stop_could_start():
            return "a stop string could start in the first token"
        return None

    def _stop_could_start(self) -> bool:
        """The output so far ends with the start of a stop string: the decoder, which looks for
        stop strings in its own output only, would miss it."""
        stops = self.body.get("stop") or []
        return any(
            self._text.endswith(stop[:k]) for stop in ([stops] if isinstance(stops, str) else stops)
            for k in range(1, len(stop))
        )  # fmt: skip

    # ---- the decoder's request ----
    def decoder_body(self, kv_transfer_params: dict[str, Any] | None, read_ids: bool = False) -> dict[str, Any]:
        """A completion of the prompt's ids and the output so far: the rest of the answer.
        `read_ids`: the decoder streams its tokens' ids (for the proxy; the client gets them only
        where it asked)."""
        out = {k: v for k, v in self.body.items() if k not in CHAT_ONLY or self.path == COMPLETIONS}
        for name in ("echo", "truncate_prompt_tokens", "truncation_side"):
            out.pop(name, None)  # applied by the prefiller: the ids are the prompt as it was computed
        remaining = requested_max_tokens(self.path, self.body)
        out.update(
            prompt=[*self.prompt_ids, self.token, *self.streamed],
            max_tokens=None if remaining is None else remaining - self.carried,
        )
        if kv_transfer_params is not None:
            out["kv_transfer_params"] = kv_transfer_params
        if self.body.get("min_tokens"):
            out["min_tokens"] = max(self.body["min_tokens"] - self.carried, 0)
        if read_ids or self.body.get("return_token_ids"):
            out["return_token_ids"] = True
        return out

    def resumed(self, relayed: Relayed) -> dict[str, Any] | None:
        """After a decoder that died had streamed what `relayed` holds: the next decoder's request
        for the rest, or None where it could not go on as the answer would (the answer is complete,
        it ends on the start of a stop string, or tokens to sample again carried logprobs the client
        has)."""
        remaining = requested_max_tokens(self.path, self.body)
        if remaining is not None and self.carried + len(relayed.ids) >= remaining:
            return None
        if relayed.held and self.body.get("logprobs") is not None:
            return None
        self._text += relayed.text
        if self._stop_could_start():
            return None
        kept = relayed.ids[: len(relayed.ids) - relayed.held]
        self.streamed += kept
        self.carried += len(kept)
        if self.body.get("return_token_ids"):
            self._resent += relayed.held
        self._offset += len(relayed.text)  # the next decoder's logprob offsets start at its own output
        return self.decoder_body(None, read_ids=True)

    # ---- the client's answer ----
    def whole(self, decoder_answer: dict[str, Any] | None = None) -> dict[str, Any]:
        """The non-streamed answer: the prefiller's, followed by the decoder's (a completion)."""
        out = copy.deepcopy(self.answer)
        out["kv_transfer_params"] = None
        choice = out["choices"][0]
        if decoder_answer is not None:
            rest = decoder_answer["choices"][0]
            self._append(choice, rest.get("text") or "", rest.get("logprobs"), rest.get("token_ids"))
            choice["finish_reason"], choice["stop_reason"] = rest.get("finish_reason"), rest.get("stop_reason")
            out["usage"] = self._usage(decoder_answer.get("usage"))
        self._hide_ids(out, choice)
        return out

    def _append(self, choice: dict[str, Any], text: str, logprobs: Any, token_ids: Any) -> None:
        if self.path == CHAT:
            choice["message"]["content"] = (choice["message"].get("content") or "") + text
        else:
            choice["text"] += text
            if logprobs and choice.get("logprobs"):
                _join_logprobs(choice["logprobs"], logprobs, self._offset)
        if token_ids:
            choice["token_ids"] = [*choice["token_ids"], *token_ids]

    def _hide_ids(self, out: dict[str, Any], choice: dict[str, Any]) -> None:
        """Token ids only where the client asked for them (the proxy always does)."""
        if not self.body.get("return_token_ids"):
            choice["token_ids"] = None
            if self.path == CHAT:
                out["prompt_token_ids"] = None
            else:
                choice["prompt_token_ids"] = None

    def _usage(self, decoder_usage: Any) -> Any:
        """The decoder's usage as the client's request counts it: the output it was given as
        prompt (the first token, and what a decoder before it streamed) counted as output."""
        if not isinstance(decoder_usage, dict) or not isinstance(decoder_usage.get("prompt_tokens"), int):
            return decoder_usage
        usage = dict(decoder_usage)
        usage["prompt_tokens"] -= self.carried
        usage["completion_tokens"] = (usage.get("completion_tokens") or 0) + self.carried
        return usage

    def head(self) -> bytes:
        """The streamed answer's first events, up to and including the first token (and, for a
        final answer, the usage chunk and the end)."""
        stream_options = self.body.get("stream_options") or {}
        continuous = bool(stream_options.get("continuous_usage_stats"))
        asked_ids = bool(self.body.get("return_token_ids"))
        n = len(self.prompt_ids)
        events: list[dict[str, Any]] = []
        choice: dict[str, Any] = {"index": 0}
        if self.path == CHAT:
            role = self.answer["choices"][0]["message"].get("role", "assistant")
            opening = self._chunk({"index": 0, "delta": {"role": role, "content": ""}, "logprobs": None,
                                   "finish_reason": None})  # fmt: skip
            opening.update(prompt_token_ids=self.prompt_ids if asked_ids else None, prompt_text=None)
            if continuous:
                opening["usage"] = _counts(n, 0)
            events.append(opening)
            choice.update(delta={"content": self.text}, logprobs=self.logprobs)
        else:
            choice.update(text=self.text, logprobs=self.logprobs)
        choice["finish_reason"] = None
        if self.final:
            choice.update(finish_reason=self.finish_reason, stop_reason=self.answer["choices"][0].get("stop_reason"))
        elif self.path == COMPLETIONS:
            choice["stop_reason"] = None
        if self.path == COMPLETIONS:
            choice["prompt_token_ids"] = self.prompt_ids if asked_ids else None
        choice["token_ids"] = [self.token] if asked_ids else None
        first = self._chunk(choice)
        if continuous:
            first["usage"] = _counts(n, 1)
        events.append(first)
        tail = b""
        if self.final:
            if stream_options.get("include_usage"):
                usage = {**self._chunk(None), "usage": self.answer.get("usage") or _counts(n, 1)}
                usage["system_fingerprint"] = self.answer.get("system_fingerprint")
                events.append(usage)
            tail = b"data: [DONE]\n\n"
        return b"".join(_sse(e) for e in events) + tail

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.path == CHAT else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice] if choice is not None else []}  # fmt: skip

    def rewrite(self, data: dict[str, Any]) -> dict[str, Any]:
        """One event of the decoder's completion stream as the client's next event."""
        if "choices" not in data and "usage" not in data:
            return data  # an error event: as it is
        out = self._chunk(None)
        asked_ids = bool(self.body.get("return_token_ids"))
        for c in data.get("choices") or []:
            if self.path == CHAT:
                choice = {"index": c.get("index", 0), "delta": {"content": c.get("text") or ""}, "logprobs": None,
                          "finish_reason": c.get("finish_reason")}  # fmt: skip
                if c.get("finish_reason") is not None:
                    choice["stop_reason"] = c.get("stop_reason")
                choice["token_ids"] = c.get("token_ids") if asked_ids else None
            else:
                choice = {**c, "prompt_token_ids": None, "token_ids": c.get("token_ids") if asked_ids else None}
                if c.get("logprobs"):
                    choice["logprobs"] = _shifted(c["logprobs"], self._offset)
            if self._resent and choice.get("token_ids"):  # sampled again: the client has these ids
                ids = choice["token_ids"]
                choice["token_ids"], self._resent = ids[self._resent :], max(self._resent - len(ids), 0)
            out["choices"].append(choice)
        if "usage" in data:
            out["usage"] = self._usage(data["usage"])
        if "system_fingerprint" in data:
            out["system_fingerprint"] = data["system_fingerprint"]
        return out


class Relayed:
    """What a decoder's stream carried so far: its tokens' ids and text, how many of its last
    tokens came with no text (held back by the detokenizer: the start of a character of several),
    and whether it finished (`ended`) and ended (`done`: [DONE] came)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text = ""
        self.held = 0
        self.ended = self.done = False

    def see(self, data: dict[str, Any]) -> None:
        """One event of the stream, as the decoder sent it."""
        for c in data.get("choices") or []:
            ids, text = c.get("token_ids") or [], c.get("text") or ""
            self.ids += ids
            self.text += text
            self.held = 0 if text else self.held + len(ids)
            self.ended = self.ended or c.get("finish_reason") is not None


def _counts(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


def _end_offset(logprobs: dict[str, Any] | None) -> int:
    """Where the text after a completion's logprobs starts: the last token's offset and length."""
    if not logprobs or not logprobs.get("tokens"):
        return 0
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def _shifted(logprobs: dict[str, Any], by: int) -> dict[str, Any]:
    return {**logprobs, "text_offset": [o + by for o in logprobs.get("text_offset") or []]}


def _join_logprobs(into: dict[str, Any], more: dict[str, Any], offset: int) -> None:
    shifted = _shifted(more, offset)
    for key in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
        into[key] = [*(into.get(key) or []), *(shifted.get(key) or [])]

"""A client's request as the proxy reads it: parsed and checked at the door (a 400 naming the bad
field) where the proxy acts on its fields (hand-offs, the tier shortcut), only what it routes on
in front of decoders alone; and whether a hand-off can serve it."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdrun.pd.proxy.continuation import CHAT


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


class _Common(BaseModel):
    """The fields the proxy acts on; everything else passes to vLLM untouched."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    kv_transfer_params: None = Field(None, description="set by the proxy, never by the client")


class CompletionFields(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]


class _FewFields(_Common):
    """CompletionFields but for a prompt of token ids, checked apart (a 16k-token list validated
    by pydantic costs the proxy 0.2 ms; msgspec checks it in a tenth of that)."""

    prompt: None = None


class ChatFields(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


# Pydantic names the first member of a union that failed; say what the field takes instead.
UNION_HINTS = {"prompt": "must be a string, a list of token ids, a list of strings or a list of token id lists"}


def parse_body(raw: bytes, path: str) -> dict[str, Any]:
    """The request as a dict, or BadRequest naming what is wrong."""
    try:
        body = msgspec.json.decode(raw)  # a long prompt's ids parse in a third of json's time
    except msgspec.DecodeError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    schema: type[_Common] = ChatFields if path == CHAT else CompletionFields
    checked = body
    if schema is CompletionFields and _token_ids(body.get("prompt")):
        schema, checked = _FewFields, {**body, "prompt": None}
    try:
        schema.model_validate(checked)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if param == "kv_transfer_params":
            raise BadRequest("kv_transfer_params is set by the proxy; leave it out", param) from None
        msg = UNION_HINTS.get(param or "", err["msg"]) if len(err["loc"]) > 1 else err["msg"]
        raise BadRequest(f"invalid field {param!r}: {msg}", param) from None
    return body


class _Head(msgspec.Struct):
    """What a proxy in front of decoders alone reads of a request it sends on as it came."""

    model: Any = None
    stream: Any = None
    kv_transfer_params: Any = None


class _HeadAndPrompt(_Head):
    """... and the prompt, where the proxy routes on it too (several decoders, prefix_aware)."""

    prompt: Any = None
    messages: Any = None


def parse_head(raw: bytes, with_prompt: bool = False) -> dict[str, Any]:
    """A request for decoders alone: only the fields the proxy routes on, the rest (a long prompt's
    ids most of all) left unread for the decoder, which checks them as plain vLLM does; with
    `with_prompt`, its prompt (or messages) too, as it came, unchecked. A client's
    `kv_transfer_params` is refused here: it would tell a decoder where to pull KV from."""
    try:
        head = msgspec.json.decode(raw, type=_HeadAndPrompt if with_prompt else _Head)
    except msgspec.ValidationError as e:
        raise BadRequest(f"the request body must be a JSON object: {e}") from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if head.kv_transfer_params is not None:
        raise BadRequest("kv_transfer_params is set by the proxy; leave it out", "kv_transfer_params")
    if head.model is not None and not isinstance(head.model, str):
        raise BadRequest("invalid field 'model': must be a string", "model")
    out = {"model": head.model, "stream": _truthy(head.stream)}
    if isinstance(head, _HeadAndPrompt):
        out |= {k: v for k in ("prompt", "messages") if (v := getattr(head, k)) is not None}
    return out


def _truthy(value: Any) -> bool:
    """A boolean field as vLLM's pydantic reads it (lax: "true", "yes", 1, ...)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "on", "t", "true", "y", "yes")
    return value is True or (type(value) is int and value == 1)


def _token_ids(prompt: Any) -> bool:
    """Whether `prompt` is a list of token ids (ints, not bools)."""
    if not isinstance(prompt, list) or not prompt or type(prompt[0]) is not int:
        return False
    try:
        msgspec.convert(prompt, list[int], strict=True)
    except msgspec.ValidationError:
        return False
    return True


def decode_only_reason(body: dict[str, Any]) -> str | None:
    """Why this request cannot be handed off (the decoder must compute the whole prompt), if so."""
    if body.get("prompt_logprobs") is not None or (body.get("echo") and body.get("logprobs") is not None):
        return "prompt logprobs"
    if body.get("n", 1) > 1 or (body.get("best_of") or 1) > 1:
        return "n > 1"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
        return "batched prompts"
    if body.get("max_tokens") == 0 or body.get("max_completion_tokens") == 0:
        return "max_tokens = 0"
    return None


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError", 499: "ClientClosed", 503: "ServiceUnavailableError"}
    err = {"message": message, "type": kind.get(status, "APIError"), "param": param, "code": status}
    return JSONResponse({"error": err}, status_code=status)

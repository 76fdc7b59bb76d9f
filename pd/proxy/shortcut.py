"""The proxy's shortcut past the prefill hop: a request whose prompt the cache tier already holds
(all but a short tail) goes to a decoder alone, which loads the prompt's KV from the tier and
computes the tail itself, rather than to a prefiller that would load the same KV only to hand it on.

The proxy names a prompt's chunks as the instances do (pd/keys.py): the key space (fingerprint
seed and chunk size) is learned from the first hand-off a prefiller returns, and the token ids are
the request's own or, for text and chats, a decoder's `/tokenize`. A prompt too short to fill a
chunk is not looked up. Whatever fails (no key space yet, `/tokenize` or the cache answering late
or not at all) is a miss: the request takes the prefill hop as usual. The decoder does its own
lookup; the proxy's only picks the path.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from pdrun.pd.keys import chained_keys, salted
from pdrun.pd.plan import computed_here
from pdrun.pd.proxy.continuation import CHAT
from pdrun.pd.proxy.routing import prompt_size
from pdrun.pd.proxy.upstream import Upstream, UpstreamError
from pdrun.storage.client import CacheClient

log = logging.getLogger("pdrun.pd.proxy")

TOKENIZE_TIMEOUT_S = 2.0
# What `/tokenize` needs of a chat to build the prompt the decoder will (the rest cannot change it).
CHAT_FIELDS = ("messages", "add_generation_prompt", "continue_final_message", "chat_template",
               "chat_template_kwargs", "tools", "documents", "add_special_tokens")  # fmt: skip


@dataclass(frozen=True)
class KeySpace:
    """What names the chunks of one model's deployment."""

    seed: bytes
    chunk_size: int


class TierShortcut:
    def __init__(self, cache: CacheClient, tail_tokens: int):
        self.cache = cache
        self.tail_tokens = tail_tokens
        self.spaces: dict[str | None, KeySpace] = {}

    def learn(self, model: str | None, params: dict[str, Any]) -> None:
        """Take the key space from a prefiller's hand-off params (its `pdrun` part)."""
        handoff = params.get("pdrun") or {}
        try:
            space = KeySpace(bytes.fromhex(handoff["fingerprint"]), int(handoff["chunk_size"]))
        except (KeyError, TypeError, ValueError):
            return
        if self.spaces.get(model) != space:
            log.info("tier shortcut: chunk keys of %s known (%d-token chunks)", model or "the model", space.chunk_size)
            self.spaces[model] = space
            self.spaces[None] = space  # requests that name no model

    async def held(self, client: Upstream, decoder: str, path: str, body: dict[str, Any]) -> tuple[int, int]:
        """(prompt tokens, of them the leading ones the tier holds in whole chunks); (0, 0) when
        it cannot say."""
        space, salt = self.spaces.get(body.get("model")), body.get("cache_salt")
        if space is None or not _may_fill_a_chunk(body, space.chunk_size) or not isinstance(salt, str | None):
            return 0, 0
        ids = _token_ids(body) or await _tokenize(client, decoder, path, body)
        if not ids:
            return 0, 0
        usable = len(ids) - computed_here(continues=False)  # as the decoder's own lookup
        seed = salted(space.seed, salt)
        keys = chained_keys(seed, space.chunk_size, ids[: max(0, usable)], full_only=True)
        if not keys:
            return len(ids), 0
        count = await asyncio.to_thread(self.cache.lookup, keys)
        return len(ids), count * space.chunk_size

    def takes(self, tokens: int, held: int) -> bool:
        """Whether a decoder should load `held` of the `tokens` and compute the rest itself."""
        return held > 0 and tokens - held <= self.tail_tokens

    def close(self) -> None:
        self.cache.close()


def _token_ids(body: dict[str, Any]) -> list[int] | None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return prompt
    return None


def _may_fill_a_chunk(body: dict[str, Any], chunk_size: int) -> bool:
    """Cheap bound: a prompt of fewer token ids, or characters, than a chunk fills none."""
    return prompt_size(body)[0] >= chunk_size


async def _tokenize(client: Upstream, decoder: str, path: str, body: dict[str, Any]) -> list[int] | None:
    if path == CHAT:
        ask = {k: body[k] for k in CHAT_FIELDS if k in body}
    else:
        ask = {"prompt": body.get("prompt"), "add_special_tokens": body.get("add_special_tokens", True)}
    if "model" in body:
        ask["model"] = body["model"]
    try:
        r = await client.request("POST", f"{decoder}/tokenize", msgspec.json.encode(ask), timeout_s=TOKENIZE_TIMEOUT_S)
        ids = msgspec.json.decode(r.content).get("tokens") if r.status == 200 else None
    except (UpstreamError, msgspec.DecodeError, AttributeError) as e:
        log.debug("tier shortcut: /tokenize on %s failed: %s", decoder, e)
        return None
    return ids if isinstance(ids, list) else None

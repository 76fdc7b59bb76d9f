"""Which prefiller and which decoder serve a request: the proxy's view of its upstream vLLMs.

A backend is in rotation while its `/health` answers 200; a request that cannot reach it takes it
out at once, and the next good health check puts it back. Policies:

- `round_robin`: each role in turn;
- `least_outstanding`: the backend with the fewest requests in flight (ties in turn);
- `prefix_aware`: prefillers by rendezvous hash of the prompt's head, so that prompts sharing a
  prefix meet vLLM's own prefix cache on the same prefiller, and a prefiller leaving moves only
  its own prompts; but never one whose prompt tokens in flight would pass 1.25x the prefillers'
  mean (bounded-load hashing: the next in the prompt's order takes it, so a hot prefix cannot
  pile up on one prefiller); decoders by least outstanding, but a request a decoder computes or
  loads itself (no hand-off) goes to the decoder the proxy sent the longest part of its prompt to
  (pd/proxy/prefixes.py), unless that one has more than 1.25x its share of the requests in flight
  and one more.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import xxhash

from pdrun.pd.proxy.prefixes import SentPrefixes

log = logging.getLogger("pdrun.pd.proxy")

Policy = Literal["round_robin", "least_outstanding", "prefix_aware"]
POLICIES: tuple[str, ...] = ("round_robin", "least_outstanding", "prefix_aware")
AFFINITY_CHARS = 1024  # the head of a prompt that picks its prefiller
AFFINITY_TOKENS = 256
LOAD_BOUND = 1.25  # prefix_aware: most prompt tokens (requests, a decoder) in flight on one backend, over the mean
CHARS_PER_TOKEN = 4  # a text prompt's tokens, estimated


@dataclass(eq=False)
class Backend:
    url: str
    role: Literal["prefill", "decode"]
    healthy: bool = False
    outstanding: int = 0
    pending_tokens: int = 0  # prompt tokens of the requests in flight (estimated for text)
    served: int = 0
    models: set[str] = field(default_factory=set)
    last_error: str = ""
    slow_probes: int = 0  # health checks in a row that timed out

    @property
    def seed(self) -> int:
        """The backend's own hash seed, for rendezvous hashing."""
        return xxhash.xxh3_64_intdigest(self.url.encode())

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            log.warning("%s %s out of rotation: %s", self.role, self.url, reason)
        self.healthy = False
        self.last_error = reason

    def mark_up(self, models: Iterable[str]) -> None:
        if not self.healthy:
            log.info("%s %s in rotation", self.role, self.url)
        self.healthy = True
        self.models = set(models)
        self.last_error = ""

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "outstanding": self.outstanding,
            "pending_tokens": self.pending_tokens,
            "served": self.served,
            "error": self.last_error or None,
        }


def prompt_size(body: dict[str, Any]) -> tuple[int, bool]:
    """(token ids, True) for a prompt of token ids; (characters, False) for text and chats, which
    have at most as many tokens; (0, False) for anything else (batched prompts)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt), True
    if isinstance(prompt, str):
        return len(prompt), False
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict)), False
    return 0, False


def prompt_tokens(body: dict[str, Any]) -> int:
    """A request's prompt tokens: counted for token ids, estimated for text and chats."""
    n, exact = prompt_size(body)
    return n if exact else n // CHARS_PER_TOKEN + 1


def affinity_key(body: dict[str, Any]) -> bytes:
    """The head of the prompt, whatever its form: what prompts sharing a prefix have in common."""
    if "messages" in body:
        return json.dumps(body["messages"], sort_keys=True, ensure_ascii=False)[:AFFINITY_CHARS].encode()
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return b",".join(str(t).encode() for t in prompt[:AFFINITY_TOKENS])
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return str(prompt)[:AFFINITY_CHARS].encode()


class Router:
    def __init__(self, prefill_urls: list[str], decode_urls: list[str], policy: Policy = "prefix_aware"):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if not decode_urls:
            raise ValueError("at least one decoder URL is needed")
        self.policy = policy
        self.prefillers = [Backend(u.rstrip("/"), "prefill") for u in prefill_urls]
        self.decoders = [Backend(u.rstrip("/"), "decode") for u in decode_urls]
        self._turn = itertools.count()
        self.sent = SentPrefixes()  # prefix_aware: what each decoder was sent lately

    @property
    def tracks_prefixes(self) -> bool:
        """Whether decoders are picked by what they were sent (prefix_aware, two or more of them)."""
        return self.policy == "prefix_aware" and len(self.decoders) > 1

    @property
    def backends(self) -> list[Backend]:
        return self.prefillers + self.decoders

    def models(self) -> set[str]:
        return {m for b in self.backends if b.healthy for m in b.models}

    def pick_prefiller(self, body: dict[str, Any], tokens: int = 0) -> Backend | None:
        """The prefiller for a request of `tokens` prompt tokens."""
        live = [b for b in self.prefillers if b.healthy]
        if not live:
            return None
        if self.policy == "prefix_aware":
            key = affinity_key(body)
            ranked = sorted(live, key=lambda b: xxhash.xxh3_64_intdigest(key, seed=b.seed), reverse=True)
            bound = LOAD_BOUND * (sum(b.pending_tokens for b in live) + tokens) / len(live)
            fits = [b for b in ranked if b.pending_tokens + tokens <= bound]
            return fits[0] if fits else min(ranked, key=lambda b: b.pending_tokens)
        return self._pick(live)

    def pick_decoder(self, exclude: Iterable[Backend] = (), prompt: Sequence[int] = ()) -> Backend | None:
        """A decoder for a request; `prompt`: its pieces (prefixes.pieces) where the decoder is to
        compute or load the prompt itself, for prefix_aware to send it where most of it is."""
        skip = set(map(id, exclude))
        live = [b for b in self.decoders if b.healthy and id(b) not in skip]
        if not live:
            return None
        if self.policy == "prefix_aware" and prompt and len(live) > 1:
            bound = LOAD_BOUND * (sum(b.outstanding for b in live) + 1) / len(live) + 1
            fits = [b for b in live if b.outstanding + 1 <= bound]
            depth = {id(b): self.sent.depth(b.seed, prompt) for b in fits}
            deepest = max(depth.values())
            if deepest:
                live = [b for b in fits if depth[id(b)] == deepest]
        return self._pick(live)

    def sent_to(self, decoder: Backend, prompt: Sequence[int]) -> None:
        """`decoder` took a request of these prompt pieces: its prefix cache holds them now."""
        if self.tracks_prefixes and prompt:
            self.sent.sent(decoder.seed, prompt)

    def _pick(self, live: list[Backend]) -> Backend:
        turn = next(self._turn)
        if self.policy == "round_robin":
            return live[turn % len(live)]
        fewest = min(b.outstanding for b in live)
        tied = [b for b in live if b.outstanding == fewest]
        return tied[turn % len(tied)]

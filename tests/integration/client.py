"""Talking to the test servers as the proxy will: prefill with max_tokens=1, then decode."""

from __future__ import annotations

import json
import random
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

MAX_TOKENS = 24


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed * 100_003 + n)
    return [rng.randrange(5, 8192) for _ in range(n)]


def complete(
    url: str,
    tokens: list[int],
    max_tokens: int = MAX_TOKENS,
    kv_transfer_params: dict | None = None,
    timeout: float = 300,
    ignore_eos: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny",
        "prompt": tokens,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        "ignore_eos": ignore_eos,
    }
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_transfer_params
    req = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def token_ids(response: dict[str, Any]) -> list[int]:
    return response["choices"][0]["token_ids"]


@dataclass
class Prefilled:
    """What the prefiller answers the proxy: the first output token, and the hand-off."""

    token: int
    params: dict[str, Any]


def prefill(url: str, tokens: list[int]) -> Prefilled:
    """What the proxy sends the prefiller: the prompt, for one token, its KV staged for a decoder."""
    answer = complete(url, tokens, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    params = answer["kv_transfer_params"]
    assert params and params["do_remote_prefill"] is True, answer
    return Prefilled(token_ids(answer)[0], params)


def computed_with(url: str, tokens: list[int], first: Prefilled, max_tokens: int = MAX_TOKENS) -> list[int]:
    """One vLLM's answer when it computes the prompt's tail and the first token in one prefill step:
    the reference for a decoder that did (after a failed hand-off, or a layer-wise load's partial
    last block). The whole output's token ids."""
    rest = complete(url, [*tokens, first.token], max_tokens - 1)
    return [first.token, *token_ids(rest)]


def continue_after(url: str, tokens: list[int], first: Prefilled, max_tokens: int = MAX_TOKENS) -> list[int]:
    """The decoder's part, as the proxy asks for it: the output after the prefiller's first token,
    the whole prompt's KV loaded. Returns the whole output's token ids."""
    rest = complete(url, [*tokens, first.token], max_tokens - 1, kv_transfer_params=first.params)
    return [first.token, *token_ids(rest)]


def metrics(url: str) -> dict[str, float]:
    """Counter and gauge samples by name plus their labels other than engine/model_name."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("engine", "model_name")}
            name = s.name + "".join(f"[{k}={v}]" for k, v in sorted(labels.items()))
            out[name] = out.get(name, 0.0) + s.value
    return out


WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "an",
    "be",
    "this",
    "are",
    "which",
    "or",
    "his",
    "her",
]


def text_prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


LOADED = "pdrun:loaded_tokens_total"
TIER_PUTS = "pdrun:cache_puts_total[tier=memory]"  # chunks the tier stored, on the cache server's /metrics
LOAD_FAILURES = "pdrun:load_failures_total"
LOCAL_COMPUTE = "vllm:prompt_tokens_by_source_total[source=local_compute]"
EXTERNAL = "vllm:prompt_tokens_by_source_total[source=external_kv_transfer]"


def summed_metrics(urls: list[str]) -> dict[str, float]:
    """metrics() of several servers, each sample summed over them."""
    out: dict[str, float] = {}
    for url in urls:
        for k, v in metrics(url).items():
            out[k] = out.get(k, 0.0) + v
    return out


def wait_for_deltas(
    url: str | list[str], before: dict[str, float], expected: dict[str, float], timeout: float = 15
) -> dict:
    """Counters are exported a step after the request: wait until they reach the expected deltas
    (summed over the servers, given several URLs)."""
    deadline = time.monotonic() + timeout
    while True:
        now = metrics(url) if isinstance(url, str) else summed_metrics(url)
        deltas = {k: now.get(k, 0.0) - before.get(k, 0.0) for k in expected}
        if deltas == expected or time.monotonic() > deadline:
            return deltas
        time.sleep(0.2)


def threads_and_fds(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a live process."""
    threads = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Threads:"))
    return int(threads.split()[1]), len(list(Path(f"/proc/{pid}/fd").iterdir()))

"""A new deployment's first hand-off from a prefiller to a decoder costs more than any after it:
the decoder connects to the prefiller's staging endpoint and maps its staging memory (over a
second between two GPUs). `pdrun launch` pays that before it says it is ready, with one short
request per prefiller-decoder pair, sent to the instances themselves as the proxy would send it,
so that the first users' requests do not."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import httpx

from pdrun.pd.params import TIMING
from pdrun.pd.proxy.continuation import COMPLETIONS, Continuation, prefill_body

WARMUP_TIMEOUT_S = 120.0  # one request of a few hundred tokens, on a slow CPU backend included
# A few hundred tokens, new each time: no instance holds them, so the decoder loads a hand-off.
FILLER = "a short text that pdrun sends once from each prefiller to each decoder before it is ready. " * 4


def warm_pair(client: httpx.Client, prefiller: str, decoder: str, model: str) -> float:
    """One hand-off from `prefiller` to `decoder` (their base URLs), pulled: the seconds the decoder
    took to load it. Raises on failure."""
    body = {"model": model, "prompt": f"{secrets.token_hex(8)} {FILLER}", "max_tokens": 2, "temperature": 0}
    r = client.post(f"{prefiller}{COMPLETIONS}", json=prefill_body(COMPLETIONS, body))
    r.raise_for_status()
    answer = r.json()
    params = answer.get("kv_transfer_params")
    if not params:
        raise ValueError("the prefiller handed nothing off (no kv_transfer_params in its answer)")
    r = client.post(f"{decoder}{COMPLETIONS}", json=Continuation(COMPLETIONS, body, answer).decoder_body(params))
    r.raise_for_status()
    reported = (r.json().get("kv_transfer_params") or {}).get(TIMING) or {}
    if "load_s" not in reported:
        raise ValueError("the decoder loaded no hand-off")
    return float(reported["load_s"])


def warm_up(prefillers: dict[str, str], decoders: dict[str, str], model: str, say: Callable[[str], None]) -> int:
    """Every prefiller-decoder pair (name -> base URL) warmed; a pair that fails is said and left
    to its first request. Returns how many pairs were warmed."""
    warmed = 0
    with httpx.Client(timeout=WARMUP_TIMEOUT_S) as client:
        for p_name, p_url in prefillers.items():
            for d_name, d_url in decoders.items():
                t0 = time.monotonic()
                try:
                    load_s = warm_pair(client, p_url, d_url, model)
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                    say(f"hand-off {p_name} -> {d_name} not warmed ({type(e).__name__}: {e}); its first request pays")
                    continue
                warmed += 1
                say(f"hand-off {p_name} -> {d_name} warmed in {time.monotonic() - t0:.2f}s (its load {load_s:.3f}s)")
    return warmed

"""Metrics a user can trust and `pdrun profile requests`, on the session's 1P2D deployment.

Known traffic goes through the proxy; every counter it should move, on the proxy, the instances
and the cache server, moves by exactly what that traffic implies.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.client import (
    LOAD_FAILURES,
    LOADED,
    complete,
    metrics,
    prompt,
    summed_metrics,
    text_prompt,
    wait_for_deltas,
)
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

CHUNK = 256
TIER_PUTS = "pdrun:cache_puts_total[tier=memory]"


def ready(cluster) -> None:
    names = ["prefill-0"] + [d.name for d in cluster.decoders]
    cluster.deployment.wait_ready(names, timeout=400)


def settle(cluster) -> None:
    """vLLM exports an instance's connector counters at its engine steps: writes behind that ended
    after its last step wait for the next. Wait for the cache server's puts (counted at once) to
    stop moving, then give each instance a step with a 10-token prompt, which neither looks up nor
    stores a chunk."""
    cache = cluster.deployment.cache_metrics_url
    last, stable_since = None, time.monotonic()
    while time.monotonic() - stable_since < 1.5:
        now = metrics(cache).get(TIER_PUTS)
        if now != last:
            last, stable_since = now, time.monotonic()
        time.sleep(0.2)
    for url in [cluster.prefiller.url] + [d.url for d in cluster.decoders]:
        complete(url, prompt(10, seed=9999), max_tokens=1)


def test_metrics_count_known_traffic_exactly(cluster):
    ready(cluster)
    proxy, prefiller = cluster.proxy_url, cluster.prefiller.url
    decoders = [d.url for d in cluster.decoders]
    cache = cluster.deployment.cache_metrics_url
    settle(cluster)
    before = {"proxy": metrics(proxy), "prefill": metrics(prefiller), "cache": metrics(cache)}
    before["decode"] = summed_metrics(decoders)

    lengths = (600, 300, 520)  # two non-streamed, one streamed: fresh prompts, nothing cached
    prompts = [prompt(n, seed=9001) for n in lengths]
    common = {"model": "tiny", "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=proxy, timeout=300) as c:
        for p in prompts[:2]:
            assert c.post("/v1/completions", json={**common, "prompt": p, "max_tokens": 5}).status_code == 200
        streamed = {**common, "prompt": prompts[2], "max_tokens": 6, "stream": True}
        with c.stream("POST", "/v1/completions", json=streamed) as r:
            assert r.status_code == 200 and b"[DONE]" in r.read()
        chat = c.post(
            "/v1/chat/completions",
            json={**common, "messages": [{"role": "user", "content": text_prompt(200, seed=9002)}], "max_tokens": 5},
        )
        assert chat.status_code == 200
        chat_prompt = chat.json()["usage"]["prompt_tokens"]
        # Decode-only: prompt logprobs cannot be handed off.
        alone = {**common, "prompt": prompt(100, seed=9003), "max_tokens": 3, "prompt_logprobs": 1}
        assert c.post("/v1/completions", json=alone).status_code == 200
        bad = c.post("/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
        unknown = c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert (bad.status_code, unknown.status_code) == (400, 404)

    pd_prompts = [*lengths, chat_prompt]
    handed = sum(pd_prompts)  # every prompt position
    full_chunks = sum(n // CHUNK for n in pd_prompts)
    looked_up = sum((n - 2) // CHUNK for n in pd_prompts) * CHUNK  # an instance computes the last two itself
    completions, chats = "[endpoint=/v1/completions]", "[endpoint=/v1/chat/completions]"
    phase = "pdrun:proxy_phase_seconds_count[phase={}]".format
    want_proxy = {
        f"pdrun:proxy_requests_total{completions}[status=200]": 4,
        f"pdrun:proxy_requests_total{chats}[status=200]": 1,
        f"pdrun:proxy_requests_total{completions}[status=400]": 1,
        f"pdrun:proxy_requests_total{completions}[status=404]": 1,
        "pdrun:proxy_handoffs_total": 4,
        "pdrun:proxy_decode_only_total[reason=prompt logprobs]": 1,
        "pdrun:proxy_decode_retries_total": 0,
        "pdrun:proxy_handoff_tokens_total": handed,
        phase("queue"): 4,
        phase("prefill"): 4,
        phase("handoff"): 3,  # the non-streamed hand-offs: vLLM reports the decoder's side there only
        phase("first_token"): 1,
        phase("decode"): 5,
        "pdrun:proxy_ttft_seconds_count": 1,
        "pdrun:proxy_tpot_seconds_count": 1,
        "pdrun:proxy_request_seconds_count": 5,
    }
    got = wait_for_deltas(proxy, before["proxy"], want_proxy)
    assert got == want_proxy, {k: (got[k], v) for k, v in want_proxy.items() if got[k] != v}

    want_cache = {TIER_PUTS: full_chunks, "pdrun:cache_hits_total[tier=memory]": 0}
    assert wait_for_deltas(cache, before["cache"], want_cache) == want_cache
    settle(cluster)
    want_prefill = {
        "pdrun:staged_chunks_total": sum(math.ceil(n / CHUNK) for n in pd_prompts),
        "pdrun:cache_lookup_tokens_total": looked_up,
        "pdrun:cache_hit_tokens_total": 0,
        "pdrun:cache_stored_chunks_total": full_chunks,
    }
    assert wait_for_deltas(prefiller, before["prefill"], want_prefill) == want_prefill
    want_decode = {LOADED: handed, "pdrun:loads_total": 4, LOAD_FAILURES: 0, "pdrun:cache_lookup_tokens_total": 0}
    assert wait_for_deltas(decoders, before["decode"], want_decode) == want_decode

    # The ratios agree with the counters they come from.
    p = metrics(prefiller)
    assert p["pdrun:cache_hit_ratio"] == pytest.approx(
        p["pdrun:cache_hit_tokens_total"] / p["pdrun:cache_lookup_tokens_total"]
    )
    s = metrics(cache)
    asked = s["pdrun:cache_hits_total[tier=memory]"] + s["pdrun:cache_misses_total[tier=memory]"]
    assert s["pdrun:cache_hit_ratio[tier=memory]"] == pytest.approx(
        s["pdrun:cache_hits_total[tier=memory]"] / asked if asked else 0.0
    )


def run_profile(cluster, tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / f"requests{len(list(tmp_path.iterdir()))}.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdrun.launch",
            "profile",
            "requests",
            "--url",
            cluster.proxy_url,
            *args,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


@pytest.mark.parametrize("stream", [True, False])
def test_profile_requests_shows_where_the_time_went(cluster, tmp_path, stream):
    ready(cluster)
    args = ["-n", "2", "--prompt-tokens", "40,600", "--max-tokens", "4", "--concurrency", "2"]
    result, stdout = run_profile(cluster, tmp_path, *args, "--stream" if stream else "--no-stream")
    records = result["requests"]
    assert [r["asked_prompt_tokens"] for r in records] == [40, 40, 600, 600]
    for r in records:
        # The first token is the prefiller's where the decoder can go on exactly after it
        # (pd/proxy/continuation.py; not after a random token whose text is empty or partial).
        continued = r["mode"] == "pd"
        assert continued or r["mode"].startswith("pd, first token from the decoder: "), r["mode"]
        assert r["status"] == 200 and r["stream"] is stream
        assert r["prompt_tokens"] == r["asked_prompt_tokens"]  # the prefiller's own count
        assert r["queue"] >= 0 and r["prefill"] > 0 and r["decode"] > 0
        assert r["total"] >= r["queue"] + r["prefill"] + r["decode"] - 1e-3
        assert r["total"] <= r["client_total"] + 1e-3  # the proxy's window lies inside the client's
        if stream:
            assert r["handoff"] is None and 0 < r["first_token"] <= r["decode"]
            assert r["tpot"] >= 0 and r["output_tokens"] == 4
            if continued:  # sent before the decoder was asked
                assert 0 < r["ttft"] <= r["total"] - r["decode"] + 1e-3
            else:
                assert r["ttft"] >= r["first_token"]
        else:
            assert r["first_token"] is None and 0 <= r["handoff"] <= r["decode"]
            assert r["output_tokens"] == 4 and r["decoder_queue"] >= 0
    for name, qs in result["percentiles"].items():
        values = [qs["p50"], qs["p90"], qs["p99"]]
        if name in ("handoff", "first_token", "ttft", "tpot") and (name == "handoff") == stream:
            assert values == [None, None, None], name
        else:
            assert values[0] <= values[1] <= values[2], name
    for column in ("queue", "prefill", "handoff", "first_token", "total", "p50", "p99"):
        assert column in stdout


def test_profile_requests_names_a_url_that_is_no_proxy():
    url = f"http://127.0.0.1:{free_port()}"
    r = subprocess.run(
        [sys.executable, "-m", "pdrun.launch", "profile", "requests", "--url", url, "-n", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and f"{url}: no model listed at /v1/models" in r.stderr

"""Exact PD for every request kind: through the proxy, a greedy answer is plain vLLM's, token for
token (text, token ids, finish reason, usage, logprobs), for completions of text and of token ids
and for chats sharing a long system prompt, streamed or not, one at a time and eight at once; the
decoders loaded every prompt and computed no prompt token of their own."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdrun.launch.vllm_server import ServerSpec, VllmServer
from pdrun.pd.proxy.app import IN_TIER, ProxySettings
from tests.integration.client import (
    EXTERNAL,
    LOAD_FAILURES,
    LOCAL_COMPUTE,
    complete,
    continue_after,
    metrics,
    prefill,
    prompt,
    summed_metrics,
    text_prompt,
    token_ids,
    wait_for_deltas,
)
from tests.integration.conftest import DECODER_IO_TIMEOUT_S, free_port, start_deployment

pytestmark = pytest.mark.integration
MAX_TOKENS = 24
LOADS = "pdrun:loads_total"
EVICTIONS = "pdrun:staging_evictions_total"  # staged chunks evicted while a decoder awaited them
DEFERRED = "pdrun:staging_deferred_prefills_total"  # prefills held back until decoders made room
SYSTEM = text_prompt(1200, seed=4000)  # shared by every chat: the tier and prefix caches meet it


@dataclass(frozen=True)
class Case:
    kind: str  # "text", "ids" or "chat"
    size: int  # words, tokens, or the user's words after the system prompt
    seed: int
    logprobs: bool = False

    def path(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"

    def body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
        if self.kind == "chat":
            user = text_prompt(self.size, seed=self.seed)
            body["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        else:
            text = self.kind == "text"
            body["prompt"] = text_prompt(self.size, seed=self.seed) if text else prompt(self.size, self.seed)
            if self.logprobs:
                body["logprobs"] = 2
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body


def cases(n_each: int, seed: int) -> list[Case]:
    """Prompts of random lengths up to about 3000 tokens, of each kind."""
    rng = random.Random(seed)
    out = []
    for i in range(n_each):
        out.append(Case("text", rng.randrange(1, 2900), seed * 1000 + i, logprobs=i % 3 == 0))
        out.append(Case("ids", rng.randrange(1, 3001), seed * 1000 + i, logprobs=i % 3 == 1))
        out.append(Case("chat", rng.randrange(1, 1500), seed * 1000 + i))
    return out


def answer(url: str, case: Case, stream: bool) -> dict[str, Any]:
    """What a client reads: the text, token ids, finish reason, usage and logprobs, streamed or not."""
    body = case.body(stream)
    chat = case.kind == "chat"
    if not stream:
        r = httpx.post(f"{url}{case.path()}", json=body, timeout=300)
        assert r.status_code == 200, r.text
        a = r.json()
        choice = a["choices"][0]
        return {
            "text": choice["message"]["content"] if chat else choice["text"],
            "token_ids": choice["token_ids"],
            "prompt_token_ids": a["prompt_token_ids"] if chat else choice["prompt_token_ids"],
            "finish_reason": choice["finish_reason"],
            "usage": {k: a["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
            "logprobs": choice["logprobs"],
        }
    text, ids, prompt_ids, finish, usage, ids_seen = "", [], None, None, None, set()
    logprobs: dict[str, list] | None = None
    with httpx.stream("POST", f"{url}{case.path()}", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = httpx.Response(200, content=line[6:]).json()
            ids_seen.add(event["id"])
            prompt_ids = prompt_ids or event.get("prompt_token_ids")
            for c in event["choices"]:
                text += (c["delta"].get("content") or "") if chat else c["text"]
                ids += c.get("token_ids") or []
                prompt_ids = prompt_ids or c.get("prompt_token_ids")
                finish = c.get("finish_reason") or finish
                if c.get("logprobs"):
                    logprobs = logprobs or {}
                    for k, v in c["logprobs"].items():
                        logprobs.setdefault(k, []).extend(v)
            if event.get("usage"):
                usage = {k: event["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert len(ids_seen) == 1  # one stream, one id
    return {"text": text, "token_ids": ids, "prompt_token_ids": prompt_ids, "finish_reason": finish, "usage": usage,
            "logprobs": logprobs}  # fmt: skip


# A decoder that recomputes a prompt's tail (the tier shortcut) computes those tokens in a batch of
# another shape than one vLLM did: on vLLM's CPU backend float32 logprobs then move by up to ~6e-6,
# as they do in one vLLM alone (examples/first_step_numerics.py); requests served many at once meet
# in batches of other shapes too. Tokens, text and candidates must be equal; logprob values within
# this compare equal.
LOGPROB_TOLERANCE = 1e-5


def _logprobs_close(got: Any, want: Any) -> bool:
    if isinstance(got, float) and isinstance(want, float):
        return abs(got - want) <= LOGPROB_TOLERANCE
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_logprobs_close(got[k], want[k]) for k in want)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(map(_logprobs_close, got, want))
    return got == want


def first_difference(got: dict[str, Any], want: dict[str, Any]) -> str:
    """What differs first between two answers; "" for none (logprobs within LOGPROB_TOLERANCE)."""
    for key in want:
        if key == "logprobs" and _logprobs_close(got[key], want[key]):
            continue
        if got[key] != want[key]:
            if key == "token_ids":
                at = next((i for i, (a, b) in enumerate(zip(got[key], want[key], strict=False)) if a != b), None)
                return f"token ids part at {at}: {got[key]} != {want[key]}"
            return f"{key}: {got[key]!r} != {want[key]!r}"
    return ""


CONTINUED = "pdrun:proxy_continued_total"
HANDOFFS = "pdrun:proxy_handoffs_total"
SHORTCUTS = f"pdrun:proxy_decode_only_total[reason={IN_TIER}]"
PREFILL_ONLY = "pdrun:proxy_prefill_only_total"
TAIL = ProxySettings.model_fields["tier_shortcut_tokens"].default
DECODER_FIRST = "pdrun:proxy_decoder_first_tokens_total"


def decoder_first_tokens(proxy_metrics: dict[str, float]) -> float:
    return sum(v for k, v in proxy_metrics.items() if k.startswith(DECODER_FIRST))


def test_every_request_kind_equals_plain_vllm_one_at_a_time(cluster):
    todo = [(case, stream) for case in cases(14, seed=1) for stream in (False, True)]
    decoders = [d.url for d in cluster.decoders]
    before, before_proxy = summed_metrics(decoders), metrics(cluster.proxy_url)
    differ = []
    for case, stream in todo:
        got, want = answer(cluster.proxy_url, case, stream), answer(cluster.plain.url, case, stream)
        assert want["finish_reason"] == "length" or want["usage"]["completion_tokens"] < MAX_TOKENS
        if why := first_difference(got, want):
            differ.append(f"{case} stream={stream}: {why}")
    assert not differ, f"{len(differ)} of {len(todo)} differ from plain vLLM:\n" + "\n".join(differ)

    # Every request was handed off, or (a prompt sent before, a chat's shared system prompt) went to
    # a decoder that took it from the cache tier but a short tail, or ended with the prefiller's
    # first token (a stop: the prefiller's answer is the whole answer). Hand-offs the decoders
    # continued after the prefiller's token, computing only its position: no prompt token (one that
    # samples the first token itself computes two).
    proxy = metrics(cluster.proxy_url)
    paths = {k: v - before_proxy.get(k, 0) for k, v in proxy.items() if k.startswith("pdrun:proxy_") and "_total" in k}
    handoffs, continued = paths[HANDOFFS], paths[CONTINUED]
    shortcuts, whole = paths.get(SHORTCUTS, 0), paths.get(PREFILL_ONLY, 0)
    sampled = decoder_first_tokens(proxy) - decoder_first_tokens(before_proxy)
    assert handoffs + shortcuts + whole == len(todo), {k: v for k, v in paths.items() if v}
    assert continued + sampled == handoffs and continued >= 0.9 * handoffs
    assert shortcuts > 0  # each prompt is sent twice: the shortcut's answers are among those compared
    after = summed_metrics(decoders)
    computed = after[LOCAL_COMPUTE] - before.get(LOCAL_COMPUTE, 0)
    assert continued + sampled <= computed <= continued + 2 * sampled + shortcuts * (TAIL + 2)
    assert after[EXTERNAL] - before.get(EXTERNAL, 0) > 0 and after[LOAD_FAILURES] == before.get(LOAD_FAILURES, 0)


def test_one_vllm_continues_bit_for_bit_as_a_decoder_does_and_moves_only_by_a_recomputed_tail(cluster):
    """Plain vLLM, sent a prompt with its first token appended: where the prompt ends on a KV
    block's edge (128 tokens on the CPU backend) only that token is computed, the step a decoder
    runs after a hand-off, and every logprob equals continuing; inside a block, the recomputed
    tail moves them, within LOGPROB_TOLERANCE; the tokens are equal either way."""
    script = Path(__file__).parents[2] / "examples" / "first_step_numerics.py"
    run = subprocess.run(
        [sys.executable, str(script), "--url", cluster.plain.url, "--lengths", "1024,1216,64"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = run.stdout.splitlines()[1:]
    rows = {int(n): (equal, float(diff)) for n, equal, diff in (line.split(" | ") for line in lines)}
    assert sorted(rows) == [1024, 1088, 1152, 1216], run.stdout
    assert all(equal == "True" for equal, _ in rows.values()), run.stdout
    assert rows[1024][1] == rows[1152][1] == 0.0, run.stdout
    assert max(diff for _, diff in rows.values()) <= LOGPROB_TOLERANCE, run.stdout


# ---- eight at once: on CPU, vLLM's attention splits a lone decode's KV over threads and a batch's
# not, so plain vLLM answers a batch as it answers one request only with that split off (its
# batch-invariant mode does not cover the CPU backend). Both sides run so, in a deployment of their own.


@dataclass
class Invariant:
    plain: VllmServer
    proxy_url: str
    prefiller_url: str
    decoder_url: str


# The prefiller's staging pool: 24 chunks of the tiny model (512 KiB each), a step's worth (vLLM
# computes at most 4096 tokens a step here), a few requests' worth of hand-offs.
STAGING_GB = 12 / 1024


@pytest.fixture(scope="module")
def invariant(cluster, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Invariant]:
    logs = tmp_path_factory.mktemp("invariant")
    cluster.deployment.stop()  # the session's deployment is done with (after_deployment): room for these
    plain = VllmServer(ServerSpec(model=str(model_dir), port=free_port(), dtype="float32"), logs / "plain.log")
    deployment = None
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("VLLM_CPU_ATTN_SPLIT_KV", "0")  # the instances inherit it
            plain.start()
            connector = {"io_timeout_s": DECODER_IO_TIMEOUT_S, "connect_timeout_s": 2.0, "staging_gb": STAGING_GB}
            deployment = start_deployment(
                model_dir, logs / "run", None, prefill=1, decode=1, cache_cpu_gb=0, connector=connector
            )
        deployment.wait_ready(["prefill-0", "decode-0"], timeout=600)
        plain.wait_healthy(timeout=600)
        children = deployment.state()["children"]
        yield Invariant(plain, deployment.proxy_url, children["prefill-0"]["url"], children["decode-0"]["url"])
    finally:
        plain.stop()
        if deployment is not None:
            deployment.stop()
            time.sleep(1)
            assert not deployment.processes()


@pytest.mark.after_deployment
def test_eight_at_once_equal_plain_vllm_one_at_a_time(invariant):
    todo = [(case, stream) for case in cases(3, seed=2)[:8] for stream in (False, True)]
    plain = invariant.plain.url
    alone = {job: answer(plain, *job) for job in todo}
    with ThreadPoolExecutor(8) as pool:
        batched = dict(zip(todo, pool.map(lambda job: answer(plain, *job), todo), strict=True))
    assert batched == alone  # plain vLLM itself answers a batch as it answers each request alone
    before, before_pre = metrics(invariant.decoder_url), metrics(invariant.prefiller_url)
    with ThreadPoolExecutor(8) as pool:
        pd = dict(zip(todo, pool.map(lambda job: answer(invariant.proxy_url, *job), todo), strict=True))
    # Tokens, text and all exactly; logprob values within LOGPROB_TOLERANCE, as one at a time:
    # requests that meet in one batch can move them in the last bits.
    differ = [f"{job}: {why}" for job in todo if (why := first_difference(pd[job], alone[job]))]
    assert not differ, "\n".join(differ)
    after = metrics(invariant.decoder_url)
    assert after[EXTERNAL] > before.get(EXTERNAL, 0)
    # Their hand-offs (up to 6 MB each) overflow the 12 MiB staging pool: prefills waited, none was lost.
    assert after.get(LOAD_FAILURES, 0) == before.get(LOAD_FAILURES, 0)
    assert metrics(invariant.prefiller_url).get(EVICTIONS, 0) == before_pre.get(EVICTIONS, 0)


@pytest.mark.after_deployment
def test_hand_offs_several_times_the_staging_pool_are_all_pulled_none_lost(invariant):
    """16 hand-offs at once, about 110 chunks, through a pool of 24, each decoder coming a second
    after its prefill (decoders slower than the prefiller): the prefiller holds prefills back until
    decoders pull rather than evict what they are about to pull."""
    prompts = [prompt(1024 + 37 * i, seed=400 + i) for i in range(16)]
    want = [token_ids(complete(invariant.plain.url, p)) for p in prompts]
    pre, dec = invariant.prefiller_url, invariant.decoder_url
    before_pre, before_dec = metrics(pre), metrics(dec)

    def prefill_then_decode_late(tokens: list[int]) -> list[int]:
        first = prefill(pre, tokens)
        time.sleep(1.0)  # a busy decoder: the pool holds four requests' hand-offs meanwhile
        return continue_after(dec, tokens, first)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(prefill_then_decode_late, prompts))
    assert got == want
    expected = {LOADS: 16, LOAD_FAILURES: 0}
    assert wait_for_deltas(dec, before_dec, expected) == expected
    after_pre = metrics(pre)
    assert after_pre.get(EVICTIONS, 0) - before_pre.get(EVICTIONS, 0) == 0
    assert after_pre.get(DEFERRED, 0) - before_pre.get(DEFERRED, 0) > 0  # the pool was full: prefills waited

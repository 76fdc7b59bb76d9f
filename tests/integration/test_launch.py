"""`pdrun launch` 1P2D as a user runs it: the official openai client through the proxy gets what a
plain vLLM answers, on both decoders; bad requests get a 4xx with the reason; a client leaving
cancels the upstream work; a decoder killed under load costs no request and rejoins; Ctrl-C leaves
no process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from pdrun import transfer
from tests.integration.client import LOADED, metrics, prefill, prompt, text_prompt
from tests.integration.conftest import Instance

pytestmark = pytest.mark.integration


def clients(cluster) -> tuple[openai.OpenAI, openai.OpenAI]:
    """(through the proxy, straight to the plain vLLM)"""
    kw = dict(api_key="none", max_retries=0, timeout=300)
    return openai.OpenAI(base_url=f"{cluster.proxy_url}/v1", **kw), openai.OpenAI(
        base_url=f"{cluster.plain.url}/v1", **kw
    )


def completion(client: openai.OpenAI, prompt: str, stream: bool, max_tokens: int = 16) -> tuple[str, dict]:
    kw = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)
    if not stream:
        r = client.completions.create(**kw)
        return r.choices[0].text, r.usage.model_dump()
    text, usage = [], None
    for ev in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if ev.choices:
            text.append(ev.choices[0].text)
        if ev.usage:
            usage = ev.usage.model_dump()
    return "".join(text), usage


def chat(client: openai.OpenAI, content: str, stream: bool, max_tokens: int = 16) -> tuple[str, dict]:
    kw = dict(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0)
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.usage.model_dump()
    text, usage = [], None
    for ev in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if ev.choices:
            text.append(ev.choices[0].delta.content or "")
        if ev.usage:
            usage = ev.usage.model_dump()
    return "".join(text), usage


def test_each_hand_off_path_is_warmed_before_the_deployment_says_it_is_ready(cluster):
    """A decoder's first hand-off from a prefiller (its connection, the staging memory mapped)
    costs more than any after it: `pdrun launch` pays it for every pair before it is ready."""
    out = cluster.deployment.output()
    ready_at = out.index("ready: 1P2D")
    for d in cluster.decoders:
        warmed = re.search(rf"hand-off prefill-0 -> {d.name} warmed in [\d.]+s \(its load [\d.]+s\)", out)
        assert warmed is not None and warmed.start() < ready_at, out[-3000:]
    assert "not warmed" not in out
    assert cluster.deployment.state()["ready"] is True


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind", [completion, chat], ids=["completions", "chat"])
def test_openai_client_gets_plain_vllms_answers_from_both_decoders(cluster, kind, stream):
    proxy, plain = clients(cluster)
    before = {d.name: metrics(d.url).get(LOADED, 0) for d in cluster.decoders}
    for seed, words in enumerate((40, 300, 900, 1500)):
        prompt = text_prompt(words, seed=seed + (100 if stream else 0) + (1000 if kind is chat else 0))
        got, want = kind(proxy, prompt, stream), kind(plain, prompt, stream)
        assert got == want  # the text, and usage counting the whole prompt and the completion
        assert want[1]["prompt_tokens"] > words / 2
    # Decoders take turns when equally idle: each one loaded KV for these requests.
    after = {d.name: metrics(d.url).get(LOADED, 0) for d in cluster.decoders}
    assert all(after[name] > before[name] for name in before), (before, after)


def test_a_streamed_completion_takes_its_first_token_from_the_prefiller(cluster):
    """Text, token ids, prompt ids and usage as plain vLLM streams them, under one id; the first
    token is the prefiller's, the decoder continues after it."""
    body = {"model": "tiny", "prompt": text_prompt(600, seed=21), "max_tokens": 12, "temperature": 0, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}  # fmt: skip

    def streamed(url: str) -> tuple[list[dict], str | None]:
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
            return events, r.headers.get("x-pdrun-request-id")

    def seen(events: list[dict]) -> tuple:
        choices = [c for e in events for c in e["choices"]]
        ids = [t for c in choices for t in c.get("token_ids") or []]
        prompts = [c["prompt_token_ids"] for c in choices if c.get("prompt_token_ids")]
        return "".join(c["text"] for c in choices), ids, prompts, events[-1]["usage"]

    (got, request_id), (want, _) = streamed(cluster.proxy_url), streamed(cluster.plain.url)
    assert seen(got) == seen(want)
    assert len(seen(got)[1]) == 12 and len({e["id"] for e in got}) == 1
    timing = httpx.get(f"{cluster.proxy_url}/pdrun/requests/{request_id}").json()
    assert timing["mode"] == "pd" and timing["output_tokens"] == 12


def test_the_kv_and_cache_ports_serve_only_who_gives_the_deployments_auth_token(cluster):
    d = cluster.deployment
    token_file = d.run_dir / "auth-token"
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(d.auth_token) >= 16
    first = prefill(cluster.prefiller.url, prompt(300, seed=20))
    kv_port = first.params["pdrun"]["endpoints"][0]
    for address, op in ((kv_port, "release"), (d.cache_address, "stats")):
        with (
            pytest.raises(transfer.RemoteError, match="unauthorized: no auth token"),
            transfer.connect(address, auth_token=None) as conn,
        ):
            conn.call(op, meta={"transfer": first.params["pdrun"]["transfer"]})
        with pytest.raises(transfer.Unauthorized, match="auth token"):
            transfer.connect(address, auth_token="not the token")
        with transfer.connect(address, auth_token=d.auth_token) as conn:
            conn.call(op, meta={"transfer": first.params["pdrun"]["transfer"]})


def test_models_health_and_proxy_metrics(cluster):
    models = httpx.get(f"{cluster.proxy_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    health = httpx.get(f"{cluster.proxy_url}/health").json()
    assert health["healthy"] and len(health["prefill"]) == 1 and len(health["decode"]) == 2
    before = metrics(cluster.proxy_url)
    proxy, _ = clients(cluster)
    completion(proxy, text_prompt(50, seed=7), stream=False)
    after = metrics(cluster.proxy_url)
    ok = "pdrun:proxy_requests_total[endpoint=/v1/completions][status=200]"
    assert after[ok] - before.get(ok, 0) == 1
    assert after["pdrun:proxy_handoffs_total"] - before["pdrun:proxy_handoffs_total"] == 1


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"model": "gpt-17", "prompt": "hi"}).encode(), 404, "gpt-17"),
        (json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": -5}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "tiny"}).encode(), 400, "prompt"),
        (json.dumps({"model": "tiny", "prompt": "hi", "kv_transfer_params": {}}).encode(), 400, "kv_transfer_params"),
        (json.dumps({"model": "tiny", "prompt": "word " * 5000, "max_tokens": 4}).encode(), 400, "context length"),
        (json.dumps({"model": "tiny", "prompt": "hi", "temperature": "hot"}).encode(), 400, "temperature"),
    ],
    ids=["invalid-json", "not-object", "unknown-model", "negative-max-tokens", "no-prompt", "kv-params", "oversize",
         "bad-type"],
)  # fmt: skip
def test_bad_requests_get_a_4xx_with_the_reason_and_the_deployment_keeps_serving(cluster, body, status, says):
    r = httpx.post(f"{cluster.proxy_url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"] or says == r.json()["error"].get("param")
    proxy, plain = clients(cluster)
    prompt = text_prompt(30, seed=len(body))
    assert completion(proxy, prompt, stream=False) == completion(plain, prompt, stream=False)


def _gauge(url: str, name: str) -> float:
    return metrics(url).get(name, 0.0)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_leaving_cancels_the_upstream_request(cluster, stream):
    generated = "vllm:generation_tokens_total"
    before = sum(_gauge(d.url, generated) for d in cluster.decoders)
    body = {"model": "tiny", "prompt": "hello " * 100, "max_tokens": 3000, "ignore_eos": True, "stream": stream}
    with httpx.Client(timeout=httpx.Timeout(30, read=3)) as c:
        if stream:
            with c.stream("POST", f"{cluster.proxy_url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                for i, _ in enumerate(r.iter_lines()):
                    if i == 5:
                        break
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post(f"{cluster.proxy_url}/v1/completions", json=body)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sum(_gauge(d.url, "vllm:num_requests_running") for d in cluster.decoders) == 0:
            break
        time.sleep(0.2)
    assert sum(_gauge(d.url, "vllm:num_requests_running") for d in cluster.decoders) == 0
    made = sum(_gauge(d.url, generated) for d in cluster.decoders) - before
    assert 0 < made < 1500, made  # stopped well before the 3000 tokens it asked for


def test_200_concurrent_requests_none_lost_none_hung(cluster):
    prompts = [text_prompt(20 + (i * 37) % 500, seed=2000 + i) for i in range(200)]
    kw = dict(api_key="none", max_retries=0, timeout=300)

    async def run(base_url: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=base_url, **kw) as client:

            async def one(p: str) -> str:
                r = await client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
                assert r.choices[0].finish_reason in ("length", "stop")
                return r.choices[0].text

            return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), timeout=600)

    got = asyncio.run(run(f"{cluster.proxy_url}/v1"))
    want = asyncio.run(run(f"{cluster.plain.url}/v1"))
    assert len(got) == 200
    assert got == want


def test_streams_whose_decoder_is_killed_go_on_on_the_other_and_answer_as_plain_vllm(cluster):
    """Two long streams at once, one on each decoder; one decoder is killed once both have
    streamed: the other goes on after the tokens its stream had, and the client reads one
    unbroken answer, plain vLLM's, with its usage."""
    proxy, plain = clients(cluster)
    victim = cluster.decoders[0]
    starts = victim.starts
    prompts = [text_prompt(120, seed=5000 + i) for i in range(2)]
    kw = dict(model="tiny", max_tokens=LONG, temperature=0, extra_body={"ignore_eos": True})
    wants = [
        (r.choices[0].text, r.usage.model_dump()) for r in (plain.completions.create(prompt=p, **kw) for p in prompts)
    ]
    before = metrics(cluster.proxy_url)
    streaming = [threading.Event() for _ in prompts]

    def stream(i: int) -> tuple[str, dict]:
        text, usage = [], None
        for ev in proxy.completions.create(
            prompt=prompts[i], **kw, stream=True, stream_options={"include_usage": True}
        ):
            if ev.choices:
                text.append(ev.choices[0].text)
                if len(text) == 4:
                    streaming[i].set()
            if ev.usage:
                usage = ev.usage.model_dump()
        streaming[i].set()
        return "".join(text), usage

    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(stream, i) for i in range(2)]
        assert all(e.wait(120) for e in streaming)
        assert in_flight(cluster, victim.url) == 1  # its stream is under way
        os.kill(victim.pid, signal.SIGKILL)  # the API server only, as `kill -9 <pid>` would
        got = [a.result(timeout=300) for a in answers]
    assert got == wants
    assert metrics(cluster.proxy_url)[RESUMED] - before.get(RESUMED, 0) == 1
    cluster.wait_restarted(victim, starts)  # back for the tests after this one


def test_a_decoder_killed_under_load_costs_no_request_and_rejoins(cluster):
    """A long answer is under way on one decoder while short requests keep both busy; that
    decoder is killed: the long answer and the short ones in flight on it are moved to the other
    decoder, and every client gets plain vLLM's answer."""
    proxy, plain = clients(cluster)
    prompts = [text_prompt(100 + 20 * i, seed=3000 + i) for i in range(40)]
    wants = [completion(plain, p, stream=False) for p in prompts]
    held = text_prompt(90, seed=3998)  # decodes LONG tokens: in flight whenever the kill comes
    kw = dict(model="tiny", prompt=held, max_tokens=LONG, temperature=0, extra_body={"ignore_eos": True})
    held_want = plain.completions.create(**kw).choices[0].text
    before_proxy = metrics(cluster.proxy_url)

    def on_a_decoder(least: int, deadline: float) -> Instance | None:
        while time.monotonic() < deadline:
            busy = [d for d in cluster.decoders if in_flight(cluster, d.url) >= least]
            if busy:
                return busy[0]
            time.sleep(0.05)
        return None

    t0 = time.monotonic()
    with ThreadPoolExecutor(5) as pool:
        held_got = pool.submit(lambda: proxy.completions.create(**kw).choices[0].text)
        victim = on_a_decoder(1, time.monotonic() + 120)  # the held request, past its prefill
        assert victim is not None
        starts = victim.starts
        got = pool.map(lambda p: completion(proxy, p, stream=False), prompts)
        on_a_decoder(2, time.monotonic() + 10)  # a short request beside it, most likely on the victim
        assert not held_got.done()
        os.kill(victim.pid, signal.SIGKILL)  # the API server only, as `kill -9 <pid>` would
        deadline = time.monotonic() + 120
        while victim.url in cluster.deployment.in_rotation() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim.url not in cluster.deployment.in_rotation()  # taken out when it failed
        got = list(got)
        assert held_got.result(timeout=300) == held_want
    assert got == wants  # none lost, none failed: requests on the dead decoder moved to the other
    assert time.monotonic() - t0 < 300
    moved = metrics(cluster.proxy_url)[RETRIES] - before_proxy.get(RETRIES, 0)
    assert moved >= 1  # the held request at least was retried on the other decoder

    # While it is down, new requests go to the other decoder.
    extra = text_prompt(80, seed=3999)
    assert completion(proxy, extra, stream=False) == completion(plain, extra, stream=False)

    # The supervisor restarts it, the proxy takes it back, and it serves again.
    cluster.wait_restarted(victim, starts)
    assert f"{victim.name} exited with code -9; restarting in" in cluster.deployment.output()
    before = metrics(victim.url)
    for i in range(4):  # equally idle decoders take turns
        p = text_prompt(60, seed=4000 + i)
        assert completion(proxy, p, stream=False) == completion(plain, p, stream=False)
    deadline = time.monotonic() + 15  # counters are exported a step after the request
    while metrics(victim.url).get(LOADED, 0) == before.get(LOADED, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics(victim.url).get(LOADED, 0) > before.get(LOADED, 0)  # it served hand-offs again


def in_flight(cluster, url: str) -> int:
    """Requests the proxy has in flight on the backend at `url` (its /health)."""
    health = httpx.get(f"{cluster.proxy_url}/health", timeout=5).json()
    return sum(b["outstanding"] for b in health["decode"] + health["prefill"] if b["url"] == url)


RETRIES = "pdrun:proxy_decode_retries_total"
RESUMED = "pdrun:proxy_decode_resumed_total"
LONG = 256  # output tokens: a stream still under way when its decoder is killed


@pytest.mark.stops_deployment
def test_ctrl_c_stops_every_process_within_30s(cluster):
    d = cluster.deployment
    pids = d.processes()
    assert len(pids) >= 7  # proxy + 3 x (API server, engine core, worker) at least
    d.proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    while (d.processes() or d.proc.poll() is None) and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    left = d.processes()
    assert not left, f"still running {time.monotonic() - t0:.0f}s after Ctrl-C: {sorted(left)}"
    assert d.proc.wait(timeout=5) == 0
    assert "stopped" in d.output().splitlines()[-1]

"""1P1D over the ucx transport on CPU (UCX over TCP on loopback): each decoder's output equals plain
vLLM's token for token, and it loaded every handed-off token over UCX. The prefiller copies its
chunks out layer by layer (`layerwise`), as vLLM computes each layer; of the two decoders, one
loads whole chunks before its request runs (the default), the other (`layerwise`) loads inside the
request's first step, each layer before vLLM computes it, and recomputes the request when the
hand-off breaks off half way."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdrun import transfer
from pdrun.launch.vllm_server import ServerSpec, VllmServer
from tests.integration.client import (
    LOAD_FAILURES,
    LOADED,
    complete,
    computed_with,
    continue_after,
    metrics,
    prefill,
    prompt,
    token_ids,
    wait_for_deltas,
)
from tests.integration.conftest import DECODER_IO_TIMEOUT_S, free_port, free_ports

pytestmark = [pytest.mark.integration, pytest.mark.after_deployment]
UCX_ENV = {"UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}  # nothing listens beyond loopback
DECODERS = ("whole", "layers")
BLOCK = 128  # vLLM's KV block size on CPU


@pytest.fixture(scope="module")
def ucx_servers(cluster, model_dir, tmp_path_factory):
    cluster.deployment.stop()  # memory for three more instances; its own last test stopped it already
    logs = tmp_path_factory.mktemp("ucx-logs")
    connector = {"transport": "ucx", "io_timeout_s": DECODER_IO_TIMEOUT_S}
    roles = {
        "prefiller": ("kv_producer", {**connector, "layerwise": True}),
        "whole": ("kv_consumer", connector),
        "layers": ("kv_consumer", {**connector, "layerwise": True}),
    }
    servers = {
        name: VllmServer(
            ServerSpec(
                model=str(model_dir),
                port=free_port(),
                role=role,
                kv_port=free_ports(8),
                dtype="float32",
                connector=extra,
                env=UCX_ENV,
            ),
            logs / f"{name}.log",
        )
        for name, (role, extra) in roles.items()
    }
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_healthy(timeout=600)
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def loaded(decoder: str, n: int) -> int:
    """Tokens a decoder loads of an n-token prompt it continues: all of them, or, layer by layer, its
    whole blocks (it computes the block the step writes into)."""
    return n - n % BLOCK if decoder == "layers" else n


def reference(cluster, decoder: str, tokens: list[int], first) -> list[int]:
    """Plain vLLM's answer; for a layer-wise decoder, which computes the prompt's partial last block
    with the first token, one vLLM's that computes them so."""
    if decoder == "layers":
        return computed_with(cluster.plain.url, tokens, first)
    return token_ids(complete(cluster.plain.url, tokens))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("n", [1, 257, 3000])
def test_pd_over_ucx_equals_plain_vllm(cluster, ucx_servers, decoder, n):
    producer, consumer = ucx_servers["prefiller"], ucx_servers[decoder]
    tokens = prompt(n, seed=500)
    first = prefill(producer.url, tokens)
    assert first.params["pdrun"]["endpoints"][0].startswith("ucx://127.0.0.1:")
    before = metrics(consumer.url)
    assert continue_after(consumer.url, tokens, first) == reference(cluster, decoder, tokens, first)
    expected = {LOADED: loaded(decoder, n), LOAD_FAILURES: 0}
    assert wait_for_deltas(consumer.url, before, expected) == expected


@pytest.mark.parametrize("decoder", DECODERS)
def test_eight_concurrent_hand_offs_over_ucx(cluster, ucx_servers, decoder):
    producer, consumer = ucx_servers["prefiller"], ucx_servers[decoder]
    cases = [prompt(n, seed=510 + n) for n in (255, 256, 600, 1000, 1500, 2000, 2500, 3001)]
    firsts = [prefill(producer.url, t) for t in cases]
    wants = [reference(cluster, decoder, t, first) for t, first in zip(cases, firsts, strict=True)]
    before = metrics(consumer.url)

    def pd(i):
        return continue_after(consumer.url, cases[i], firsts[i])

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(pd, range(len(cases)), timeout=300)) == wants
    expected = {LOADED: sum(loaded(decoder, len(t)) for t in cases), LOAD_FAILURES: 0}
    assert wait_for_deltas(consumer.url, before, expected) == expected


def test_the_hand_off_went_layer_by_layer_where_asked(cluster, ucx_servers):
    prefill(ucx_servers["prefiller"].url, prompt(300, seed=520))
    log = ucx_servers["prefiller"].log_path.read_text()
    # The tiny model's 4 layers, all copied from vLLM's save_kv_layer, none left to wait_for_save.
    assert "chunks copied out layer by layer (4 of 4 layers as vLLM computed them" in log
    # ... and, on the layer-wise decoder, all 4 waited for in vLLM's wait_for_layer_load.
    assert "hand-offs loaded layer by layer (4 of 4 layers waited for" in ucx_servers["layers"].log_path.read_text()
    assert "layer by layer" not in ucx_servers["whole"].log_path.read_text()


class CutAfter(transfer.Service):
    """A prefiller endpoint that relays the real one's frames and fails after the first `frames`."""

    def __init__(self, real: str, frames: int):
        self.real, self.frames = real, frames

    def handle(self, request, payload):
        if request.op == "release":
            return {}
        with transfer.connect(self.real) as conn:
            for i, frame in enumerate(conn.stream(request.op, meta=request.meta)):
                if i == self.frames:
                    raise ConnectionError("cut off half way")
                yield transfer.Frame(frame.header, bytes(frame.payload))
        return {}


def test_a_layer_wise_hand_off_cut_off_half_way_is_recomputed(cluster, ucx_servers):
    consumer = ucx_servers["layers"]
    tokens = prompt(1500, seed=530)  # 6 chunks: the first layer of each arrives, then the error
    first = prefill(ucx_servers["prefiller"].url, tokens)
    want = computed_with(cluster.plain.url, tokens, first)  # the decoder computes the prompt and the token
    before = metrics(consumer.url)
    with transfer.listen("ucx://127.0.0.1:0", CutAfter(first.params["pdrun"]["endpoints"][0], frames=7)) as fake:
        first.params["pdrun"]["endpoints"] = [fake.address]
        t0 = time.monotonic()
        assert continue_after(consumer.url, tokens, first) == want
        assert time.monotonic() - t0 < DECODER_IO_TIMEOUT_S + 20
    expected = {LOAD_FAILURES: 1, LOADED: 0}
    assert wait_for_deltas(consumer.url, before, expected) == expected
    lines = [ln for ln in consumer.log_path.read_text().splitlines() if f"hand-off from {fake.address}" in ln]
    assert lines and "cut off half way" in lines[-1] and "prefilling the remaining 1408 tokens locally" in lines[-1]
    # And it goes on loading hand-offs layer by layer.
    ok = prompt(700, seed=531)
    again = prefill(ucx_servers["prefiller"].url, ok)
    before = metrics(consumer.url)
    assert continue_after(consumer.url, ok, again) == computed_with(cluster.plain.url, ok, again)
    assert wait_for_deltas(consumer.url, before, {LOADED: 640}) == {LOADED: 640}

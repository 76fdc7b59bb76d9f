"""1P1D over the ucx transport on CPU (UCX over TCP on loopback): the decoder's output equals plain
vLLM's token for token, and it loaded every handed-off token over UCX. The prefiller copies its
chunks out layer by layer (`layerwise`), as vLLM computes each layer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from launch.vllm_server import ServerSpec, VllmServer
from tests.integration.client import (
    LOAD_FAILURES,
    LOADED,
    complete,
    metrics,
    prefill,
    prompt,
    token_ids,
    wait_for_deltas,
)
from tests.integration.conftest import DECODER_IO_TIMEOUT_S, free_port, free_port_range

pytestmark = [pytest.mark.integration, pytest.mark.after_deployment]
UCX_ENV = {"UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}  # nothing listens beyond loopback


@pytest.fixture(scope="module")
def ucx_pair(cluster, model_dir, tmp_path_factory):
    cluster.deployment.stop()  # memory for two more instances; its own last test stopped it already
    logs = tmp_path_factory.mktemp("ucx-logs")
    connector = {"transport": "ucx", "io_timeout_s": DECODER_IO_TIMEOUT_S, "layerwise": True}
    servers = [
        VllmServer(
            ServerSpec(
                model=str(model_dir),
                port=free_port(),
                role=role,
                kv_port=free_port_range(8),
                dtype="float32",
                connector=connector,
                env=UCX_ENV,
            ),
            logs / f"{role}.log",
        )
        for role in ("kv_producer", "kv_consumer")
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_healthy(timeout=600)
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.mark.parametrize("n", [1, 257, 3000])
def test_pd_over_ucx_equals_plain_vllm(cluster, ucx_pair, n):
    producer, consumer = ucx_pair
    tokens = prompt(n, seed=500)
    params = prefill(producer.url, tokens)
    assert params["pdrun"]["endpoints"][0].startswith("ucx://127.0.0.1:")
    before = metrics(consumer.url)
    got = token_ids(complete(consumer.url, tokens, kv_transfer_params=params))
    assert got == token_ids(complete(cluster.plain.url, tokens))
    expected = {LOADED: n - 1, LOAD_FAILURES: 0}
    assert wait_for_deltas(consumer.url, before, expected) == expected


def test_eight_concurrent_hand_offs_over_ucx(cluster, ucx_pair):
    producer, consumer = ucx_pair
    cases = [prompt(n, seed=510 + n) for n in (255, 256, 600, 1000, 1500, 2000, 2500, 3001)]
    wants = [token_ids(complete(cluster.plain.url, t)) for t in cases]
    before = metrics(consumer.url)

    def pd(tokens):
        params = prefill(producer.url, tokens)
        return token_ids(complete(consumer.url, tokens, kv_transfer_params=params))

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(pd, cases, timeout=300)) == wants
    expected = {LOADED: sum(len(t) - 1 for t in cases), LOAD_FAILURES: 0}
    assert wait_for_deltas(consumer.url, before, expected) == expected


def test_the_prefiller_copied_its_chunks_out_layer_by_layer(cluster, ucx_pair):
    producer, consumer = ucx_pair
    prefill(producer.url, prompt(300, seed=520))
    log = producer.log_path.read_text()
    # The tiny model's 4 layers, all copied from vLLM's save_kv_layer, none left to wait_for_save.
    assert "chunks copied out layer by layer (4 of 4 layers as vLLM computed them" in log
    assert "layer by layer" not in consumer.log_path.read_text()  # decoders load whole chunks

"""The cache tier on CUDA: a prompt evicted from the GPU cache comes back from the tier's arena,
copied in inside the step that computes it (`cache_load_in_step: idle`, the instance idle) or
beside the engine's steps, or from copies made ahead on a hint (`cache_prefetch_gb`), or, as by
default, copied ahead on the hint and read inside the step, and the answer is plain vLLM's, token
for token. CUDA graphs on: the loading step runs piecewise, each layer waiting for its copy (the 8B
shape in bf16 with PDRUN_GPU_MODEL)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdrun.launch.vllm_server import ServerSpec, VllmServer
from pdrun.pd.proxy.hints import Hints
from pdrun.storage.server import CacheServer
from pdrun.storage.tiers import MemoryTier, TieredStore
from tests.integration.client import LOAD_FAILURES, complete, metrics, prompt, token_ids, wait_for_deltas
from tests.integration.conftest import free_port

pytestmark = pytest.mark.gpu

CACHE_LOADED = "pdrun:cache_loaded_tokens_total"
IN_STEP = "pdrun:cache_in_step_tokens_total"
PREFETCHED = "pdrun:cache_prefetched_tokens_total"
TOKENS, OTHERS = 6000, 4  # GPU caches of 1024 blocks (16k tokens): four others evict a prompt
LOADED = TOKENS // 256 * 256  # its full chunks


class Servers(dict):
    """Servers started when a test first asks for them (one test alone starts only its own)."""

    def __init__(self, start):
        super().__init__()
        self._start = start

    def __missing__(self, name: str) -> VllmServer:
        self[name] = self._start(name)
        return self[name]


@pytest.fixture(scope="module")
def tier_servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    model = Path(os.environ.get("PDRUN_GPU_MODEL") or model_dir)
    log_dir = Path(os.environ.get("PDRUN_TEST_LOGS") or tmp_path_factory.mktemp("logs"))
    args = ["--gpu-memory-utilization", "0.25", "--max-num-seqs", "8", "--num-gpu-blocks-override", "1024"]
    if not any(model.glob("*.safetensors")):
        args += ["--load-format", "dummy"]
    hint_ports = {"copied in ahead": free_port(), "by default": free_port()}
    with CacheServer(f"tcp://127.0.0.1:{free_port()}", TieredStore(MemoryTier(16 << 30))) as cache:
        tier = {"cache": cache.address}
        connectors = {
            "plain": ("plain", {}),
            "in the step": ("kv_both", {**tier, "cache_load_in_step": "idle"}),
            "beside the steps": ("kv_both", {**tier, "cache_load_in_step": "never"}),
            "copied in ahead": (
                "kv_both",
                {**tier, "cache_prefetch_gb": 1, "prefetch_port": hint_ports["copied in ahead"]}
                | {"cache_load_in_step": "never"},
            ),
            "by default": ("kv_both", {**tier, "prefetch_port": hint_ports["by default"]}),  # as pdrun launch sets it
        }

        def start(name: str) -> VllmServer:
            role, connector = connectors[name]
            spec = ServerSpec(
                model=str(model),
                port=free_port(),
                role=role,  # type: ignore[arg-type]
                kv_port=free_port(),
                device="cuda",
                dtype="bfloat16",
                max_model_len=8192,
                connector=connector,
                extra_args=args,
                env={"CUDA_VISIBLE_DEVICES": "0"},
            )
            server = VllmServer(spec, log_dir / f"tier-{name.replace(' ', '-')}.log")
            servers[name] = server  # stopped at the end, healthy or not
            server.start().wait_healthy(timeout=600)
            return server

        servers = Servers(start)
        servers.hint_ports = hint_ports
        try:
            yield servers
        finally:
            for s in list(servers.values()):
                s.stop()


@pytest.mark.parametrize(
    "where",
    ["in the step", "beside the steps", "copied in ahead", "by default"],
    ids=["in_step", "beside", "prefetched", "default"],
)
def test_an_evicted_prompt_loaded_from_the_tier_answers_as_plain_vllm(tier_servers, where):
    url, plain = tier_servers[where].url, tier_servers["plain"].url
    seed = {"in the step": 10, "beside the steps": 20, "copied in ahead": 30, "by default": 40}[where]
    tokens = prompt(TOKENS, seed)
    want = token_ids(complete(plain, tokens, max_tokens=32))
    assert token_ids(complete(url, tokens, max_tokens=32)) == want  # cold: computed, stored behind
    for i in range(OTHERS):
        complete(url, prompt(TOKENS, seed + 1 + i), max_tokens=1)
    before = metrics(url)
    hinted = where in tier_servers.hint_ports
    if hinted:  # as the proxy hints it, just before sending the request
        hints = Hints({url: f"tcp://127.0.0.1:{tier_servers.hint_ports[where]}"})
        deadline = time.monotonic() + 10
        while not hints.send(url, json.dumps({"prompt": tokens}).encode()) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the socket is connected
        hints.close()
    assert token_ids(complete(url, tokens, max_tokens=32)) == want
    in_step = where in ("in the step", "by default")
    expected = {CACHE_LOADED: LOADED, IN_STEP: LOADED if in_step else 0, LOAD_FAILURES: 0}
    if hinted:  # the hint reached the worker before vLLM's front end was done
        expected[PREFETCHED] = LOADED
    assert wait_for_deltas(url, before, expected) == expected
    if in_step:  # every layer waited for its copy in vLLM's hook, CUDA graphs on
        log = tier_servers[where].log_path.read_text()
        assert re.search(r"cache tier inside the step layer by layer \((\d+) of \1 layers waited for", log)

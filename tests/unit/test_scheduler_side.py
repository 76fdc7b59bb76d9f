"""The connector's scheduler side as vLLM's scheduler drives it (a real vLLM config, real requests
and blocks, no engine): what a decoder loads for a hand-off, and what it releases when the request
ends before its load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from pdrun.launch import tiny_model
from pdrun.launch.systems import free_port
from pdrun.pd.keys import chunk_keys
from pdrun.pd.params import HandOff, handoff_params

CHUNK, BLOCK = 64, 16
PREFILLER = "tcp://127.0.0.1:1"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build(Path(tmp_path_factory.mktemp("model")) / "tiny")


def engine_config(model: Path | str, **extra):
    """A decoder's vLLM config with PDConnector and `extra` connector settings."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    ktc = KVTransferConfig(
        kv_connector="PDConnector",
        kv_role="kv_consumer",
        kv_connector_module_path="pdrun.pd.connector",
        kv_connector_extra_config={"chunk_size": CHUNK, "transport": "tcp", **extra},
        kv_load_failure_policy="recompute",
    )
    return EngineArgs(
        model=str(model), dtype="float32", max_model_len=1024, block_size=BLOCK, kv_transfer_config=ktc
    ).create_engine_config()


def scheduler_side(model: Path, **extra):
    """The scheduler side of a decoder's PDConnector, with `extra` connector settings."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from pdrun.pd.connector import PDConnector

    config = engine_config(model, **extra)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=16, dtype=torch.float32)
    layers = KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)
    return PDConnector(
        config, KVConnectorRole.SCHEDULER, KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[layers])
    )


@pytest.fixture(scope="module")
def decoder(model: Path):
    return scheduler_side(model)


def request(decoder, rid: str, prompt: list[int], prefilled: list[int] | None = None, **handoff_fields):
    """A decoder request carrying the hand-off of `prefilled` (default: the prompt but its last token)."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    prefilled = prompt[:-1] if prefilled is None else prefilled
    keys = chunk_keys(decoder._sched.fingerprint, prefilled)
    fields = {
        "endpoints": [PREFILLER],
        "transfer": f"t-{rid}",
        "num_tokens": len(prefilled),
        "keys": [k.hex() for k in keys],
        "fingerprint": decoder._sched.fingerprint_hex,
        "chunk_size": CHUNK,
        **handoff_fields,
    }
    params = handoff_params(HandOff(**fields))
    sampling = SamplingParams(max_tokens=4, temperature=0.0, extra_args={"kv_transfer_params": params})
    return Request(rid, prompt, sampling, None)


def blocks(n: int, first: int = 0):
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    return KVCacheBlocks(([KVCacheBlock(first + i) for i in range(n)],))


def step_meta(decoder):
    from vllm.v1.core.sched.output import SchedulerOutput

    return decoder.build_connector_meta(SchedulerOutput.make_empty())


def test_a_hand_off_is_loaded_into_the_blocks_allocated_for_it(decoder):
    prompt = list(range(1, 201))  # 199 tokens handed off: 3 full chunks and a partial one
    r = request(decoder, "load", prompt)
    count, load_async = decoder.get_num_new_matched_tokens(r, 0)
    assert (count, load_async) == (199, True)
    decoder.update_state_after_alloc(r, blocks(13, first=20), count)
    job = step_meta(decoder).loads["load"]
    assert (job.start, job.end, job.endpoints, job.transfer) == (0, 199, [PREFILLER], "t-load")
    assert job.block_ids == list(range(20, 33)) and len(job.chunks) == 4
    # Loaded: the worker releases it after pulling, the scheduler does not again.
    assert decoder.request_finished(r, job.block_ids)[0] is False
    assert step_meta(decoder).releases == []


def test_a_request_that_ends_before_its_load_releases_its_hand_off(decoder):
    r = request(decoder, "aborted", list(range(1, 301)))
    decoder.get_num_new_matched_tokens(r, 0)  # looked at, never allocated: aborted while it waited
    decoder.request_finished(r, [])
    meta = step_meta(decoder)
    assert [(x.endpoints, x.transfer) for x in meta.releases] == [([PREFILLER], "t-aborted")]
    assert meta.loads == {}


def test_a_request_aborted_before_the_scheduler_saw_it_releases_its_hand_off(decoder):
    r = request(decoder, "never-seen", list(range(1, 101)))
    decoder.request_finished(r, [])
    assert [x.transfer for x in step_meta(decoder).releases] == ["t-never-seen"]


def test_a_prompt_that_differs_loads_only_the_chunks_that_agree(decoder):
    prompt = list(range(1, 301))
    prefilled = [*prompt[:130], 9999, *prompt[131:299]]  # differs in the third chunk
    r = request(decoder, "differs", prompt, prefilled)
    count, _ = decoder.get_num_new_matched_tokens(r, 0)
    assert count == 2 * CHUNK
    decoder.update_state_after_alloc(r, blocks(19), count)
    job = step_meta(decoder).loads["differs"]
    assert (job.start, job.end, len(job.chunks)) == (0, 2 * CHUNK, 2)


def test_a_hand_off_for_another_model_is_not_loaded_but_released(decoder):
    r = request(decoder, "other-model", list(range(1, 101)), fingerprint="f" * 32)
    assert decoder.get_num_new_matched_tokens(r, 0) == (0, False)
    decoder.update_state_after_alloc(r, blocks(0), 0)
    meta = step_meta(decoder)
    assert meta.loads == {} and [x.transfer for x in meta.releases] == ["t-other-model"]


def test_a_request_preempted_after_its_load_computes_when_rescheduled(decoder):
    r = request(decoder, "preempted", list(range(1, 201)))
    count, _ = decoder.get_num_new_matched_tokens(r, 0)
    decoder.update_state_after_alloc(r, blocks(13), count)
    assert "preempted" in step_meta(decoder).loads
    # Preempted, its blocks freed; the hand-off was released once pulled: vLLM computes what its
    # prefix cache no longer holds.
    assert decoder.get_num_new_matched_tokens(r, 0) == (0, False)
    decoder.update_state_after_alloc(r, blocks(13, first=30), 0)
    meta = step_meta(decoder)
    assert meta.loads == {} and meta.releases == []


def test_a_restarted_cache_server_is_looked_up_at_once_not_after_a_lookup_that_waits_for_the_old(model, caplog):
    """The scheduler looks chunks up over the server's unix socket; a restarted server listens on
    another, and a lookup sent to the old one waits out cache_timeout_s on the engine's thread.
    The watch finds the new server first: the next lookup goes there, and finds what it holds."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from pdrun.pd.connector import TIER_WATCH_S
    from pdrun.storage.client import CacheClient
    from pdrun.storage.server import CacheServer
    from pdrun.storage.tiers import MemoryTier, TieredStore

    port = free_port()
    first = CacheServer(f"tcp://127.0.0.1:{port}", TieredStore(MemoryTier(1 << 22)))
    connector = scheduler_side(model, cache=f"tcp://127.0.0.1:{port}")
    try:
        sched = connector._sched
        assert sched.local is not None, "the tier is not reached through this host's memory"
        old_token = sched.local.info.token
        first.close()
        with CacheServer(f"tcp://127.0.0.1:{port}", TieredStore(MemoryTier(1 << 22))) as second:
            prompt = list(range(1, 3 * CHUNK + 10))
            keys = chunk_keys(sched.fingerprint, prompt, full_only=True)
            client = CacheClient(second.address)
            assert all(client.put(k, bytes(64), {"n": 1}) for k in keys[:2])
            deadline = time.monotonic() + 10 * TIER_WATCH_S
            while not sched._local_replaced and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sched._local_replaced, "the watch never saw the new server"
            r = Request("after-restart", prompt, SamplingParams(max_tokens=4, temperature=0.0), None)
            assert connector.get_num_new_matched_tokens(r, 0) == (2 * CHUNK, True)
            assert sched.local.info.token != old_token
            assert "cache tier lookup failed" not in caplog.text
            client.close()
    finally:
        connector.shutdown()


@pytest.fixture
def tier_server():
    """A cache server on this host, its tier reached through shared memory."""
    from pdrun.storage.server import CacheServer
    from pdrun.storage.tiers import MemoryTier, TieredStore

    with CacheServer(f"tcp://127.0.0.1:{free_port()}", TieredStore(MemoryTier(1 << 22))) as server:
        yield server


def stored_prompt(connector, server, n_chunks: int, seed: int) -> list[int]:
    """A prompt whose first `n_chunks` full chunks the tier holds in memory."""
    return store(connector, server, list(range(seed, seed + n_chunks * CHUNK + 10)), n_chunks)


def store(connector, server, prompt: list[int], n_chunks: int) -> list[int]:
    """`prompt`, its first `n_chunks` full chunks put in the tier's memory."""
    from pdrun.storage.client import CacheClient

    client = CacheClient(server.address)
    try:
        for key in chunk_keys(connector._sched.fingerprint, prompt, full_only=True)[:n_chunks]:
            assert client.put(key, bytes(64), {"n": 1})
    finally:
        client.close()
    return prompt


def plain_request(rid: str, prompt: list[int]):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, prompt, SamplingParams(max_tokens=4, temperature=0.0), None)


def step_computing(connector, tokens: int):
    """A scheduler output that computed `tokens` (of requests the connector does not follow)."""
    from vllm.v1.core.sched.output import SchedulerOutput

    out = SchedulerOutput.make_empty()
    out.total_num_scheduled_tokens = tokens
    return connector.build_connector_meta(out)


def step_running(connector, *rids: str):
    """A scheduler output that ran `rids` (as the step before the next lookup)."""
    from vllm.v1.core.sched.output import SchedulerOutput

    out = SchedulerOutput.make_empty()
    out.num_scheduled_tokens = dict.fromkeys(rids, 1)
    return connector.build_connector_meta(out)


@pytest.mark.parametrize("when", ["idle", "always"])
def test_an_idle_instance_loads_a_prefix_in_its_arena_inside_the_step_from_chunks_pinned_until_copied(
    model, tier_server, when
):
    """Loaded inside the step, the chunks must stay where they are from the lookup to the copy:
    the scheduler pins them and hands the worker their slots, for the chunks the job loads."""
    connector = scheduler_side(model, cache=tier_server.address, cache_load_in_step=when)
    try:
        prompt = stored_prompt(connector, tier_server, 3, seed=1)
        r = plain_request("pinned", prompt)
        # The GPU cache holds the first chunk: the job loads the other two.
        assert connector.get_num_new_matched_tokens(r, CHUNK) == (2 * CHUNK, False)
        assert tier_server.local.leases() == 1
        connector.update_state_after_alloc(r, blocks(12), 2 * CHUNK)
        job = step_meta(connector).loads["pinned"]
        assert job.layerwise and job.pin is not None and (job.start, job.end) == (CHUNK, 3 * CHUNK)
        offsets = [offset for offset, _, _ in job.pin.slots]
        keys = chunk_keys(connector._sched.fingerprint, prompt, full_only=True)
        lease, slots = connector._sched.local.read(keys[1:3])
        assert offsets == [s.offset for s in slots]  # the job's two chunks, not the first
        connector._sched.local.release(lease)
        assert tier_server.local.leases() == 1  # until the worker has copied them
    finally:
        connector.shutdown()


def test_a_busy_instance_loads_beside_the_steps_unless_asked_always(model, tier_server):
    idle = scheduler_side(model, cache=tier_server.address, cache_load_in_step="idle")
    never = scheduler_side(model, cache=tier_server.address)  # the default
    try:
        prompt = stored_prompt(idle, tier_server, 2, seed=1000)
        step_running(idle, "another")
        assert idle.get_num_new_matched_tokens(plain_request("busy", prompt), 0) == (2 * CHUNK, True)
        assert never.get_num_new_matched_tokens(plain_request("never", prompt), 0) == (2 * CHUNK, True)
        assert tier_server.local.leases() == 0
        # Once the other request is done, the instance is idle again.
        idle.request_finished(plain_request("another", [1]), [])
        assert idle.get_num_new_matched_tokens(plain_request("idle", prompt), 0) == (2 * CHUNK, False)
    finally:
        idle.shutdown()
        never.shutdown()


def test_a_pin_is_let_go_when_its_request_is_not_scheduled_or_ends_unscheduled(model, tier_server):
    connector = scheduler_side(model, cache=tier_server.address, cache_load_in_step="always")
    try:
        prompt = stored_prompt(connector, tier_server, 2, seed=2000)
        r = plain_request("no-room", prompt)
        assert connector.get_num_new_matched_tokens(r, 0) == (2 * CHUNK, False)
        assert tier_server.local.leases() == 1
        step_meta(connector)  # not allocated in this pass (no room): nothing stays pinned
        assert tier_server.local.leases() == 0
        assert connector.get_num_new_matched_tokens(r, 0) == (2 * CHUNK, False)  # pinned again
        assert tier_server.local.leases() == 1
        connector.request_finished(r, [])  # aborted while it waited
        assert tier_server.local.leases() == 0
        # Scheduled with nothing to load (vLLM found it all elsewhere): let go at once.
        r = plain_request("nothing", prompt)
        connector.get_num_new_matched_tokens(r, 0)
        connector.update_state_after_alloc(r, blocks(3), 0)
        assert tier_server.local.leases() == 0 and step_meta(connector).loads == {}
    finally:
        connector.shutdown()


WORKER_PROCESS = """
import sys, torch
from vllm.config import set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from pdrun.pd.connector import PDConnector
from tests.unit.test_scheduler_side import engine_config
model, port, extra = sys.argv[1], sys.argv[2], eval(sys.argv[3])
config = engine_config(model, **extra)
spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.float32)
groups = [KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)]
with set_current_vllm_config(config):
    init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, "gloo")
    initialize_model_parallel(1, 1)
    PDConnector(config, KVConnectorRole.WORKER, KVCacheConfig(64, [], groups))
print(sys.getswitchinterval())
"""


@pytest.mark.parametrize("extra, interval", [({}, 200e-6), ({"switch_interval_us": 1000}, 1e-3)])
def test_the_worker_process_hands_the_gil_to_transfer_threads_within_the_switch_interval(model, extra, interval):
    """The worker's transfer and copy threads share the GIL with vLLM's engine thread: the worker side
    shortens how long a thread busy in Python keeps it from them (Python's default: 5 ms)."""
    import subprocess
    import sys

    args = [sys.executable, "-c", WORKER_PROCESS, str(model), str(free_port()), repr(extra)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) == pytest.approx(interval, abs=2e-6)  # Python keeps whole microseconds


def test_a_prompt_stored_over_several_steps_is_ordered_whole_for_the_tier(model, tier_server):
    """Each step's chunks go to the tier with the prompt's chunks before them, in order: the tier
    keeps the prompt's head newest in its LRU across the steps that computed it."""
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    connector = scheduler_side(model, cache=tier_server.address)
    try:
        prompt = list(range(7, 7 + 3 * CHUNK + 10))
        keys = chunk_keys(connector._sched.fingerprint, prompt)
        r = plain_request("long", prompt)
        assert connector.get_num_new_matched_tokens(r, 0) == (0, False)  # the tier holds none of it
        connector.update_state_after_alloc(r, blocks(13), 0)
        first = SchedulerOutput.make_empty()  # a step computes its first two chunks
        first.scheduled_new_reqs = [NewRequestData.from_request(r, (list(range(13)),))]
        first.num_scheduled_tokens, first.total_num_scheduled_tokens = {"long": 2 * CHUNK}, 2 * CHUNK
        meta = connector.build_connector_meta(first)
        assert [s.index for s in meta.saves] == [0, 1] and meta.tier_order == keys[:2]
        second = SchedulerOutput.make_empty()  # the next computes the rest
        second.scheduled_cached_reqs = CachedRequestData(["long"], set(), [[]], {}, [None], [2 * CHUNK], [0])
        second.num_scheduled_tokens, second.total_num_scheduled_tokens = {"long": CHUNK + 10}, CHUNK + 10
        meta = connector.build_connector_meta(second)
        assert [s.index for s in meta.saves] == [2] and meta.tier_order == keys[:3]
    finally:
        connector.shutdown()


def test_a_request_loads_from_the_tier_again_once_preempted_but_not_after_a_failed_load(model, tier_server):
    """vLLM schedules a request again after a load whose blocks it found invalid (the request then
    computes them), and after preempting it (its blocks given up): only the latter loads again."""
    connector = scheduler_side(model, cache=tier_server.address)
    try:
        prompt = stored_prompt(connector, tier_server, 2, seed=3000)
        r = plain_request("again", prompt)
        assert connector.get_num_new_matched_tokens(r, 0) == (2 * CHUNK, True)
        connector.update_state_after_alloc(r, blocks(9), 2 * CHUNK)
        assert step_meta(connector).loads["again"].end == 2 * CHUNK
        # Back in the queue after the load (vLLM found some of its blocks invalid): it computes them.
        assert connector.get_num_new_matched_tokens(r, CHUNK) == (0, False)
        connector.update_state_after_alloc(r, blocks(9), 0)
        assert step_meta(connector).loads == {}
        r.num_preemptions += 1  # preempted: its blocks were given up, the tier still holds the prefix
        assert connector.get_num_new_matched_tokens(r, 0) == (2 * CHUNK, True)
        connector.update_state_after_alloc(r, blocks(9, first=20), 2 * CHUNK)
        assert step_meta(connector).loads["again"].block_ids[:8] == list(range(20, 28))
    finally:
        connector.shutdown()


@pytest.mark.parametrize("answers", [True, False], ids=["cache_answers", "prompts only"])
def test_the_chunks_an_answer_fills_go_to_the_tier_once_their_tokens_are_known(model, tier_server, answers):
    """A conversation's next turn sends the answer back inside its prompt: the chunk the answer
    completes (the prompt's partial last one) and the answer's own full chunks are stored as they
    fill, under the keys the next turn's prompt will have, once their ids are known (a step may
    compute a token's KV before the scheduler has the token)."""
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    connector = scheduler_side(model, cache=tier_server.address, cache_answers=answers)
    try:
        prompt = list(range(9, 9 + 3 * CHUNK + 10))  # 3 full chunks and 10 tokens of the fourth
        r = plain_request("chat", prompt)
        assert connector.get_num_new_matched_tokens(r, 0) == (0, False)
        connector.update_state_after_alloc(r, blocks(13), 0)
        prefill = SchedulerOutput.make_empty()
        prefill.scheduled_new_reqs = [NewRequestData.from_request(r, (list(range(13)),))]
        prefill.num_scheduled_tokens, prefill.total_num_scheduled_tokens = {"chat": len(prompt)}, len(prompt)
        assert [s.index for s in connector.build_connector_meta(prefill).saves] == [0, 1, 2]

        def step(computed: int, scheduled: int, new_blocks: list[int] | None = None):
            out = SchedulerOutput.make_empty()
            out.scheduled_cached_reqs = CachedRequestData(
                ["chat"], set(), [[]], {}, [(new_blocks,) if new_blocks else None], [computed], [0]
            )
            out.num_scheduled_tokens, out.total_num_scheduled_tokens = {"chat": scheduled}, scheduled
            return connector.build_connector_meta(out)

        answer = list(range(5000, 5000 + CHUNK))
        r.append_output_token_ids(answer[:50])
        # This step computes the KV up to the fourth chunk's end, but 4 of its ids are not known yet.
        assert step(len(prompt), CHUNK - 10, [13, 14, 15]).saves == []
        r.append_output_token_ids(answer[50:])
        meta = step(4 * CHUNK, 1, [16])
        keys = chunk_keys(connector._sched.fingerprint, prompt + answer)  # the next turn's prompt's keys
        if not answers:
            assert meta.saves == []
            return
        (save,) = meta.saves
        assert (save.index, save.key, save.block_ids, save.cache, save.stage) == (
            3,
            keys[3],
            [12, 13, 14, 15],
            True,
            False,
        )
        assert meta.tier_order == keys[:4]
        r.append_output_token_ids(list(range(6000, 6000 + CHUNK)))
        assert step(4 * CHUNK + 1, CHUNK - 2).saves == []  # the fifth chunk is one token short of computed
        meta = step(5 * CHUNK - 1, 1, [17, 18, 19])
        keys = chunk_keys(connector._sched.fingerprint, r.all_token_ids)
        (save,) = meta.saves
        assert (save.index, save.key, save.block_ids) == (4, keys[4], [16, 17, 18, 19])
        assert meta.tier_order == keys[:5]  # the answer's first chunk among them
    finally:
        connector.shutdown()


def test_an_instance_keeps_its_rates_beside_the_tiers_disk_and_starts_from_them(model, tmp_path):
    from pdrun.storage.server import CacheServer
    from pdrun.storage.tiers import DiskTier, MemoryTier, TieredStore

    store = TieredStore(MemoryTier(1 << 22), DiskTier(tmp_path / "disk", 1 << 26))
    with CacheServer(f"tcp://127.0.0.1:{free_port()}", store) as server:
        first = scheduler_side(model, cache=server.address)
        rates = first._sched.rates
        assert rates.path is not None and rates.path.parent == tmp_path / "disk"
        rates.step(4096)
        time.sleep(0.02)
        rates.step(0)
        rates.disk_read({"cache_disk_loaded_tokens": 1 << 20, "cache_disk_load_seconds": 0.01})
        first.shutdown()  # kept at shutdown
        again = scheduler_side(model, cache=server.address)
        try:
            assert (again._sched.rates.prefill, again._sched.rates.disk) == (rates.prefill, rates.disk)
            assert again._sched.rates.disk_chunks(4) == 4
        finally:
            again.shutdown()


def test_the_head_of_a_prompt_vllms_cache_holds_is_not_copied_in_on_its_hint(model, tier_server):
    """The scheduler, beside the worker in the engine's process, tells the hint's pool how much of a
    prompt vLLM's cache holds (found at a lookup, or computed by a request that finished): the bus
    is left to the request's own copies, and only that prompt's head is spared, not every prompt
    that begins as it does."""

    from pdrun.pd.codec import PagedKV
    from pdrun.pd.keys import rank_key
    from pdrun.pd.prefetch import Prefetch
    from pdrun.pd.stats import StatsCounter
    from pdrun.pd.tier import SharedTier, TierLink
    from pdrun.storage.client import CacheClient
    from pdrun.storage.local import LocalClient

    port = free_port()
    connector = scheduler_side(model, cache=tier_server.address, cache_prefetch_gb=1, prefetch_port=port)
    paged = PagedKV({"model.layers.0.attn": torch.zeros(64, 2, BLOCK, 2)}, 64, BLOCK)
    local = LocalClient.discover(CacheClient(tier_server.address).local())
    assert local is not None
    shared = SharedTier(local, paged, lambda *_: None)
    stats = StatsCounter()
    seed = connector._sched.fingerprint.seed()
    prefetch = Prefetch(paged, TierLink(shared, lambda: None, 5.0), seed, CHUNK, 0, 1 << 20, port, stats)
    try:
        held_here = stored_prompt(connector, tier_server, 3, seed=3000)
        elsewhere = stored_prompt(connector, tier_server, 3, seed=4000)
        # vLLM's cache holds the first prompt's three chunks: nothing to load, nor to copy in.
        assert connector.get_num_new_matched_tokens(plain_request("warm", held_here), 3 * CHUNK) == (0, False)
        assert prefetch.hint(None, held_here) == 0
        assert prefetch.hint(None, elsewhere) == 3  # the tier's, as any hinted prompt
        # Another prompt with the same first chunk (a shared system prompt), the rest its own.
        sibling = store(connector, tier_server, held_here[:CHUNK] + list(range(5000, 5000 + 2 * CHUNK + 10)), 3)
        assert prefetch.hint(None, sibling) == 3
        # vLLM's cache holds the first of a prompt's three chunks: the hint copies the other two.
        partly = stored_prompt(connector, tier_server, 3, seed=6000)
        connector.get_num_new_matched_tokens(plain_request("partly", partly), CHUNK)
        assert prefetch.hint(None, partly) == 2
        tail = chunk_keys(connector._sched.fingerprint, partly)[1:3]
        assert list(prefetch._copies)[-2:] == [rank_key(k, 0) for k in tail]
        # A request that computed its prompt and finished: vLLM's cache keeps its blocks.
        computed = list(range(7000, 7000 + 3 * CHUNK + 10))
        r = plain_request("computed", computed)
        assert connector.get_num_new_matched_tokens(r, 0) == (0, False)
        store(connector, tier_server, computed, 3)  # as its own saves put it
        r.num_computed_tokens = len(computed)
        connector.request_finished(r, [])
        assert prefetch.hint(None, computed) == 0
        # Once vLLM has computed as many tokens as its cache holds besides that head, they may have
        # evicted it: a hint copies the prompt in again.
        step_computing(connector, connector._sched.cache_tokens - 3 * CHUNK - 1)
        assert prefetch.hint(None, computed) == 0
        step_computing(connector, 1)
        assert prefetch.hint(None, computed) == 3
        taken = stats.take()
        assert taken is not None and taken.data["cache_prefetch_copied_tokens"] == 11 * CHUNK
    finally:
        prefetch.close()
        shared.close()
        connector.shutdown()

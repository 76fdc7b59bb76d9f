"""`pdrun bench`'s planning, figures and report, without starting anything."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from typer.testing import CliRunner

from pdrun.launch import bench as b
from pdrun.launch import workloads as wl
from pdrun.launch.cli import app
from pdrun.launch.systems import (
    Settings,
    SystemFailure,
    disk_share,
    free_port,
    gpus_needed,
    make,
    persists,
    summed,
)


def test_systems_are_packed_side_by_side_on_the_gpus_plain_first():
    p = b.plan(["pdrun-tier", "pdrun-1p1d", "plain", "offload", "plain-dp"], ["reuse"], [0, 1], 3, "cuda", b.Sizes())
    assert p.waves == [
        [("plain", [0]), ("pdrun-tier", [1])],
        [("pdrun-1p1d", [0, 1])],
        [("offload", [0])],
        [("plain-dp", [0, 1])],
    ]
    assert p.estimate_s > 0 and "about" in b.describe(p, b.Sizes())


def test_with_share_gpus_the_instances_of_one_system_may_share_a_gpu():
    names = ["plain", "pdrun-0p2d-tier", "plain-dp"]
    alone = b.plan(names, ["reuse"], [0], 1, "cuda", b.Sizes(), per_gpu=5)
    assert alone.skipped == {"pdrun-0p2d-tier": "needs 2 GPUs, 1 given", "plain-dp": "needs 2 GPUs, 1 given"}
    shared = b.plan(names, ["reuse"], [0], 1, "cuda", b.Sizes(), per_gpu=5, share_gpus=True)
    assert shared.waves == [[("plain", [0]), ("pdrun-0p2d-tier", [0, 0]), ("plain-dp", [0, 0])]]
    assert "pdrun-0p2d-tier (GPU 0,0)" in b.describe(shared, b.Sizes())
    # Spread over the GPUs with the most room first; never more instances on one than --per-gpu.
    assert b.plan(["pdrun-1p2d"], ["reuse"], [0, 1], 1, "cuda", b.Sizes(), 2, True).waves == [
        [("pdrun-1p2d", [0, 0, 1])]
    ]
    too_many = b.plan(["pdrun-2p2d"], ["reuse"], [0], 1, "cuda", b.Sizes(), per_gpu=3, share_gpus=True)
    assert too_many.skipped == {"pdrun-2p2d": "needs 4 GPUs, 1 given (3 instances each)"}


def test_what_cannot_run_is_named_not_dropped():
    p = b.plan(["plain", "pdrun-2p2d", "lmcache"], ["noreuse"], [0, 1], 1, "cuda", b.Sizes())
    assert p.skipped["pdrun-2p2d"] == "needs 4 GPUs, 2 given"
    assert [n for w in p.waves for n, _ in w] == ["plain"] + (["lmcache"] if "lmcache" not in p.skipped else [])
    assert "not run: pdrun-2p2d: needs 4 GPUs, 2 given" in b.describe(p, b.Sizes())


@pytest.mark.parametrize(
    ("names", "workloads", "rounds", "says"),
    [
        (["plain", "nope"], ["reuse"], 1, "unknown system 'nope'"),
        (["plain"], ["reuse", "chat"], 1, "unknown workload(s) chat"),
        (["plain"], ["reuse"], 0, "--rounds must be at least 1"),
        (["plain", "plain"], ["reuse"], 1, "named twice"),
        (["plain@load_threads=1"], ["reuse"], 1, "only pdrun's systems take connector settings"),
        (["pdrun-1p1d@load_threads"], ["reuse"], 1, "as KEY=VALUE, not 'load_threads'"),
        (["pdrun-1p1d@chunks_per_frame=99"], ["reuse"], 1, "chunks_per_frame: Input should be less than"),
        (["pdrun-1p1d@no_such_setting=1"], ["reuse"], 1, "no_such_setting"),
    ],
)
def test_a_bad_plan_is_refused_with_the_reason(names, workloads, rounds, says):
    with pytest.raises((b.BenchError, SystemFailure), match=None) as e:
        b.plan(names, workloads, [0, 1], rounds, "cuda", b.Sizes())
    assert says in str(e.value)


def test_gpus_per_system_and_which_keep_their_cache_across_a_restart():
    assert [gpus_needed(n) for n in ("plain", "pdrun-tier", "pdrun-1p1d", "pdrun-2p3d-tier")] == [1, 1, 2, 5]
    assert gpus_needed("plain-dp", largest_pd=3) == 3
    assert [persists(n) for n in ("plain", "offload", "pdrun-1p1d", "pdrun-tier", "pdrun-1p1d-tier")] == [
        False, False, False, True, True,
    ]  # fmt: skip


def test_more_rounds_and_bigger_prompts_take_longer():
    short = b.plan(["plain"], ["reuse", "noreuse"], [0], 1, "cuda", b.Sizes()).estimate_s
    assert b.plan(["plain"], ["reuse", "noreuse"], [0], 3, "cuda", b.Sizes()).estimate_s > short
    small = b.Sizes().fit(4096)
    assert b.plan(["plain"], ["reuse", "noreuse"], [0], 1, "cuda", small).estimate_s < short


def test_sizes_fit_the_models_context():
    s = b.Sizes().fit(4096)
    assert s.reuse.tokens == 4096 - s.reuse.output
    assert max(s.noreuse.lengths) + s.noreuse.output <= 4096 and 1024 in s.noreuse.lengths
    assert s.slo.prompt[1] + s.slo.output[1] <= 4096 and s.slo.prompt[0] <= s.slo.prompt[1]
    assert s.multiturn.max_history == 4096
    assert s.decode.length + s.decode.output <= 4096
    assert b.Sizes().fit(1 << 20) == b.Sizes()


def test_figures_summarized_as_medians_with_their_spread_and_a_ratio_to_plain():
    results = {
        "plain": {"reuse": {"ttft_cold_s": [0.5, 0.4, 0.6]}},
        "pdrun-tier": {"reuse": {"ttft_cold_s": [0.25, 0.2, 0.3], "ttft_restart_s": [0.1]}},
    }
    s = b.summarize(results)
    assert s["plain"]["reuse"]["ttft_cold_s"] == {"median": 0.5, "min": 0.4, "max": 0.6, "n": 3, "x_plain": 1.0}
    assert s["pdrun-tier"]["reuse"]["ttft_cold_s"]["x_plain"] == pytest.approx(0.5)
    assert "x_plain" not in s["pdrun-tier"]["reuse"]["ttft_restart_s"]  # plain has none to compare with
    meta = {"machine": "2 x H200", "command": "pdrun bench", "date": "today", "versions": "vLLM x", "rounds": 3}
    md = b.markdown(s, {"offload": "did not start: boom"}, {"lmcache": "not installed"}, meta)
    assert "| ttft_cold_s | 0.5 [0.4 - 0.6] (1.00x) | 0.25 [0.2 - 0.3] (0.50x) |" in md
    assert "| ttft_restart_s | - | 0.1 |" in md
    assert "**offload**: did not start: boom" in md and "**lmcache**: not installed" in md


def test_pdruns_counters_become_what_a_workload_moved_and_its_hand_off_rate():
    before = {"kv_load_failures": 1.0, "handoff_bytes": 4e9, "handoff_seconds": 0.02}
    after = {"kv_load_failures": 1.0, "staging_evictions": 2.0, "handoff_bytes": 10e9, "handoff_seconds": 0.05}
    got = b.moved(before, after)
    assert got == {"kv_load_failures": 0.0, "staging_evictions": 2.0, "handoff_gb_per_s": pytest.approx(200.0)}
    # No hand-off in the workload (a tier alone): no rate, rather than a rate of nothing.
    assert "handoff_gb_per_s" not in b.moved(after, after) and b.moved({}, {}) == {}


def test_counters_are_summed_over_labels_or_picked_by_one():
    page = """# TYPE vllm:prompt_tokens_by_source counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 300.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 20.0
vllm:prompt_tokens_by_source_total{engine="1",model_name="m",source="local_compute"} 100.0
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 4.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 1.5
"""
    names = [
        "vllm:prompt_tokens_by_source_total",
        'vllm:prompt_tokens_by_source_total{source="local_compute"}',
        'vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}',
        "vllm:request_queue_time_seconds_sum",
    ]
    assert summed(page, names) == dict(zip(names, [420.0, 400.0, 0.0, 1.5], strict=True))


def test_each_request_is_kept_in_the_order_sent_with_its_times(tmp_path):
    late = wl.Outcome(10, [1, 2, 3], ttft=0.2, latency=0.6, sent=101.5, label="conversation 0 turn 2")
    first = wl.Outcome(8, [], ttft=None, latency=0.1, error="WorkloadError: boom", sent=100.0)
    path = tmp_path / "requests" / "plain" / "multiturn-round1.jsonl"
    b.write_requests(path, [late, first])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"sent_s": 0.0, "prompt_tokens": 8, "output_tokens": 0, "ttft_s": None, "tpot_ms": None, "latency_s": 0.1,
         "error": "WorkloadError: boom"},
        {"label": "conversation 0 turn 2", "sent_s": 1.5, "prompt_tokens": 10, "output_tokens": 3, "ttft_s": 0.2,
         "tpot_ms": pytest.approx(200.0), "latency_s": 0.6},
    ]  # fmt: skip
    b.write_requests(tmp_path / "none.jsonl", [])
    assert not (tmp_path / "none.jsonl").exists()


def test_request_figures_as_vllm_bench_serve_defines_them():
    o = wl.Outcome(prompt_tokens=10, output_ids=[1, 2, 3, 4, 5], ttft=0.2, latency=0.6)
    assert o.tpot == pytest.approx(0.1)  # (latency - ttft) / (outputs - 1)
    assert wl.Outcome(10, [1], 0.2, 0.2).tpot is None
    took_over = wl.Outcome(10, [1, 2, 3], ttft=0.2, latency=0.5, second=0.45)  # a decoder after a prefiller
    assert took_over.second_token_wait == pytest.approx(0.25) and o.second_token_wait is None
    assert wl.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5 and wl.quantile([], 0.9) is None
    assert wl.quantile([1.0, 2.0], 0.99) == pytest.approx(1.99)


def test_the_cli_prints_the_plan_and_names_bad_input():
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "--dry-run", "--systems", "plain,pdrun-tier", "--gpus", "2"])
    assert r.exit_code == 0, r.output
    assert "wave 1: plain, pdrun-tier" in r.output and "about" in r.output
    # what each workload sends, as sized by the options
    r = runner.invoke(app, ["bench", "--dry-run", "--workloads", "multiturn,noreuse", "--multiturn-user", "1000,2000",
                            "--multiturn-system", "4000", "--think", "2,4", "--max-model-len", "16384"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "12 - 18 turns of 1000 - 2000 new tokens over a 4000-token system prompt" in r.output
    assert "reading 2.0 - 4.0 s between turns; histories up to 16384" in r.output
    assert "noreuse: new 1024, 4096, 16256-token prompts, 8, 16 at once" in r.output  # room left for the answer
    r = runner.invoke(app, ["bench", "--dry-run", "--systems", "plain,warp"])
    assert r.exit_code == 2 and "unknown system 'warp'" in r.output
    r = runner.invoke(app, ["bench", "--dry-run", "--lengths", "1k"])
    assert r.exit_code == 2 and "--lengths takes comma-separated numbers" in r.output
    r = runner.invoke(app, ["bench", "--dry-run", "--slo-prompt", "4096,1024"])
    assert r.exit_code == 2 and "--slo-prompt takes MIN,MAX with 0 < MIN <= MAX, not '4096,1024'" in r.output
    r = runner.invoke(app, ["bench", "--dry-run", "--slo-tpot-ms", "0"])
    assert r.exit_code == 2 and "--slo-tpot-ms" in r.output
    r = runner.invoke(app, ["bench", "--dry-run", "--workloads", "decode", "--decode-concurrency", "8,x"])
    assert r.exit_code == 2 and "--decode-concurrency takes comma-separated numbers" in r.output
    r = runner.invoke(app, ["bench", "--dry-run", "--workloads", "multiturn", "--think", "3,1"])
    assert r.exit_code == 2 and "--think takes MIN,MAX seconds with 0 <= MIN <= MAX, not '3,1'" in r.output
    r = runner.invoke(app, ["bench", "--dry-run", "--workloads", "multiturn", "--multiturn-user", "160,120"])
    assert r.exit_code == 2 and "--multiturn-user takes MIN,MAX with 0 < MIN <= MAX, not '160,120'" in r.output
    json.dumps(b.Sizes().fit(4096).reuse.__dict__)  # the sizes go into the JSON as they are


def test_users_who_read_their_answers_take_longer():
    back_to_back = b.plan(["plain"], ["multiturn"], [0], 1, "cuda", b.Sizes()).estimate_s
    reading = b.Sizes(multiturn=wl.MultiturnSizes(think=(2.0, 4.0)))
    # 24 conversations of 12 - 18 turns dealt out to 10 users: the slowest has two of 15 turns on
    # average and a longest, 48 turns; 3 s a turn adds 144 s.
    assert b.plan(["plain"], ["multiturn"], [0], 1, "cuda", reading).estimate_s - back_to_back == pytest.approx(144)
    # As many conversations as users: all run at once, the longest (18 turns) bounds the run.
    one_each = b.Sizes(multiturn=wl.MultiturnSizes(conversations=10, think=(2.0, 4.0)))
    no_reading = b.Sizes(multiturn=wl.MultiturnSizes(conversations=10))
    assert b.plan(["plain"], ["multiturn"], [0], 1, "cuda", one_each).estimate_s - b.plan(
        ["plain"], ["multiturn"], [0], 1, "cuda", no_reading
    ).estimate_s == pytest.approx(54)


def test_systems_may_share_gpus_two_gpus_of_a_system_apart():
    names = ["plain", "offload", "pdrun-tier", "pdrun-1p1d", "pdrun-1p1d-tier"]
    p = b.plan(names, ["reuse"], [0, 1], 1, "cuda", b.Sizes(), per_gpu=2)
    assert p.waves == [
        [("plain", [0]), ("offload", [1]), ("pdrun-tier", [0])],
        [("pdrun-1p1d", [0, 1]), ("pdrun-1p1d-tier", [0, 1])],
    ]
    for wave in p.waves:
        used = [g for _, gpus in wave for g in gpus]
        assert all(used.count(g) <= 2 for g in used)


def test_the_machine_is_named_by_its_gpus():
    lines = ["NVIDIA H200, 143771 MiB, 580.159.04", "NVIDIA H200, 143771 MiB, 580.159.04"]
    assert b.gpu_summary(lines) == "2 x NVIDIA H200 (143771 MiB, driver 580.159.04)"
    assert b.gpu_summary([]) == ""


def test_no_workload_or_round_draws_another_ones_prompts():
    seeds = [b.seed(r, w) for r in range(3) for w in wl.WORKLOADS]
    assert len(set(seeds)) == len(seeds)
    first = {w: wl.prompt(random.Random(b.seed(0, w)), 8) for w in wl.WORKLOADS}
    assert len({tuple(p) for p in first.values()}) == len(wl.WORKLOADS)


def test_a_pdrun_system_with_connector_settings_is_its_kind_started_with_them(tmp_path):
    """The same deployment with a setting changed runs beside the default one, as its own system."""
    names = ["pdrun-1p1d", "pdrun-1p1d@chunks_per_frame=1@load_threads=1"]
    p = b.plan(names, ["slo"], [0, 1], 2, "cuda", b.Sizes(), per_gpu=2)
    assert p.waves == [[(names[0], [0, 1]), (names[1], [0, 1])]]
    config = make(names[1], [0, 1], Settings(model="m"), tmp_path)._config()
    assert (config["prefill"], config["decode"]) == (1, 1)
    assert config["connector"] == {"chunks_per_frame": 1, "load_threads": 1}
    assert make(names[0], [0, 1], Settings(model="m"), tmp_path)._config()["connector"] == {}


def test_systems_configured_together_get_ports_of_their_own(tmp_path):
    """A wave's systems are all configured before any binds its ports: two pdrun deployments in
    one wave must not be handed the same range (their instances failed 'address already in use')."""
    settings = Settings(model="m", device="cpu")
    first, second = (make(name, [0], settings, tmp_path) for name in ("pdrun-1p1d", "pdrun-tier"))
    ports = []
    for system in (first, second):
        config = system._config()
        n = 2 if system is first else 1
        ports.append({config["port"], *range(config["instance_port"], config["cache_port"] + 2)})
        assert config["kv_port"] == config["instance_port"] + n
    assert not ports[0] & ports[1]
    assert free_port() not in ports[0] | ports[1]


def test_each_restart_adds_a_start_up_to_the_estimate_and_is_said():
    one, three = (b.Sizes(reuse=wl.ReuseSizes(restarts=n)) for n in (1, 3))
    plan = b.plan(["plain", "pdrun-tier"], ["reuse"], [0], 1, "cuda", one, per_gpu=2)
    more = b.plan(["plain", "pdrun-tier"], ["reuse"], [0], 1, "cuda", three, per_gpu=2)
    assert more.estimate_s - plan.estimate_s == pytest.approx(2 * 2 * b.START_S["cuda"])
    assert "after each of 3 full restarts" in b.sends("reuse", three)
    assert "restart" not in b.sends("reuse", b.Sizes(reuse=wl.ReuseSizes(restarts=0)))


def test_tier_systems_share_the_disk_the_bench_writes_to(tmp_path):
    """Each tier's disk gets launch's default, or its share of what the disk has free: a disk
    filled by several tiers turns theirs off, and their restarts then reload nothing."""
    free_gib = shutil.disk_usage(tmp_path).free / (1 << 30)
    assert disk_share(tmp_path, 0) is None
    many = max(1, int(free_gib))  # tiers enough that each gets about 0.8 GiB
    share = disk_share(tmp_path, many)
    assert share is not None and share <= 0.8 * free_gib / many
    config = make("pdrun-tier", [0], Settings(model="m", cache_disk_gb=share), tmp_path)._config()
    assert config["cache_disk_gb"] == share and config["cache_dir"]
    assert "cache_disk_gb" not in make("pdrun-tier", [0], Settings(model="m"), tmp_path)._config()


def test_a_tier_given_no_disk_keeps_its_chunks_in_memory_only(tmp_path):
    config = make("pdrun-tier", [0], Settings(model="m", cache_disk_gb=0), tmp_path)._config()
    assert "cache_dir" not in config and "cache_disk_gb" not in config and config["cache_cpu_gb"] == 40.0


def test_the_plan_says_which_systems_get_a_decoder_killed_and_why_the_others_not(tmp_path):
    names = ["plain", "pdrun-tier", "pdrun-1p1d", "pdrun-1p2d", "pdrun-0p3d-tier", "plain-dp"]
    p = b.plan(names, ["reuse", "noreuse", "slo"], [0, 1, 2, 3], 1, "cuda", b.Sizes(), kill_decoder_s=20)
    assert p.kills == {"pdrun-1p2d": "decode-1", "pdrun-0p3d-tier": "decode-2"}  # the last decoder
    assert p.spared == {
        "plain": "not a pdrun deployment",
        "pdrun-tier": "one decoder, none to take its requests over",
        "pdrun-1p1d": "one decoder, none to take its requests over",
        "plain-dp": "not a pdrun deployment",
    }
    said = b.describe(p, b.Sizes())
    assert "kill: pdrun-1p2d's decode-1, 20 s into noreuse and slo of every round (its supervisor restarts it)" in said
    assert "no kill: pdrun-1p1d: one decoder, none to take its requests over" in said
    # Only the systems that get kills have their supervisor restart dead instances.
    assert make("pdrun-1p2d", [0, 1, 2], Settings(model="m"), tmp_path, restart_instances=True)._config()["restart"]
    assert make("pdrun-1p2d", [0, 1, 2], Settings(model="m"), tmp_path)._config()["restart"] is False
    quiet = b.plan(names, ["noreuse"], [0, 1, 2, 3], 1, "cuda", b.Sizes())
    assert quiet.kills == quiet.spared == {} and "kill" not in b.describe(quiet, b.Sizes())


def test_a_kill_needs_noreuse_or_slo_and_seconds_of_zero_or_more():
    with pytest.raises(b.BenchError, match="--kill-decoder kills during noreuse and slo: add one to --workloads"):
        b.plan(["pdrun-1p2d"], ["reuse", "decode"], [0, 1, 2], 1, "cuda", b.Sizes(), kill_decoder_s=20)
    with pytest.raises(b.BenchError, match="--kill-decoder takes seconds >= 0, not -1"):
        b.plan(["pdrun-1p2d"], ["slo"], [0, 1, 2], 1, "cuda", b.Sizes(), kill_decoder_s=-1)
    r = CliRunner().invoke(app, ["bench", "--dry-run", "--systems", "plain,pdrun-0p2d", "--workloads", "slo",
                                 "--kill-decoder", "12.5"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "kill: pdrun-0p2d's decode-1, 12.5 s into slo of every round" in r.output
    assert "no kill: plain: not a pdrun deployment" in r.output

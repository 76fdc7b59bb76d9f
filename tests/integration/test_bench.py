"""`pdrun bench` as a user runs it, on the tiny model: plain vLLM against pdrun's cache tier,
reuse and noreuse, two rounds; the figures checked for sanity (what each workload claims to
measure happened), not for speed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.after_deployment
def test_bench_reuse_noreuse_and_decode_plain_against_the_cache_tier(cluster, model_dir, tmp_path):
    cluster.deployment.stop()  # done with: room for the bench's systems
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "pdrun.launch", "bench", "--model", str(model_dir), "--systems", "plain,pdrun-tier",
            "--workloads", "reuse,noreuse,decode", "--rounds", "2", "--reuse-tokens", "1024",
            "--lengths", "256,1024", "--concurrency", "2,4", "--decode-length", "300", "--decode-concurrency", "2",
            "--gpu-blocks", "40", "--max-model-len", "4096", "--cache-cpu-gb", "0.5",
            "--out", str(out)]  # fmt: skip
    err_path = tmp_path / "bench.stderr"
    with err_path.open("w") as err:
        bench = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        # What is measured is kept as it comes: after the first round's first two measurements,
        # with minutes of the run to go, results.json holds them and says the run is not done.
        lines: list[str] = []
        while not (lines and lines[-1].startswith("  round 1 reuse pdrun-tier")):
            line = bench.stdout.readline()
            assert line, "".join(lines)[-3000:] + err_path.read_text()[-3000:]
            lines.append(line)
        so_far = json.loads((out / "results.json").read_text())
        assert so_far["meta"]["done"] is False and "**Partial**" in (out / "results.md").read_text()
        assert [so_far["summary"][s]["reuse"]["ttft_cold_s"]["n"] for s in ("plain", "pdrun-tier")] == [1, 1]
        rest, _ = bench.communicate(timeout=1500)
    finally:
        if bench.poll() is None:  # Ctrl-C: the bench stops the systems it started
            bench.send_signal(signal.SIGINT)
            bench.wait(120)
    stdout = "".join(lines) + rest
    assert bench.returncode == 0, stdout[-3000:] + err_path.read_text()[-3000:]
    assert "wave 1: plain, pdrun-tier" in stdout and "about" in stdout.splitlines()[1]
    # A KV cache of 40 blocks of 128 tokens: six other 1024-token prompts evict the reused one.
    assert "reuse sends 6 other prompts to evict" in stdout

    doc = json.loads((out / "results.json").read_text())
    assert doc["failed"] == {} and doc["plan"]["rounds"] == 2 and doc["meta"]["done"] is True
    assert doc["meta"]["command"].startswith("pdrun bench") or "bench" in doc["meta"]["command"]
    assert doc["host"]["vllm"] and doc["meta"]["versions"].startswith("vLLM")
    s = doc["summary"]
    for system in ("plain", "pdrun-tier"):
        reuse, noreuse = s[system]["reuse"], s[system]["noreuse"]
        for name in ("ttft_cold_s", "ttft_warm_s", "ttft_hot_s", "ttft_evicted_s"):
            assert reuse[name]["n"] == 2 and 0 < reuse[name]["min"] <= reuse[name]["median"] <= reuse[name]["max"] < 30
        for tag in ("256_c2", "256_c4", "1024_c2", "1024_c4"):
            assert noreuse[f"output_tok_s_{tag}"]["median"] > 0 and noreuse[f"tpot_p50_ms_{tag}"]["median"] > 0
        decode = s[system]["decode"]
        assert decode["output_tok_s_c2"]["n"] == 2 and decode["output_tok_s_c2"]["median"] > 0
        assert 0 < decode["tpot_p50_ms_c2"]["median"] <= decode["tpot_p99_ms_c2"]["median"]
        # the instances' own inter-token latency over the same batch, from their metrics; the
        # wait from the first token to the second (one step of one vLLM)
        assert decode["itl_ms_c2"]["n"] == 2 and decode["itl_ms_c2"]["min"] > 0
        assert decode["second_token_p50_ms_c2"]["n"] == 2 and decode["second_token_p50_ms_c2"]["min"] >= 0
    plain = s["plain"]["reuse"]
    assert plain["ttft_cold_s"]["x_plain"] == 1.0 and "x_plain" in s["pdrun-tier"]["reuse"]["ttft_cold_s"]
    # What went wrong, from pdrun's own counters: nothing here; plain vLLM has no such counters.
    for workload in ("reuse", "noreuse"):
        figures = s["pdrun-tier"][workload]
        assert figures["kv_load_failures"]["max"] == 0 and figures["cache_chunks_dropped"]["max"] == 0
        assert figures["cache_in_step_tokens"]["max"] == 0  # loads run beside the steps by default
        assert "kv_load_failures" not in s["plain"][workload]
        # vLLM's own preemptions, from every system's engines
        assert s["plain"][workload]["preemptions"]["n"] == figures["preemptions"]["n"] == 2
    # vLLM's own split of the prompt tokens: warm and hot requests hit plain vLLM's GPU cache, the
    # evicted prompt comes back from the tier (offload-like loads count as external), never plain's.
    assert s["plain"]["reuse"]["prompt_tokens_gpu_cached"]["min"] > 0 and s["plain"]["reuse"]["queued_s_sum"]["n"] == 2
    assert s["plain"]["reuse"]["prompt_tokens_loaded"]["max"] == 0
    assert s["pdrun-tier"]["reuse"]["prompt_tokens_loaded"]["min"] > 0
    # Every request kept as it was sent, in requests/: the reuse phases in order, with their times.
    kept = (out / "requests" / "plain" / "reuse-round2.jsonl").read_text().splitlines()
    sent = [json.loads(line) for line in kept]
    assert [r["label"] for r in sent] == ["cold", "warm"] + ["hot"] * 5 + ["evictor"] * 6 + ["evicted"]
    assert sent[-1]["ttft_s"] == doc["results"]["plain"]["reuse"]["ttft_evicted_s"][1]
    assert sent[0]["sent_s"] == 0 < sent[1]["sent_s"] and all(r["prompt_tokens"] == 1024 for r in sent)
    assert len((out / "requests" / "pdrun-tier" / "noreuse-round1.jsonl").read_text().splitlines()) == 24
    # After a full restart, measured once for each, as the first request after its start: plain
    # vLLM recomputes the prompt; the tier's instance reads it from disk where the rates it kept
    # say that beats computing (`cache_disk_load: auto`), else computes it too; nothing fails.
    tier = s["pdrun-tier"]["reuse"]
    assert tier["ttft_restart_s"]["n"] == plain["ttft_restart_s"]["n"] == 1 and "x_plain" in tier["ttft_restart_s"]
    assert tier["restart_kv_load_failures"]["max"] == 0 and "restart_cache_disk_loaded_tokens" in tier

    md = (out / "results.md").read_text()
    assert "## reuse" in md and "## noreuse" in md and "## decode" in md and "| ttft_cold_s |" in md
    assert (out / "results.png").stat().st_size > 10_000


@pytest.mark.after_deployment
def test_bench_reuse_across_the_instances_of_one_deployment(cluster, model_dir, tmp_path):
    """Two decoders on one tier: a long prompt computed on one is loaded from the tier by the
    other, which `reuse` reports beside its other figures."""
    cluster.deployment.stop()  # done with: room for the bench's systems
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "pdrun.launch", "bench", "--model", str(model_dir), "--systems", "pdrun-0p2d-tier",
            "--workloads", "reuse", "--rounds", "1", "--restarts", "0", "--reuse-tokens", "1024",
            "--gpu-blocks", "40", "--max-model-len", "4096", "--cache-cpu-gb", "0.5", "--out", str(out)]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["failed"] == {}
    reuse = doc["summary"]["pdrun-0p2d-tier"]["reuse"]
    assert 0 < reuse["ttft_other_instance_s"]["median"] < 30
    # All of the prompt the tier holds but the last block (128 tokens here), which the request
    # computes: without the shared tier, 0.
    assert reuse["other_instance_loaded_tokens"]["median"] == 1024 - 128
    assert reuse["kv_load_failures"]["max"] == 0


@pytest.mark.after_deployment
def test_bench_kills_a_decoder_mid_workload_loses_no_request_and_the_decoder_rejoins(cluster, model_dir, tmp_path):
    """`--kill-decoder`: one of two decoders killed with SIGKILL a few seconds into noreuse (100
    requests of 128 tokens, two at once: a minute or more on two CPU cores); the other takes its
    requests over, the supervisor restarts it and the proxy takes it back."""
    cluster.deployment.stop()  # done with: room for the bench's systems
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "pdrun.launch", "bench", "--model", str(model_dir), "--systems", "pdrun-1p2d",
            "--workloads", "noreuse", "--rounds", "1", "--lengths", "256", "--concurrency", "2",
            "--prompts-per-user", "50", "--max-model-len", "4096", "--kill-decoder", "8",
            "--out", str(out)]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kill: pdrun-1p2d's decode-1, 8 s into noreuse of every round" in r.stdout
    assert "pdrun-1p2d: decode-1 killed 8s into noreuse; back in rotation" in r.stdout, r.stdout[-3000:]

    doc = json.loads((out / "results.json").read_text())
    assert doc["failed"] == {} and doc["plan"]["kills"] == {"pdrun-1p2d": "decode-1"}
    noreuse = doc["summary"]["pdrun-1p2d"]["noreuse"]
    assert noreuse["decoder_killed"]["median"] == 1  # during the workload, not after it
    assert noreuse["decoder_rejoined_s"]["median"] > 0
    assert noreuse["failed_requests"]["median"] == 0  # none lost: requests on the killed decoder moved
    assert {"requests_moved", "streams_resumed"} <= noreuse.keys()  # how: the proxy's counts
    assert noreuse["output_tok_s_256_c2"]["median"] > 0
    launch_log = (out / "logs" / "pdrun-1p2d-launch.log").read_text()
    assert "decode-1 exited with code -9; restarting in" in launch_log  # the supervisor's restart


def test_a_system_that_does_not_start_is_said_and_kept_out_of_the_run(tmp_path):
    """A vLLM that exits at start-up (no model where it is told to look) takes its system out of
    the run: why is said at once and kept with the results, and nothing is measured on it."""
    from pdrun.launch import bench as b
    from pdrun.launch.systems import Settings

    empty = tmp_path / "no-model"
    empty.mkdir()
    sizes = b.Sizes()
    p = b.plan(["plain"], ["reuse"], [0], 1, "cpu", sizes)
    said: list[str] = []
    kept: list[dict[str, str]] = []
    results, failed = b.run(
        p, Settings(model=str(empty), device="cpu", max_model_len=512), sizes, tmp_path / "out",
        say=said.append, start_timeout_s=300, measured=lambda _, f: kept.append(dict(f)),
    )  # fmt: skip
    assert results == {} and list(failed) == ["plain"] and failed["plain"].startswith("did not start: plain: ")
    assert said[0] == f"  plain: failed: {failed['plain']}" and kept == [failed]
    assert not (tmp_path / "out" / "requests").exists()

"""`pdrun profile transfer` and `pdrun profile peer`: real processes, real sockets, real files."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from pdrun import transfer
from pdrun.launch import profile_transfer as pt
from pdrun.launch.cli import app
from pdrun.launch.tiny_model import SHAPE

PDRUN = [sys.executable, "-m", "pdrun.launch"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pdrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PDRUN, *args], capture_output=True, text=True, timeout=timeout)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def test_loopback_sweep_over_tcp_and_ucx_writes_json_table_and_plot(tmp_path):
    out, png = tmp_path / "t.json", tmp_path / "plots" / "t.png"
    r = pdrun(
        "profile", "transfer", "--transport", "tcp,ucx", "--chunk-tokens", "4,16,1024", "--bytes-per-token", "65536",
        "--iterations", "12", "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["bytes_per_token"] == 65536
    points = {(p["transport"], p["memory"], p["chunk_tokens"]): p for p in result["points"]}
    assert set(points) == {(t, "host", n) for t in ("tcp", "ucx") for n in (4, 16, 1024)}
    for t in ("tcp", "ucx"):
        small, big = points[(t, "host", 4)], points[(t, "host", 1024)]
        assert big["chunk_bytes"] == 1024 * 65536 and big["iterations"] == 12
        # 256x the bytes (64 MiB) takes longer, whatever the per-message noise of a busy machine
        assert big["p50_ms"] > small["p50_ms"] > 0
        for p in (small, big):
            assert p["p99_ms"] >= p["p50_ms"] and p["gb_per_s"] > 0
            assert p["gb_per_s"] == pytest.approx(p["chunk_bytes"] / p["p50_ms"] / 1e6, rel=1e-2)
    assert f"plot: {png}" in r.stdout and f"json: {out}" in r.stdout
    assert png_size(png) == (1210, 462)  # 11 x 4.2 inches at 110 dpi
    for word in ("transport", "p50 ms", "p99 ms", "GB/s", "tcp", "ucx"):
        assert word in r.stdout


def test_against_a_running_peer(tmp_path):
    peer = subprocess.Popen(
        [*PDRUN, "profile", "peer", "--listen", "tcp://127.0.0.1:0", "--max-bytes", str(1 << 20)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = peer.stdout.readline()
        assert line.startswith(pt.PEER_READY), line
        address = line[len(pt.PEER_READY) :].strip()
        out = tmp_path / "peer.json"
        r = pdrun("profile", "transfer", "--peer", address, "--chunk-tokens", "1,8", "--bytes-per-token", "4096",
                  "--iterations", "5", "--json", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert [p["chunk_bytes"] for p in json.loads(out.read_text())["points"]] == [4096, 8 * 4096]
        # Bigger than the peer holds: named before anything is measured.
        r = pdrun("profile", "transfer", "--peer", address, "--chunk-tokens", "512", "--bytes-per-token", "4096")
        assert r.returncode == 2 and f"the peer at {address} holds {1 << 20} bytes" in r.stderr
    finally:
        peer.terminate()
        peer.wait(10)


def test_the_peer_refuses_bad_sizes_and_ops():
    buffer = pt._Staged("tcp", "host", 1024)
    with transfer.listen("tcp://127.0.0.1:0", pt.ProbeService(buffer, "host")) as listener:
        with transfer.connect(listener.address) as conn:
            assert conn.call("ping").meta == {"max_bytes": 1024, "memory": "host"}
        for meta in ({"nbytes": 1025}, {"nbytes": 0}, {"nbytes": "10"}, {}):
            with transfer.connect(listener.address) as conn, pytest.raises(transfer.RemoteError, match="'nbytes'"):
                list(conn.stream("get", meta=meta))
        with transfer.connect(listener.address) as conn, pytest.raises(transfer.RemoteError, match="unknown op"):
            conn.call("put")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--chunk-tokens", "16,x"], "--chunk-tokens '16,x': give positive integers"),
        (["--chunk-tokens", "0"], "give positive integers"),
        (["--transport", "rdma"], "--transport 'rdma': each must be one of tcp, ucx"),
        (["--memory", "disk"], "--memory 'disk': each must be one of host, cuda"),
        (["--peer", "http://127.0.0.1:1"], "must be tcp://HOST:PORT or ucx://HOST:PORT"),
        (["--model", "/nonexistent/config.json"], "not a readable model config"),
        (["--model", "x", "--bytes-per-token", "2"], "not both"),
    ],
)
def test_bad_input_is_named(args, says):
    r = CliRunner().invoke(app, ["profile", "transfer", *args])
    assert r.exit_code == 2
    assert says in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_cuda_memory_without_a_gpu_is_named():
    r = CliRunner().invoke(app, ["profile", "transfer", "--memory", "cuda", "--chunk-tokens", "1"])
    assert r.exit_code == 2 and "--memory cuda needs a CUDA GPU" in r.stderr


def test_bytes_per_token_from_a_model_config(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "hidden_size": 4096, "torch_dtype": "bfloat16"})
    )  # fmt: skip
    assert pt.bytes_per_token(tmp_path) == pt.LLAMA_8B_BYTES_PER_TOKEN == 131072
    tiny = {f"{k}": v for k, v in SHAPE.items()}
    (tmp_path / "tiny.json").write_text(json.dumps({**tiny, "torch_dtype": "float32"}))
    heads = SHAPE["num_attention_heads"]
    head_dim = SHAPE.get("head_dim") or SHAPE["hidden_size"] // heads
    kv_heads = SHAPE.get("num_key_value_heads", heads)
    assert pt.bytes_per_token(tmp_path / "tiny.json") == SHAPE["num_hidden_layers"] * 2 * kv_heads * head_dim * 4

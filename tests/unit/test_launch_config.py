"""`pdrun launch` settings: the YAML file, the command line on top, bad fields named, --dry-run."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdrun.launch import deploy
from pdrun.launch.cli import app
from pdrun.launch.config import ConfigError, load

runner = CliRunner()


def write(tmp_path, text: str):
    p = tmp_path / "deploy.yaml"
    p.write_text(text)
    return p


def test_file_settings_with_the_command_line_on_top(tmp_path):
    cfg = load(write(tmp_path, "prefill: 2\ndecode: 3\nchunk-size: 512\nport: 9000\n"), {"decode": 4, "port": None})
    assert (cfg.prefill, cfg.decode, cfg.chunk_size, cfg.port) == (2, 4, 512, 9000)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("prefil: 2\n", "prefil: Extra inputs are not permitted"),
        ("decode: 0\n", "decode: Input should be greater than or equal to 1"),
        ("policy: fastest\n", "policy: Input should be 'round_robin', 'least_outstanding' or 'prefix_aware'"),
        ("transport: rdma\n", "transport: Input should be 'tcp' or 'ucx'"),
        ("connector: {io_timeout_s: -1}\n", "io_timeout_s: Input should be greater than 0"),
        ("connector: {chunk: 3}\n", "chunk: Extra inputs are not permitted"),
        ("port: 8100\n", "port 8100 collides with the instances' ports"),
        ("cache_port: 8000\n", "cache ports 8000-8001 collide"),
        ("cache_cpu_gb: 0\ncache_dir: /tmp/c\n", "cache_dir needs a memory tier"),
        ("cache_cpu_gb: -1\n", "cache_cpu_gb: Input should be greater than or equal to 0"),
        ("gpus: [0, 0]\n", "GPU 0 is named twice in gpus: instances sharing a GPU need their share"),
        ("gpus: [-1]\n", "GPU ids must be >= 0"),
        ("- a list\n", "must be a mapping of settings, not list"),
        ("prefill: [\n", "is not valid YAML"),
    ],
)
def test_a_bad_setting_is_named(tmp_path, text, says):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), {})
    assert says in str(e.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope.yaml"):
        load(tmp_path / "nope.yaml", {})


def test_dry_run_prints_every_command_with_roles_ports_and_vllm_args():
    r = runner.invoke(
        app,
        ["launch", "--prefill", "1", "--decode", "2", "--device", "cpu", "--port", "9000", "--dry-run", "--", "--seed",
         "3"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    blocks = dict(b.split("\n", 1) for b in r.output.strip().split("# ")[1:])
    assert list(blocks) == ["prefill-0", "decode-0", "decode-1", "proxy", "cache"]
    roles = {}
    for name in ("prefill-0", "decode-0", "decode-1"):
        argv = shlex.split(blocks[name])
        ktc = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        roles[name] = (ktc["kv_role"], argv[argv.index("--port") + 1], ktc["kv_port"])
        assert argv[-2:] == ["--seed", "3"]
        assert "VLLM_CPU_OMP_THREADS_BIND=nobind" in argv and "OMP_WAIT_POLICY=PASSIVE" in argv
        assert ktc["kv_connector_extra_config"]["cache"] == "tcp://127.0.0.1:15090"
    assert roles == {
        "prefill-0": ("kv_producer", "8100", 15100),
        "decode-0": ("kv_consumer", "8101", 15108),
        "decode-1": ("kv_consumer", "8102", 15116),
    }
    proxy = shlex.split(blocks["proxy"])
    assert proxy[proxy.index("--port") + 1] == "9000"
    assert [proxy[i + 1] for i, a in enumerate(proxy) if a == "--decode"] == [
        "http://127.0.0.1:8101",
        "http://127.0.0.1:8102",
    ]


def test_each_role_gets_its_own_vllm_args_after_everyones():
    r = runner.invoke(
        app,
        ["launch", "--prefill", "1", "--decode", "2", "--device", "cpu", "--dry-run", "--prefill-args",
         "--max-num-batched-tokens 16384", "--decode-args", "--max-num-seqs 64 --reasoning-parser=deepseek_r1", "--",
         "--seed", "3"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    blocks = dict(b.split("\n", 1) for b in r.output.strip().split("# ")[1:])
    tails = {name: shlex.split(blocks[name])[-5:] for name in ("prefill-0", "decode-0", "decode-1")}
    assert tails["prefill-0"][-4:] == ["--seed", "3", "--max-num-batched-tokens", "16384"]
    assert tails["decode-0"] == tails["decode-1"] == [
        "--seed", "3", "--max-num-seqs", "64", "--reasoning-parser=deepseek_r1"
    ]  # fmt: skip
    assert "--chat-parsing" in shlex.split(blocks["proxy"])  # a parser on one role still shapes the answers
    from_file = load(None, {"prefill_vllm_args": ["--enable-chunked-prefill"], "decode": 1})
    [(_, prefiller), (_, decoder)] = deploy.instance_specs(from_file)
    assert prefiller.extra_args == ["--enable-chunked-prefill"] and decoder.extra_args == []
    bad = runner.invoke(app, ["launch", "--dry-run", "--decode-args", "--max-num-seqs '64"])
    assert bad.exit_code == 2 and "--decode-args" in bad.output and "No closing quotation" in bad.output


def test_one_gpu_per_instance(tmp_path):
    cfg = load(None, {"prefill": 1, "decode": 2, "device": "cuda", "gpus": [3, 5, 7]})
    specs = deploy.child_specs(cfg)
    assert [s.env.get("CUDA_VISIBLE_DEVICES") for s in specs] == ["3", "5", "7", None, None]
    too_few = load(None, {"prefill": 2, "decode": 2, "device": "cuda", "gpus": [0, 1]})
    with pytest.raises(ConfigError, match="need 4 GPUs, one each; 2 available"):
        deploy.child_specs(too_few)
    # A GPU named twice is shared by two instances, each given its share of the memory.
    shared = load(None, {"prefill": 0, "decode": 2, "device": "cuda", "gpus": [0, 0],
                         "vllm_args": ["--gpu-memory-utilization=0.4"]})  # fmt: skip
    assert [s.env.get("CUDA_VISIBLE_DEVICES") for s in deploy.child_specs(shared)][:2] == ["0", "0"]


def test_cli_errors_exit_2_and_name_the_problem(tmp_path):
    r = runner.invoke(app, ["launch", "--decode", "0", "--dry-run"])
    assert r.exit_code == 2 and "decode: Input should be greater than or equal to 1" in r.output
    r = runner.invoke(app, ["launch", "--gpus", "a,b", "--dry-run"])
    assert r.exit_code == 2 and "--gpus takes comma-separated GPU ids" in r.output
    r = runner.invoke(app, ["proxy", "--decode", "http://x:1", "--policy", "nope"])
    assert r.exit_code == 2 and "policy" in r.output


def test_the_cache_server_is_started_with_the_tiers_asked_for_and_stopped_last(tmp_path):
    cfg = load(None, {"device": "cpu", "cache_cpu_gb": 8, "cache_dir": tmp_path / "c", "cache_disk_gb": 100})
    specs = {s.name: s for s in deploy.child_specs(cfg)}
    argv = specs["cache"].command
    assert argv[argv.index("--listen") + 1] == "tcp://127.0.0.1:15090"
    assert (argv[argv.index("--cpu-gb") + 1], argv[argv.index("--disk-gb") + 1]) == ("8", "100")
    assert argv[argv.index("--dir") + 1] == str(tmp_path / "c")
    assert specs["cache"].health_url == "http://127.0.0.1:15091/metrics"
    assert specs["cache"].tier > specs["prefill-0"].tier > specs["proxy"].tier


def test_no_cache_server_when_off_or_when_the_connector_names_one():
    off = deploy.child_specs(load(None, {"device": "cpu", "cache_cpu_gb": 0}))
    assert "cache" not in {s.name for s in off}
    assert '"cache"' not in " ".join(off[0].command)
    shared = load(None, {"device": "cpu", "connector": {"cache": "tcp://10.0.0.9:15000"}})
    specs = deploy.child_specs(shared)
    assert "cache" not in {s.name for s in specs}
    ktc = json.loads(specs[0].command[specs[0].command.index("--kv-transfer-config") + 1])
    assert ktc["kv_connector_extra_config"]["cache"] == "tcp://10.0.0.9:15000"


def test_the_ucx_transport_reaches_every_instance_and_their_endpoints():
    specs = deploy.child_specs(load(None, {"device": "cpu", "transport": "ucx", "decode": 2}))
    for spec in specs[:3]:
        ktc = json.loads(spec.command[spec.command.index("--kv-transfer-config") + 1])
        assert ktc["kv_connector_extra_config"]["transport"] == "ucx"


def test_decoders_take_prefetch_hints_on_a_port_of_their_own_and_the_proxy_is_told_where():
    cfg = load(None, {"device": "cpu", "decode": 2, "connector": {"cache_prefetch_gb": 2}})
    specs = {s.name: s for s in deploy.child_specs(cfg)}
    extra = {
        name: json.loads(specs[name].command[specs[name].command.index("--kv-transfer-config") + 1])[
            "kv_connector_extra_config"
        ]
        for name in ("prefill-0", "decode-0", "decode-1")
    }
    assert "prefetch_port" not in extra["prefill-0"]  # a prefiller's requests are never decoder-only
    ports = [extra["decode-0"]["prefetch_port"], extra["decode-1"]["prefetch_port"]]
    assert len(set(ports)) == 2 and not set(ports) & {cfg.kv_port + 8 * k for k in range(3)}
    hints = [a for i, a in enumerate(specs["proxy"].command) if specs["proxy"].command[i - 1] == "--hint"]
    assert hints == [f"http://127.0.0.1:{cfg.instance_port + 1 + k}=tcp://127.0.0.1:{ports[k]}" for k in range(2)]
    none = {s.name: s for s in deploy.child_specs(load(None, {"device": "cpu"}))}
    assert "--hint" not in none["proxy"].command and "prefetch_port" not in " ".join(none["decode-0"].command)
    r = runner.invoke(app, ["proxy", "--decode", "http://x:1", "--hint", "http://x:1=ipc:///tmp/h"])
    assert r.exit_code == 2 and "--hint takes DECODER_URL=tcp://HOST:PORT" in r.output


def test_decoders_on_gpus_take_prefetch_hints_by_default_and_not_when_told_otherwise():
    def hinted(connector: dict) -> list[str]:
        cfg = load(None, {"device": "cuda", "gpus": [0, 1, 2], "decode": 2, "connector": connector})
        proxy = next(s for s in deploy.child_specs(cfg) if s.name == "proxy")
        return [a for i, a in enumerate(proxy.command) if proxy.command[i - 1] == "--hint"]

    assert len(hinted({})) == 2  # on GPUs the pool is sized by the instance itself
    assert hinted({"cache_prefetch_gb": 0}) == []
    assert hinted({"cache": "tcp://10.0.0.9:15000"}) != []  # the instance finds out whether it shares the tier's host
    on_cpu = {s.name: s for s in deploy.child_specs(load(None, {"device": "cpu"}))}
    assert "--hint" not in on_cpu["proxy"].command


def test_the_proxy_is_told_when_vllm_parses_chat_answers():
    plain = deploy.proxy_command(load(None, {}), ["http://p"], ["http://d"])
    parsed = deploy.proxy_command(load(None, {"vllm_args": ["--reasoning-parser=qwen3"]}), ["http://p"], ["http://d"])
    assert "--chat-parsing" not in plain and "--chat-parsing" in parsed


def test_the_cli_answers_without_importing_torch_or_vllm():
    """`pdrun --help` and the config commands must not pay for torch and vLLM (seconds to import)."""
    code = "import sys, pdrun.launch.cli; print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr or r.stdout


def test_a_package_that_breaks_vllm_for_cpu_is_named_with_the_command_that_fixes_it(tmp_path, monkeypatch):
    assert deploy.cpu_install_problem() is None  # this environment runs vLLM for CPU
    broken = tmp_path / "torchaudio"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchaudio::x does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert deploy.cpu_install_problem() == (
        "torchaudio cannot be imported beside this torch, and vLLM for CPU fails to start with it installed; "
        "vLLM serves text models without: pip uninstall -y torchaudio"
    )
    r = CliRunner().invoke(app, ["launch", "--device", "cpu", "--run-dir", str(tmp_path / "run")])
    assert r.exit_code != 0 and "pip uninstall -y torchaudio" in r.output


def test_launch_help_states_the_defaults_the_config_has():
    help_text = " ".join(CliRunner().invoke(app, ["launch", "--help"], terminal_width=200).output.split())
    cfg = load(None, {})
    for option, value in [("Prefill instances", cfg.prefill), ("Decode instances", cfg.decode),
                          ("First vLLM port", cfg.instance_port), ("First KV transfer port", cfg.kv_port),
                          ("The cache server's port", cfg.cache_port)]:  # fmt: skip
        assert f"(default {value})" in help_text.split(option, 1)[1][:120], option

import json
import subprocess
import sys

import pytest

from pdrun.launch import tiny_model


def test_build_is_deterministic_and_complete(tmp_path):
    a = tiny_model.build(tmp_path / "a")
    b = tiny_model.build(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").stat().st_size < 10 << 20  # a few MB
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 8192


def test_tokenizer_and_chat_template_work(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model.build(tmp_path / "m"))
    ids = tok("def f(x):\n    return x + 1\n")["input_ids"]
    assert 0 < len(ids) < 20 and tok.decode(ids) == "def f(x):\n    return x + 1\n"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user") and text.endswith(
        "assistant<|end_header_id|>\n\n"
    )


def test_existing_build_is_reused_and_foreign_directories_refused(tmp_path):
    path = tiny_model.build(tmp_path / "m")
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model.build(path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a pdrun tiny model"):
        tiny_model.build(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_builds_and_names_bad_directories(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pdrun.launch.cli", "model", "tiny", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(tmp_path / "m")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    bad = subprocess.run(
        [sys.executable, "-m", "pdrun.launch.cli", "model", "tiny", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not a pdrun tiny model" in bad.stderr

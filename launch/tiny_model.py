"""The embedded tiny model: a small Llama built locally, no download.

Random weights from a fixed seed, a byte-level BPE tokenizer trained on this Python's own
standard library sources, and a Llama-3-style chat template. It exists so that every pdrun
command, test and example has a real model to serve on a CPU-only machine.

The weights are scaled so that attention is sharp and the logits have clear margins: greedy
output then depends on the whole prompt and is stable under float rounding, which is what the
PD-equals-single-instance tests need.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SHAPE = {
    "vocab_size": 8192,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
SEED = 20261122
# Bumped whenever the recipe changes, so a cached build from an older recipe is rebuilt.
RECIPE_VERSION = 1
DEFAULT_DIR = Path(os.environ.get("PDRUN_HOME", Path.home() / ".cache" / "pdrun")) / f"tiny-v{RECIPE_VERSION}"


def model_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 4,
        "max_position_embeddings": 8192,
        "initializer_range": 0.02,
        "use_cache": True,
        "pdrun_tiny_recipe": RECIPE_VERSION,
        **SHAPE,
    }


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:400]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SHAPE["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        for f in files:
            try:
                yield Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue

    tok.train_from_iterator(texts(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "model_max_length": 8192,
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, indent=1)
    )


def _weights() -> dict:
    import torch

    g = torch.Generator().manual_seed(SEED)
    h, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    q_dim = SHAPE["num_attention_heads"] * SHAPE["head_dim"]
    kv_dim = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": normal(SHAPE["vocab_size"], h, std=0.1), "model.norm.weight": torch.ones(h)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # q/k large enough that attention is peaked rather than a plain average of the context.
        w[p + "self_attn.q_proj.weight"] = normal(q_dim, h, std=0.15)
        w[p + "self_attn.k_proj.weight"] = normal(kv_dim, h, std=0.15)
        w[p + "self_attn.v_proj.weight"] = normal(kv_dim, h, std=0.1)
        w[p + "self_attn.o_proj.weight"] = normal(h, q_dim, std=0.1)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h, std=0.08)
        w[p + "mlp.up_proj.weight"] = normal(inter, h, std=0.08)
        w[p + "mlp.down_proj.weight"] = normal(h, inter, std=0.05)
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
    return w


def _recipe(path: Path) -> int | None:
    try:
        return json.loads((path / "config.json").read_text()).get("pdrun_tiny_recipe")
    except (OSError, ValueError, AttributeError):
        return None


def is_built(path: Path) -> bool:
    return _recipe(path) == RECIPE_VERSION and (path / "model.safetensors").is_file()


def build(path: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build the tiny model into `path` (default: the per-user cache) and return the path.

    Idempotent: an existing build of the same recipe is reused unless `force`. The build goes to a
    temporary directory first and is renamed into place, so a crash never leaves half a model.
    """
    from safetensors.torch import save_file

    out = Path(path) if path is not None else DEFAULT_DIR
    if is_built(out) and not force:
        return out
    if out.exists() and any(out.iterdir()) and _recipe(out) is None:
        raise FileExistsError(f"{out} exists, is not empty and is not a pdrun tiny model; pick another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        _train_tokenizer(tmp)
        save_file(_weights(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model_config(), indent=1))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 4}))
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

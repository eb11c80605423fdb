"""The embedded demo models, and small Jamba checkpoints with deterministic *random* weights.

Real checkpoints cannot be downloaded here, so the demo, `jamba serve` without a model and the
tests use two small checkpoints trained on this kind of machine and committed in `models/`
(`models/train_demo.py`): `jamba-demo-lm`, a 12.9M-parameter Jamba that writes text like the
fortune-cookie files it was trained on, and `jamba-demo-classifier`, which tells which fortune
file a text comes from. They are stored in bfloat16; `ensure_demo_model` serves an fp32 copy
(CPUs here have no fast bf16). Their files are laid out exactly like ai21labs' (config.json,
sharded safetensors with an index, tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json), so the loading code is the same.

`make_demo_model` writes a random-weight checkpoint of any shape (`jamba make-demo-model`), for
the tests that need many configurations; its text output is gibberish.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import JambaConfig
from .loading import save_checkpoint
from .model import JambaStage
from .tokenizer import build_demo_tokenizer

DEMO_LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def demo_config(task: str = "lm") -> JambaConfig:
    return JambaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
        architectures=["JambaForSequenceClassification" if task == "classification" else "JambaForCausalLM"],
        id2label=DEMO_LABELS if task == "classification" else {},
    )


def random_state(config: JambaConfig, head: str, seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    """Deterministic random weights for every parameter of the full model."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in JambaStage(config, head=head).named_parameters()}
    state = {}
    for n, shape in shapes.items():
        if n.endswith("A_log"):  # S4D-real init, as Mamba: A = -(1..d_state)
            state[n] = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
        elif n.endswith(".D") or "norm" in n:
            state[n] = torch.ones(shape)
        elif n.endswith("bias"):
            state[n] = torch.zeros(shape)
        else:
            state[n] = torch.randn(shape, generator=g) * std
    return state


def make_demo_model(path: str | Path, task: str = "lm", seed: int = 0) -> Path:
    """Write the demo checkpoint to `path` (task "lm" or "classification"); returns the path."""
    if task not in ("lm", "classification"):
        raise ValueError(f"task must be 'lm' or 'classification', not {task!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = demo_config(task)
    build_demo_tokenizer(path, vocab_size=config.vocab_size)
    # Small shards so that pipeline stages really do open only their own files.
    save_checkpoint(random_state(config, task, seed), config, path, max_shard_bytes=256 << 10)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2))
    (path / "README.md").write_text(
        f"# Jamba demo {'classifier' if task == 'classification' else 'language model'}\n\n"
        "Written by `jamba make-demo-model`. The weights are RANDOM (seed "
        f"{seed}): outputs are gibberish. It exists to exercise the serving stack end to end.\n")
    return path


# The trained checkpoints: models/ of the repository, or $JAMBA_DEMO_MODELS (the image copies them there).
TRAINED = {"lm": "jamba-demo-lm", "classification": "jamba-demo-classifier"}


def trained_model_dir(task: str = "lm") -> Path:
    root = Path(os.environ.get("JAMBA_DEMO_MODELS", Path(__file__).resolve().parent.parent / "models"))
    return root / TRAINED[task]


def default_model_dir(task: str = "lm") -> Path:
    """Where the demo model is served from when no --model is given ($JAMBA_HOME, default ~/.cache/jamba)."""
    home = Path(os.environ.get("JAMBA_HOME", Path.home() / ".cache" / "jamba"))
    return home / ("demo-classifier" if task == "classification" else "demo-lm")


def ensure_demo_model(task: str = "lm") -> Path:
    """The trained demo checkpoint for `task`, as an fp32 copy under $JAMBA_HOME (made on first use)."""
    if task not in TRAINED:
        raise ValueError(f"task must be 'lm' or 'classification', not {task!r}")
    source, path = trained_model_dir(task), default_model_dir(task)
    index = source / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"the trained demo checkpoint {source} is missing (it ships in the repository's "
                                "models/ folder; set JAMBA_DEMO_MODELS to the folder that holds it)")
    stamp = index.read_text()
    if (path / ".source-index.json").is_file() and (path / ".source-index.json").read_text() == stamp:
        return path
    widen_to_fp32(source, path)
    (path / ".source-index.json").write_text(stamp)
    return path


def widen_to_fp32(source: Path, dest: Path) -> None:
    """Copy a checkpoint with its floating-point tensors in float32: same shards, same index."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(source / shard).items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, tmp / shard, metadata={"format": "pt"})
    index.setdefault("metadata", {})["total_size"] = total
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((source / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)

"""The embedded demo model: a small Jamba with deterministic *random* weights, in HF format.

Real checkpoints cannot be downloaded here, so the demo and the tests use this one. Its files are
laid out exactly like ai21labs' (config.json, sharded safetensors with an index, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json), so the loading code is the
same. Its text output is gibberish: the weights are random.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

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


def default_model_dir(task: str = "lm") -> Path:
    """Where the demo model lives when no --model is given ($JAMBA_HOME, default ~/.cache/jamba)."""
    home = Path(os.environ.get("JAMBA_HOME", Path.home() / ".cache" / "jamba"))
    return home / ("demo-classifier" if task == "classification" else "demo-lm")


def ensure_demo_model(task: str = "lm") -> Path:
    path = default_model_dir(task)
    if not (path / "model.safetensors.index.json").exists():
        make_demo_model(path, task)
    return path

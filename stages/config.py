"""Jamba configuration, read from a Hugging Face `config.json`.

Field names are the HF `JambaConfig` names, so a checkpoint's config maps one to one.
Jamba interleaves two kinds of mixer and two kinds of feed-forward:

    layer i is attention  if i % attn_layer_period   == attn_layer_offset, else Mamba
    layer i is MoE        if i % expert_layer_period == expert_layer_offset, else a dense MLP
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Quantization modes (stages/quant.py does the work); here, without torch, for what only checks them.
QUANT_MODES = ("int8-experts", "int8", "int8-with-mamba")


def check_quant_mode(mode: str | None) -> str | None:
    """`mode` if it is a quantization mode (or None: full precision); a clear error otherwise."""
    if mode is None or mode in QUANT_MODES:
        return mode
    raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)} (or none)")


@dataclass
class JambaConfig:
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # HF derives it as hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    # Mixture of experts
    num_experts: int = 16
    num_experts_per_tok: int = 2
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    # Attention placement
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    # Mamba-1 mixer
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # Special tokens; eos may be a list
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # Sequence classification head
    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)
    architectures: list[str] = field(default_factory=lambda: ["JambaForCausalLM"])
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.id2label = {int(k): str(v) for k, v in (self.id2label or {}).items()}
        if not self.id2label:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.num_labels = len(self.id2label)
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid Jamba config: {msg}")

        need(0 <= self.attn_layer_offset < self.attn_layer_period, "attn_layer_offset must be in [0, attn_layer_period)")
        need(0 <= self.expert_layer_offset < self.expert_layer_period, "expert_layer_offset must be in [0, expert_layer_period)")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads must be a multiple of num_key_value_heads")
        need(1 <= self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok must be in [1, num_experts]")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (Jamba uses 'silu')")
        need(self.num_hidden_layers >= 1 and self.vocab_size >= 1, "num_hidden_layers and vocab_size must be positive")

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    def is_attention(self, layer: int) -> bool:
        return layer % self.attn_layer_period == self.attn_layer_offset

    def is_moe(self, layer: int) -> bool:
        # HF builds a dense MLP when a layer would have a single expert.
        return layer % self.expert_layer_period == self.expert_layer_offset and self.num_experts > 1

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def is_classifier(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in self.architectures)

    # ---- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JambaConfig":
        if d.get("model_type", "jamba") != "jamba":
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}, expected 'jamba'")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "num_local_experts" in d and "num_experts" not in d:
            kwargs["num_experts"] = d["num_local_experts"]
        if "dtype" in d and "torch_dtype" not in d:
            kwargs["torch_dtype"] = d["dtype"]
        if "id2label" not in d and "num_labels" in d:
            kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(d["num_labels"])}
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "JambaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["label2id"] = {v: k for k, v in self.id2label.items()}
        d["model_type"] = "jamba"
        d.pop("torch_dtype")
        if self.torch_dtype:
            d["dtype"] = self.torch_dtype
        return d

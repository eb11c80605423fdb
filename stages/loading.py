"""Loading a stage from a Hugging Face safetensors checkpoint, and writing checkpoints.

A stage reads only the tensors it owns: `model.safetensors.index.json` says which shard holds
each tensor, and shards are opened memory-mapped, so a stage of a 398B-parameter model never
touches the other stages' bytes.

Expert weights come in two spellings:
  hub (per expert):   model.layers.1.feed_forward.experts.3.gate_proj.weight   (I, H)
                      ...experts.3.up_proj.weight (I, H), ...experts.3.down_proj.weight (H, I)
  transformers v5:    model.layers.1.feed_forward.experts.gate_up_proj          (E, 2I, H), gate then up
                      model.layers.1.feed_forward.experts.down_proj             (E, H, I)
The model keeps the fused form; per-expert tensors are stacked at load time.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import JambaConfig
from .model import JambaStage

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """The checkpoint is unusable: wrong format, missing or mis-shaped tensor."""


@dataclass
class LoadStats:
    seconds: float = 0.0
    bytes_loaded: int = 0
    tensors_read: list[str] = field(default_factory=list)
    files_opened: set[str] = field(default_factory=set)


class Checkpoint:
    """Index of a checkpoint directory: tensor name -> shard file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model directory {self.path} does not exist")
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.exists():
            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: single.name for k in f.keys()}
        else:
            pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            if pickles:
                raise CheckpointError(
                    f"{self.path} holds pickled weights ({', '.join(pickles[:3])}); only safetensors are loaded, "
                    "because unpickling can run arbitrary code. Convert it with transformers' save_pretrained "
                    "(safe_serialization=True)."
                )
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        self.config = JambaConfig.from_file(self.path)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str], stats: LoadStats) -> dict[str, torch.Tensor]:
        """Read the named tensors, opening each needed shard once (memory-mapped)."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for fname, fnames in by_file.items():
            stats.files_opened.add(fname)
            with safe_open(self.path / fname, framework="pt") as f:
                for n in fnames:
                    t = f.get_tensor(n)
                    # safetensors >= 0.8 hands out views of the memory-mapped file, at whatever
                    # offset the tensor has there. CPU GEMM kernels take a different path (and
                    # round differently) on memory that is not 64-byte aligned, so the same weights
                    # would give different logits depending on the file's layout: copy those.
                    out[n] = t.clone() if t.data_ptr() % 64 else t
                    stats.bytes_loaded += out[n].numel() * out[n].element_size()
                    stats.tensors_read.append(n)
        return out


def _source_names(name: str, ckpt: Checkpoint, config: JambaConfig) -> list[str] | None:
    """Checkpoint tensors that make up one model parameter, or None if absent."""
    if name in ckpt:
        return [name]
    prefix, _, leaf = name.rpartition(".experts.")
    if leaf in ("gate_up_proj", "down_proj"):
        parts = ["gate_proj", "up_proj"] if leaf == "gate_up_proj" else ["down_proj"]
        per_expert = [f"{prefix}.experts.{e}.{p}.weight" for p in parts for e in range(config.num_experts)]
        if all(n in ckpt for n in per_expert):
            return per_expert
    if name == "lm_head.weight" and config.tie_word_embeddings and "model.embed_tokens.weight" in ckpt:
        return ["model.embed_tokens.weight"]
    return None


def _assemble(name: str, sources: list[str], tensors: dict[str, torch.Tensor], config: JambaConfig) -> torch.Tensor:
    if len(sources) == 1:
        return tensors[sources[0]]
    E = config.num_experts
    if name.endswith("gate_up_proj"):
        gate = torch.stack([tensors[n] for n in sources[:E]])  # (E, I, H)
        up = torch.stack([tensors[n] for n in sources[E:]])
        return torch.cat([gate, up], dim=1)  # (E, 2I, H)
    return torch.stack([tensors[n] for n in sources])  # down_proj: (E, H, I)


def load_stage(
    path: str | Path,
    start: int = 0,
    end: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    head: str | None = None,
) -> tuple[JambaStage, LoadStats]:
    """Build layers [start, end) of the checkpoint at `path`, reading only their tensors.

    dtype: None keeps the checkpoint's dtype; otherwise weights are cast.
    """
    t0 = time.perf_counter()
    ckpt = Checkpoint(path)
    config = ckpt.config
    with torch.device("meta"):
        stage = JambaStage(config, start, end, head=head)
    wanted = {n: p.shape for n, p in stage.named_parameters()}
    sources: dict[str, list[str]] = {}
    missing = []
    for n in wanted:
        src = _source_names(n, ckpt, config)
        if src is None:
            missing.append(n)
        else:
            sources[n] = src
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint {ckpt.path} is missing tensor {', '.join(missing[:3])}{more}")
    stats = LoadStats()
    tensors = ckpt.read(sorted({s for src in sources.values() for s in src}), stats)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    state = {}
    for n, shape in wanted.items():
        t = _assemble(n, sources[n], tensors, config)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {n} in {ckpt.path} has shape {tuple(t.shape)}, expected {tuple(shape)} from config.json"
            )
        if dtype is None:
            dtype = t.dtype if t.is_floating_point() else torch.float32
        state[n] = t.to(device=device, dtype=dtype)
    stage.load_state_dict(state, assign=True, strict=True)
    stage.eval()
    stats.seconds = time.perf_counter() - t0
    log.info(
        "loaded layers [%d, %d) of %s: %.1f MB from %d file(s) in %.2fs",
        stage.start, stage.end, ckpt.path, stats.bytes_loaded / 1e6, len(stats.files_opened), stats.seconds,
    )
    return stage, stats


def save_checkpoint(
    state: dict[str, torch.Tensor],
    config: JambaConfig,
    path: str | Path,
    max_shard_bytes: int = 2 << 30,
    fused_experts: bool = False,
) -> None:
    """Write a HF-format checkpoint: config.json, sharded safetensors and their index.

    `state` uses this model's (fused) names; by default experts are written per expert, as the hub does.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for n, t in state.items():
        prefix, _, leaf = n.rpartition(".experts.")
        if fused_experts or leaf not in ("gate_up_proj", "down_proj"):
            out[n] = t.contiguous()
        elif leaf == "gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}.experts.{e}.gate_proj.weight"] = gate[e].contiguous()
                out[f"{prefix}.experts.{e}.up_proj.weight"] = up[e].contiguous()
        else:
            for e in range(t.shape[0]):
                out[f"{prefix}.experts.{e}.down_proj.weight"] = t[e].contiguous()
    # Greedy sharding in name order; layers stay roughly together so stages open few shards.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for n in sorted(out, key=_layer_sort_key):
        nbytes = out[n].numel() * out[n].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][n] = out[n]
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        for n, t in shard.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
    )
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


def _layer_sort_key(name: str) -> tuple:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (1, int(parts[2]), name)
    return (0 if "embed" in name else 2, 0, name)

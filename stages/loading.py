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

import contextlib
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import JambaConfig, check_quant_mode
from .model import JambaStage
from .quant import QUANT_CHUNK_ELEMS, quantize_int8_into, quantize_modules, quantized_param, scale_name

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """The checkpoint is unusable: wrong format, missing or mis-shaped tensor."""


@dataclass
class LoadStats:
    """What a load read, and its memory.

    peak_bytes: the most bytes of tensors the loader held at once (host and device together): the
    stage's tensors kept so far, plus the full-precision tensors in hand for the parameter being
    built (as read from the checkpoint, counted whole even when memory-mapped, and as cast), plus
    the quantizer's float32 working block. Counted by the loader as it goes, so it is exact for
    these tensors; allocator slack, torch's temporaries and Python objects are not in it.
    maxrss_growth_bytes: how much the process's peak resident set (getrusage ru_maxrss) grew during
    the load: an outside check that includes the memory-mapped pages read, but is 0 when an earlier
    peak of the process was higher.
    """

    seconds: float = 0.0
    bytes_loaded: int = 0
    tensors_read: list[str] = field(default_factory=list)
    files_opened: set[str] = field(default_factory=set)
    quantize: str | None = None
    kept_bytes: int = 0
    peak_bytes: int = 0
    maxrss_growth_bytes: int = 0

    def hold(self, in_hand: int) -> None:
        """Note a moment when `in_hand` bytes are held beside the kept ones."""
        self.peak_bytes = max(self.peak_bytes, self.kept_bytes + in_hand)

    def keep(self, *tensors: torch.Tensor) -> None:
        self.kept_bytes += sum(_nbytes(t) for t in tensors)
        self.hold(0)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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

    @contextlib.contextmanager
    def reader(self, stats: LoadStats):
        """A function `get(name, align=True) -> tensor` reading one tensor at a time; each shard is
        opened (memory-mapped) on first use and stays open until the block ends. align=False skips
        the alignment copy, for tensors that are only quantized, never fed to a GEMM."""
        with contextlib.ExitStack() as files:
            handles = {}

            def get(name: str, align: bool = True) -> torch.Tensor:
                fname = self.weight_map[name]
                if fname not in handles:
                    stats.files_opened.add(fname)
                    handles[fname] = files.enter_context(safe_open(self.path / fname, framework="pt"))
                t = handles[fname].get_tensor(name)
                # See `read`: CPU GEMMs round differently on memory that is not 64-byte aligned.
                t = t.clone() if align and t.data_ptr() % 64 else t
                stats.bytes_loaded += _nbytes(t)
                stats.tensors_read.append(name)
                return t

            yield get

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


def _expected_source_shape(name: str, shape: torch.Size, n_sources: int) -> tuple:
    if n_sources == 1:
        return tuple(shape)
    if name.endswith("gate_up_proj"):  # per-expert gate_proj / up_proj: (I, H)
        return (shape[1] // 2, shape[2])
    return (shape[1], shape[2])  # per-expert down_proj: (H, I)


def _check_shape(name: str, t: torch.Tensor, expected: tuple, ckpt: Checkpoint) -> None:
    if tuple(t.shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {name} in {ckpt.path} has shape {tuple(t.shape)}, expected {tuple(expected)} from config.json"
        )


def _targets(name: str, out: torch.Tensor, n_sources: int) -> list[torch.Tensor]:
    """Where each source goes in `out`: itself, or for per-expert sources the slices of the fused
    (E, R[, C]) tensor, gates then ups (gate_up_proj) or downs, in _source_names' order."""
    if n_sources == 1:
        return [out]
    E = out.shape[0]
    if name.endswith("gate_up_proj"):
        I = out.shape[1] // 2
        return [out[e, :I] for e in range(E)] + [out[e, I:] for e in range(E)]
    return [out[e] for e in range(E)]


def _load_full(name, shape, sources, get, ckpt, dtype, device, stats) -> torch.Tensor:
    """One full-precision parameter; per-expert sources are copied into the fused tensor one at a time."""
    if len(sources) == 1:
        t = get(sources[0])
        _check_shape(name, t, shape, ckpt)
        dtype = dtype or (t.dtype if t.is_floating_point() else torch.float32)
        out = t.to(device=device, dtype=dtype)
        stats.hold(_nbytes(t) + (_nbytes(out) if out is not t else 0))
        stats.keep(out)
        return out
    expected = _expected_source_shape(name, shape, len(sources))
    out = targets = None
    for k, src in enumerate(sources):
        t = get(src)
        _check_shape(src, t, expected, ckpt)
        if out is None:
            out = torch.empty(shape, dtype=dtype or t.dtype, device=device)
            stats.keep(out)
            targets = _targets(name, out, len(sources))
        targets[k].copy_(t)
        stats.hold(_nbytes(t))
    return out


def _load_quantized(name, shape, sources, get, ckpt, device, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """One int8 parameter and its scales, each source quantized as it is read: scales are per row,
    so quantizing each expert's gate/up/down alone is the same as quantizing the fused tensor."""
    q = torch.empty(shape, dtype=torch.int8, device=device)
    s = torch.empty(shape[:-1], dtype=torch.float32, device=device)
    stats.keep(q, s)
    expected = _expected_source_shape(name, shape, len(sources))
    q_targets, s_targets = _targets(name, q, len(sources)), _targets(name, s, len(sources))
    for src, qt, st in zip(sources, q_targets, s_targets):
        t = get(src, align=False)  # only read by the quantizer: no need for an aligned copy
        _check_shape(src if len(sources) > 1 else name, t, expected, ckpt)
        stats.hold(_nbytes(t) + 4 * min(t.numel(), max(QUANT_CHUNK_ELEMS, t.shape[-1])))
        quantize_int8_into(t, qt, st)
    return q, s


def load_stage(
    path: str | Path,
    start: int = 0,
    end: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    head: str | None = None,
    quantize: str | None = None,
) -> tuple[JambaStage, LoadStats]:
    """Build layers [start, end) of the checkpoint at `path`, reading only their tensors.

    dtype: None keeps the checkpoint's dtype; otherwise weights are cast.
    quantize: None, or a mode of stages.quant (int8-experts, int8, int8-with-mamba): those weights
    are stored int8 with float32 scales, quantized from the checkpoint's values as they are read.

    Tensors are read, assembled and quantized one parameter at a time (per-expert checkpoint
    tensors one expert at a time), so besides the stage's own tensors the load holds at most one
    parameter's full-precision tensors (one expert's, when quantizing); see LoadStats.peak_bytes.
    """
    t0 = time.perf_counter()
    rss0 = _maxrss_bytes()
    quantize = check_quant_mode(quantize)
    ckpt = Checkpoint(path)
    config = ckpt.config
    with torch.device("meta"):
        stage = JambaStage(config, start, end, head=head)
        quantize_modules(stage, quantize)
    # Parameters and the int8 buffers; scales come with their weights.
    wanted = {n: t.shape for n, t in stage.state_dict(keep_vars=True).items()
              if not (quantize and n.endswith("_scale"))}
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
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    stats = LoadStats(quantize=quantize)
    state = {}
    with ckpt.reader(stats) as get:
        for n, shape in wanted.items():
            if quantized_param(n, quantize):
                state[n], state[scale_name(n)] = _load_quantized(n, shape, sources[n], get, ckpt, device, stats)
            else:
                state[n] = _load_full(n, shape, sources[n], get, ckpt, dtype, device, stats)
                if dtype is None:  # the first tensor's dtype, for all (as before: one dtype per stage)
                    dtype = state[n].dtype
    stage.load_state_dict(state, assign=True, strict=True)
    stage.eval()
    stats.seconds = time.perf_counter() - t0
    stats.maxrss_growth_bytes = max(0, _maxrss_bytes() - rss0)
    log.info(
        "loaded layers [%d, %d) of %s%s: %.1f MB from %d file(s) in %.2fs; %.1f MB kept, at most %.1f MB "
        "held while loading (max RSS grew %.1f MB)",
        stage.start, stage.end, ckpt.path, f" ({quantize})" if quantize else "", stats.bytes_loaded / 1e6,
        len(stats.files_opened), stats.seconds, stats.kept_bytes / 1e6, stats.peak_bytes / 1e6,
        stats.maxrss_growth_bytes / 1e6,
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

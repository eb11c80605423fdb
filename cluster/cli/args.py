"""The flags every command that runs the model shares, and what they become: one PipelineConfig
(cluster/runtime/config.py), whose defaults are the defaults here unless a command says
otherwise (offline commands take bigger steps: --max-batch-tokens 2048).

Also what commands check before Ray starts: which checkpoint a --model names, and whether the
layer split can be (messages name the flags, so they stay here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.runtime.config import PipelineConfig, config_fields, default
from cluster.runtime.plan import parse_layer_split, partition
from stages.config import QUANT_MODES, JambaConfig

OFFLINE_MAX_BATCH_TOKENS = 2048  # generate/score/classify/eval and batch jobs: throughput over latency
PLACEMENT_STRATEGIES = ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
DTYPES = ["float32", "bfloat16", "float16"]

# flag (its argparse dest) -> PipelineConfig field, where the names differ
RENAMED = {"stages": "num_stages", "kv_blocks": "num_blocks", "prefix_snapshots": "num_snapshots",
           "recover_timeout": "recover_timeout_s"}


def add_model_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    if dtype:
        p.add_argument("--dtype", choices=DTYPES, help="cast weights (default: as stored)")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None,
                   help="int8 weights with float32 per-channel scales: int8-experts (the MoE experts only), int8 "
                        "(every linear layer but Mamba's, the router and the head), int8-with-mamba (int8 and "
                        "the Mamba projections too, for quality experiments); default: none, as stored")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="run decode steps eagerly instead of the compiled fixed-shape step (compiled at start "
                        "for batch sizes 1, 2, 4, ... up to --num-slots; cached under $JAMBA_KERNEL_CACHE); "
                        "JAMBA_DECODE=eager does the same")


def add_batching_args(p: argparse.ArgumentParser, max_batch_tokens: int) -> None:
    p.add_argument("--num-slots", type=int, default=default("num_slots"),
                   help=f"sequences in flight at once (default {default('num_slots')})")
    p.add_argument("--max-batch-tokens", type=int, default=max_batch_tokens,
                   help=f"token budget of one forward step; longer prompts go through in chunks (default {max_batch_tokens})")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """The paged KV cache and the prefix cache (stages/paging.py)."""
    g = p.add_argument_group("cache", "attention KV in blocks taken as tokens arrive; prompts that share a prefix "
                                      "of whole blocks compute it once (Mamba states restored from snapshots)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + new tokens (default: the model's context, capped by the KV pool)")
    g.add_argument("--block-size", type=int, default=default("block_size"),
                   help=f"tokens per KV block and prefix-cache block (default {default('block_size')})")
    g.add_argument("--kv-blocks", type=int, default=None,
                   help="KV blocks per stage (default: num-slots x min(context, 4096) tokens' worth)")
    g.add_argument("--prefix-snapshots", type=int, default=None,
                   help="Mamba-state snapshots each stage keeps for the prefix cache (default 2 x num-slots)")
    g.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every prompt in full (the answers are the same either way)")


def add_pipeline_args(g, stages_default: int | None, stages_help: str) -> None:
    """The stages on Ray; `g` a parser or an argument group."""
    g.add_argument("--stages", type=int, default=stages_default, help=stages_help)
    g.add_argument("--layer-split", help="layers per stage ('9,9,...') or boundaries ('0,9,...,72'); default: balanced")
    g.add_argument("--threads-per-stage", type=int, default=default("threads_per_stage"),
                   help="torch CPU threads of each stage actor")
    g.add_argument("--cpus-per-stage", type=float, default=None, help="Ray CPUs reserved per stage (default: threads)")
    g.add_argument("--gpus-per-stage", type=float, default=default("gpus_per_stage"),
                   help="GPUs per stage actor (1 on GPU nodes)")


def engine_fields(args: argparse.Namespace) -> dict:
    """The PipelineConfig fields the parsed flags set (flags left at None keep the config's default)."""
    names = config_fields()
    out = {}
    for dest, value in vars(args).items():
        field = RENAMED.get(dest, dest)
        if field in names and field != "model_dir" and value is not None:
            out[field] = value
    return out


def engine_config(args: argparse.Namespace, model_dir: str) -> PipelineConfig:
    return PipelineConfig(str(model_dir), **engine_fields(args))


# ---- checked before Ray starts ----------------------------------------------------------------------
def resolve_model(spec: str) -> tuple[str, str]:
    """'[NAME=]DIR' -> (name, dir); the names 'demo' and 'demo-classifier' are the embedded demo models."""
    from stages.demo import model_dir  # torch: only commands that run a model get here

    name, _, path = spec.rpartition("=")
    return name or path.rstrip("/").split("/")[-1], model_dir(path)


def check_model_dir(path: str, label: str) -> JambaConfig:
    """The checkpoint's config, or FileNotFoundError starting with `label` (the flag as given)."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{label}: not a checkpoint directory (no config.json)")
    return JambaConfig.from_file(path)


def resolve_split(model_dir: str, stages: int, layer_split: str | None) -> list[tuple[int, int]]:
    """The layer ranges of each stage, from the checkpoint's config alone (no Ray); ValueError
    naming the flag for a split that cannot be."""
    if stages < 1:
        raise ValueError(f"--stages must be at least 1, got {stages}")
    config = JambaConfig.from_file(model_dir)
    n = config.num_hidden_layers
    if layer_split:
        splits = parse_layer_split(layer_split, n)
        if len(splits) != stages:
            raise ValueError(f"--layer-split {layer_split!r} has {len(splits)} stage(s), but --stages is {stages}")
        return splits
    if stages > n:
        raise ValueError(f"--stages {stages}: {model_dir} has {n} layers, and every stage needs at least one")
    return partition(config, stages)

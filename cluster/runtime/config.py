"""The engine's configuration: one object, `PipelineConfig`, that every way of running the model
takes (the single process, the Ray pipeline, a Serve replica, a batch job), and `plan_pipeline`,
which works out from it and the checkpoint's config.json alone (no Ray, no torch) what a
pipeline will ask for: the checks that can fail at once, before anything is placed.

The command line, the Serve application's arguments and batch jobs build a PipelineConfig and
leave every field they are not given at its default here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields

from stages.config import JambaConfig, check_quant_mode
from stages.paging import DEFAULT_BLOCK_SIZE, blocks_for

from .dataplane import resolve_transport
from .plan import parse_layer_split, partition

DEFAULT_WORKER = "stages.worker:StageWorker"
CONTIGUOUS_CONTEXT = 4096  # the default KV pool holds num_slots sequences of min(context, this) tokens


@dataclass
class PipelineConfig:
    model_dir: str
    num_stages: int = 1
    layer_split: str | list[tuple[int, int]] | None = None  # "9,9,..." counts or boundaries; default: balanced
    num_slots: int = 32  # sequences in flight at once
    # Paged KV cache (stages/cache.py) and prefix cache (stages/paging.py). The default pool holds
    # num_slots x min(context, 4096) tokens (what contiguous slots of 4096 took); a sequence may
    # use any share of it, up to max_seq_len (default: the model's context, capped by the pool).
    max_seq_len: int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block, and the prefix cache's granularity
    num_blocks: int | None = None  # KV blocks per attention layer on each stage
    prefix_cache: bool = True
    num_snapshots: int | None = None  # Mamba-state snapshots per stage for the prefix cache (default 2 x slots)
    max_batch_tokens: int = 512  # token budget of one microbatch; longer prompts go in chunks
    max_queue: int = 1024  # requests waiting for a slot before new ones are refused
    threads_per_stage: int = 1
    gpus_per_stage: float = 0  # 1 on GPU nodes: each stage pinned to its own GPU
    cpus_per_stage: float | None = None  # Ray CPU resource per stage bundle (default: threads_per_stage)
    placement_strategy: str = "PACK"
    dtype: str | None = None
    quantize: str | None = None  # None, "int8-experts", "int8" or "int8-with-mamba" (see stages/quant.py)
    enforce_eager: bool = False  # decode steps eagerly, not through the compiled fixed-shape step (stages/decode.py)
    depth: int | None = None  # microbatches in flight (default: num_stages)
    placement_timeout_s: float | None = 120.0  # None: wait for resources as long as it takes
    max_restarts: int = 3  # a dead stage actor is restarted by Ray (reloading its layers) this often
    recover_timeout_s: float = 120.0
    # A stage not heard from for this long (no heartbeat: its host hung or was cut off) is declared
    # lost and replaced, without waiting for Ray to declare its node dead; see dataplane.py.
    heartbeat_timeout_s: float = 2.0
    # Inside a Ray Serve replica that was given placement_group_bundles, the replica sits in
    # bundle 0 of its own placement group and the stages take bundles 1..P of that group.
    use_current_placement_group: bool = False
    actor_options: dict = field(default_factory=dict)
    # How activations travel between stages: "auto" (nccl with a GPU per stage, else inline),
    # "inline", "gloo" or "nccl"; see cluster/runtime/dataplane.py.
    transport: str = "auto"
    # The class each stage runs, as "module:Class" (or "module.Class"): see stages/worker.py for
    # what it must have. It is built with its `load` class method, given worker_kwargs too.
    worker_cls: str = DEFAULT_WORKER
    worker_kwargs: dict = field(default_factory=dict)


def config_fields() -> set[str]:
    """The names a PipelineConfig takes (for the front ends that pass fields through by name)."""
    return {f.name for f in fields(PipelineConfig)}


def default(name: str):
    """A PipelineConfig field's default (for help texts)."""
    return next(f.default for f in fields(PipelineConfig) if f.name == name)


def resolve_paging(cfg: PipelineConfig, config: JambaConfig) -> dict:
    """max_seq_len, block_size, num_blocks and num_snapshots, defaults filled in and checked."""
    bs = cfg.block_size
    if bs < 1:
        raise ValueError(f"block_size must be positive, got {bs}")
    if cfg.num_slots < 1:
        raise ValueError(f"num_slots must be at least 1, got {cfg.num_slots}")
    context = config.max_position_embeddings
    num_blocks = cfg.num_blocks or cfg.num_slots * blocks_for(min(context, CONTIGUOUS_CONTEXT), bs)
    max_seq_len = cfg.max_seq_len or min(context, num_blocks * bs)
    if max_seq_len > num_blocks * bs:
        raise ValueError(f"max_seq_len {max_seq_len} does not fit in the KV cache: {num_blocks} blocks of {bs} tokens "
                         f"hold {num_blocks * bs} tokens (raise the number of blocks or lower max_seq_len)")
    num_snapshots = (2 * cfg.num_slots if cfg.num_snapshots is None else cfg.num_snapshots) if cfg.prefix_cache else 0
    return {"max_seq_len": max_seq_len, "block_size": bs, "num_blocks": num_blocks, "num_snapshots": num_snapshots}


def import_class(path: str):
    """"package.module:Class" or "package.module.Class" -> the class."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import worker class {path!r}: {e}") from None


@dataclass
class PipelinePlan:
    """What a pipeline will ask for, worked out from the checkpoint's config alone."""

    config: JambaConfig
    splits: list[tuple[int, int]]
    paging: dict  # max_seq_len, block_size, num_blocks, num_snapshots
    transport: str
    cpus: float  # per stage bundle
    bundle: dict


def plan_pipeline(cfg: PipelineConfig) -> PipelinePlan:
    config = JambaConfig.from_file(cfg.model_dir)
    if isinstance(cfg.layer_split, str):
        splits = parse_layer_split(cfg.layer_split, config.num_hidden_layers)
    elif cfg.layer_split:
        splits = list(cfg.layer_split)
    else:
        splits = partition(config, cfg.num_stages)
    if len(splits) != cfg.num_stages:
        raise ValueError(f"layer split has {len(splits)} stages, but num_stages is {cfg.num_stages}")
    transport = resolve_transport(cfg.transport, cfg.gpus_per_stage)
    if cfg.worker_cls != DEFAULT_WORKER:  # (importing the default would load torch here for nothing)
        import_class(cfg.worker_cls)  # a bad path fails here, before anything is placed
    check_quant_mode(cfg.quantize)  # so does an unknown quantization
    cpus = cfg.threads_per_stage if cfg.cpus_per_stage is None else cfg.cpus_per_stage
    bundle = {"CPU": cpus, **({"GPU": cfg.gpus_per_stage} if cfg.gpus_per_stage else {})}
    return PipelinePlan(config, splits, resolve_paging(cfg, config), transport, cpus, bundle)

"""What a command asks of Ray, checked before Ray starts, and a local cluster sized for it.

The commands that run pipelines (`jamba generate|score|classify --stages`, `jamba serve`) first
resolve the layer split from the checkpoint's config, so an impossible split fails at once
instead of after a cluster has started. A local cluster then gets exactly the CPUs the
placement groups will ask for: Ray's CPUs are reservations, not cores, and a cluster sized to the
machine's cores while the command's bundles ask for more never places them (a Serve replica then
waits for resources for ever). Where the threads asked for outnumber the cores they share them,
which is slower but works; GPUs that the machine does not have fail at once.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

log = logging.getLogger("jamba")

REPLICA_CPUS = 0.1  # a Serve replica's own bundle: it only schedules and streams


def resolve_split(model_dir: str, stages: int, layer_split: str | None) -> list[tuple[int, int]]:
    """The layer ranges of each stage, from the checkpoint's config alone (no Ray); ValueError
    naming the problem for a split that cannot be."""
    from stages.config import JambaConfig

    from .plan import parse_layer_split, partition

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


@dataclass
class Need:
    """What a command's placement groups ask for, in all."""

    cpus: float
    gpus: float
    what: str  # how it adds up, for messages

    def describe(self) -> str:
        gpus = f" and {self.gpus:g} GPU(s)" if self.gpus else ""
        return f"{self.cpus:g} CPU(s){gpus} ({self.what})"


def pipeline_need(stages: int, cpus_per_stage: float, gpus_per_stage: float = 0) -> Need:
    return Need(stages * cpus_per_stage, stages * gpus_per_stage,
                f"{stages} stage(s) x {cpus_per_stage:g} CPU")


def replica_need(stages: int, cpus_per_stage: float, gpus_per_stage: float = 0) -> Need:
    """One Serve replica: its own bundle, then one bundle per stage, placed together."""
    return Need(REPLICA_CPUS + stages * cpus_per_stage, stages * gpus_per_stage,
                f"{REPLICA_CPUS:g} for the replica + {stages} stage(s) x {cpus_per_stage:g}")


def serve_need(apps: int, replicas: int, stages: int, cpus_per_stage: float, gpus_per_stage: float = 0) -> Need:
    one = replica_need(stages, cpus_per_stage, gpus_per_stage)
    n = apps * replicas
    return Need(n * one.cpus, n * one.gpus, f"{apps} application(s) x {replicas} replica(s) x "
                f"({one.what})")


def machine_gpus() -> int:
    """GPUs this machine has (CUDA devices torch sees)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no usable CUDA runtime
        return 0


def local_cluster_size(need: Need, threads: int) -> dict:
    """ray.init() arguments for a local cluster that holds `need` (and nothing bigger), or
    ValueError when this machine cannot: it lacks the GPUs. `threads` is how many compute
    threads the command runs, to warn when they share cores."""
    cores = os.cpu_count() or 1
    if need.gpus:
        have = machine_gpus()
        if need.gpus > have:
            raise ValueError(f"this needs {need.describe()}, and this machine has {have} GPU(s); "
                             "lower --gpus-per-stage or --stages, or join a cluster that has them with --address")
    if threads > cores:
        log.warning("%d compute threads on %d CPU core(s): they will share cores (slower, but it works)",
                    threads, cores)
    # Ray wants whole CPUs; a bit of slack for what rounds up (0.1 for a replica).
    size = {"num_cpus": max(1, math.ceil(need.cpus - 1e-9))}
    if need.gpus:
        size["num_gpus"] = math.ceil(need.gpus)
    log.info("starting a local Ray cluster with %d CPU(s)%s for %s", size["num_cpus"],
             f" and {size['num_gpus']} GPU(s)" if need.gpus else "", need.describe())
    return size


def cluster_summary() -> str:
    """The connected cluster's CPUs and GPUs, in total and free, for messages."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()

    def fmt(res: dict) -> str:
        parts = [f"{res.get('CPU', 0):g} CPU(s)"]
        if res.get("GPU"):
            parts.append(f"{res['GPU']:g} GPU(s)")
        return " and ".join(parts)

    return f"the cluster has {fmt(total)} in all, {fmt(free)} free"

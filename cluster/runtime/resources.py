"""What a command asks of Ray, and a local cluster sized for it.

The commands that run pipelines (`jamba generate|score|classify --stages`, `jamba serve`) first
check the layer split from the checkpoint's config (cluster/cli/args.py), so an impossible split
fails at once instead of after a cluster has started. A local cluster then gets exactly the CPUs
the placement groups will ask for: Ray's CPUs are reservations, not cores, and a cluster sized to the
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

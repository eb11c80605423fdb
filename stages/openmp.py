"""How a stage's OpenMP threads wait between parallel ops: spin briefly, then sleep.

torch and numba each keep an OpenMP thread pool. With libgomp's default wait (a spin of about
300,000 iterations, milliseconds, before sleeping) two pools running back to back on one or two
cores starve each other: a 4-layer decode step measured 177 ms that way and 28 ms with
OMP_WAIT_POLICY=PASSIVE. But PASSIVE makes every parallel op wake sleeping threads (a futex
wake-up, 30-40 us here), and an eager decode step has ~100 ops a layer: `jamba generate` ran 5x
faster with ACTIVE than with PASSIVE (issue 22). A short spin serves both: the threads stay awake
across the back-to-back ops of a step, and sleep within ~0.1 ms of its end, so stages sharing a
machine (or torch and numba in one stage) take little of each other's time. Measured
(BENCHMARKS.md, issue 22): 10,000 spins cost as little CPU as PASSIVE between steps.

OPENMP_ENV is set, unless the user set those variables, before torch loads OpenMP: by the CLI, in
every stage actor's environment (cluster/runtime/pipeline.py), by the benchmarks and the tests.
"""

from __future__ import annotations

import os

OPENMP_ENV = {"GOMP_SPINCOUNT": "10000"}


def use_openmp_env(env: dict | None = None) -> None:
    """Put OPENMP_ENV into `env` (default: this process's environment) where not set already."""
    env = os.environ if env is None else env
    for name, value in OPENMP_ENV.items():
        env.setdefault(name, value)

"""No cold start: compile every kernel a stage will use before it serves, from an on-disk cache.

A fresh process pays for compiling its kernels on first use: numba's machine code for the CPU
kernels (seconds to tens of seconds), Triton's for the GPU ones (seconds per kernel variant),
plus torch's own first-call costs. Paid inside the first request, that is a first token many
times slower than the next. `warm_up(stage)` pays it at start instead, before the worker or the
runner reports ready, by running the stage's own forward on a throwaway cache: prompt rows from
a fresh state, a chunk on top of cached state beside a decode row, then a pure decode step, in
the stage's dtype and on its device, through whatever backend JAMBA_KERNELS selects; and one scan
taking a state snapshot (prefix caching), which Triton compiles as a variant of its own.

The compiled code is kept on disk, so only the first start on a machine compiles:

    JAMBA_KERNEL_CACHE=DIR   numba's cache in DIR/numba (NUMBA_CACHE_DIR), Triton's in DIR/triton
                             (TRITON_CACHE_DIR) and inductor's (the compiled decode steps of
                             stages/decode.py) in DIR/inductor (TORCHINDUCTOR_CACHE_DIR), unless
                             those are set explicitly. Unset: the tools' defaults (numba:
                             __pycache__ beside the source when writable, else ~/.cache; Triton:
                             ~/.triton/cache; inductor: /tmp/torchinductor_$USER).
    JAMBA_KERNEL_WARMUP=0    skip the warm-up (the first request then compiles).

The decode steps are compiled by the stage worker after this warm-up (`StageWorker.warm_up`), for
the cache sizes it serves with.

numba fixes its cache location when the kernels are defined, so the cache must be chosen
before stages.kernels.numba_cpu is imported: `warm_up` (or `use_kernel_cache`) does so first.

    jamba warmup [--model DIR] [--dtype bfloat16]

warms the cache ahead of time, e.g. while building a container image (see k8s/Dockerfile).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def use_kernel_cache() -> Path | None:
    """Point numba's and Triton's on-disk caches into $JAMBA_KERNEL_CACHE; returns it (None if unset)."""
    root = os.environ.get("JAMBA_KERNEL_CACHE")
    if not root:
        return None
    root = Path(root).expanduser()
    for var, sub in (("NUMBA_CACHE_DIR", "numba"), ("TRITON_CACHE_DIR", "triton"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault(var, str(root / sub))
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None:  # numba already imported: it read NUMBA_CACHE_DIR then
        numba_config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
    if "stages.kernels.numba_cpu" in sys.modules:
        log.info("numba kernels were defined before the kernel cache was chosen; they keep their cache")
    return root


def warm_up_enabled() -> bool:
    """False when JAMBA_KERNEL_WARMUP=0 (compile at first use instead)."""
    return os.environ.get("JAMBA_KERNEL_WARMUP", "1").strip() != "0"


@torch.inference_mode()
def warm_up(stage) -> float:
    """Compile (or load from the on-disk cache) every kernel `stage` (a JambaStage) will run, for
    its dtype and device; returns the seconds it took (0 when JAMBA_KERNEL_WARMUP=0)."""
    use_kernel_cache()  # also when skipping: the first request then compiles into it
    if not warm_up_enabled():
        return 0.0
    t0 = time.perf_counter()
    c = stage.config
    p = next(stage.parameters())
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> torch.Tensor:
        if stage.is_first:
            return torch.randint(0, c.vocab_size, (n,), generator=g).to(p.device)
        return (0.1 * torch.randn(n, c.hidden_size, generator=g)).to(p.device, p.dtype)  # (n, hidden)

    cache = stage.make_cache(2, 16)
    a, b = cache.allocate(), cache.allocate()
    stage(tokens(8), cache, [a, b], [5, 3])  # two prompts from a fresh state
    stage(tokens(3), cache, [a, b], [1, 2])  # a decode row beside a chunk on top of cached state
    stage(tokens(2), cache, [a, b], [1, 1])  # a pure decode step (JAMBA_KERNELS=mamba_ssm's path)
    if cache.ssm:  # the scan taking snapshots (prefix caching) is a Triton variant of its own
        _warm_scan_snapshots(c, cache.ssm[next(iter(cache.ssm))], a, b, p, g)
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    seconds = time.perf_counter() - t0
    log.info("kernels warmed up in %.2fs (layers [%d, %d), %s on %s)", seconds, stage.start, stage.end,
             str(p.dtype).removeprefix("torch."), p.device)
    return seconds


def _warm_scan_snapshots(c, ssm_states: torch.Tensor, row_slot: int, snap_slot: int, p: torch.Tensor,
                         g: torch.Generator) -> None:
    """One scan with a snapshot, with the arguments a Mamba layer passes (stages/model.py: u, B, C,
    z in the stage's dtype, delta, A, D float32), on a throwaway cache's SSM pool."""
    from .kernels import selective_scan_varlen

    T, D, N = 3, c.mamba_d_inner, c.mamba_d_state

    def rand(*shape, dtype=p.dtype):
        return (0.1 * torch.randn(*shape, generator=g)).to(p.device, dtype)

    selective_scan_varlen(
        rand(T, D), rand(T, D, dtype=torch.float32).abs(), -rand(D, N, dtype=torch.float32).abs(), rand(T, N),
        rand(T, N), rand(D, dtype=torch.float32), rand(T, D), ssm_states,
        torch.tensor([0, T], device=p.device), torch.tensor([row_slot], device=p.device),
        snap_tok=torch.tensor([1]), snap_dst=torch.tensor([snap_slot]),
    )

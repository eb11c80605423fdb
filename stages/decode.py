"""The decode step without host overhead: one compiled graph per batch size.

Decode is the steady state of serving, and in eager PyTorch a decode step of a small batch is
mostly host work: ~100 small ops per layer, each a Python call, a dispatch and (with several
threads) an OpenMP wake-up. Measured on the negligible-math config of bench/overhead.py, that was
0.5-0.9 ms per layer, where the arithmetic is microseconds.

`DecodeRunner` runs a stage's decode steps (every row one token, no prefix-cache snapshot) through
`JambaStage.decode`, a step whose shapes depend only on the batch size and which reads nothing
back to the host (the two data-dependent pieces are custom operators: stages/ops.py). Batches are
padded up to the next of a few sizes (1, 2, 4, 8, ... up to the stage's slots: vLLM's capture
sizes), the pad rows pointing at the cache's scratch slot and block (stages/cache.py). Per size:

    CPU   the step is compiled with torch.compile (inductor: C++ loops fusing the norms, the Mamba
          updates and the element-wise ops; the matmuls stay MKL calls), `fullgraph=True`, so a
          step is a few dozen calls instead of hundreds of ops. Compiled code is cached on disk
          (inductor's FX graph cache, under $JAMBA_KERNEL_CACHE/inductor: stages/warmup.py), so
          only the first start on a machine compiles.
    CUDA  the same compiled step is captured in a CUDA graph per size at warm-up, reading its
          inputs from static buffers, and a step is one graph replay (SGLang's CudaGraphRunner and
          vLLM's capture sizes do the same).

Both paths fill the same static input buffers (tokens or activations, slots, positions) and
return a view of the same output buffer, so the CPU path runs (and tests, tests/test_decode.py)
the code the GPU replays, up to the capture itself.

Prefill chunks, mixed batches, batches larger than the largest size, and steps that take Mamba
snapshots run eagerly through `JambaStage.forward`, as does everything when the mode is "eager":

    JAMBA_DECODE=compiled (default) | eager     read when a runner is made; `--enforce-eager`
                                                 (the CLI, PipelineConfig.enforce_eager) forces eager

Compiling takes seconds per size (tens the first time on a machine). A stage that starts with the
pipeline compiles before it reports ready (`warm_up`), so that the first requests run at full
speed. A stage that replaces a lost one must not keep every stream waiting that long: it reports
ready at once and compiles in a thread (`warm_up_in_background`), its decode steps running
eagerly, size by size, until each size is compiled. On CUDA every size runs eagerly until all are
compiled, and each size's graph is then captured at its first use, by the thread that serves: a
capture must not see another thread's kernels.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from .cache import HybridCache
from .model import JambaStage

log = logging.getLogger(__name__)

MODES = ("compiled", "eager")


def decode_mode(enforce_eager: bool = False) -> str:
    """The decode mode JAMBA_DECODE selects ("compiled" unless set), or "eager" when forced."""
    choice = os.environ.get("JAMBA_DECODE", "").strip().lower() or "compiled"
    if choice not in MODES:
        raise ValueError(f"JAMBA_DECODE={choice!r} is not one of {', '.join(MODES)}")
    return "eager" if enforce_eager else choice


def capture_sizes(max_batch: int) -> list[int]:
    """Powers of two below `max_batch`, then `max_batch`: a batch pads by less than 2x."""
    sizes, s = [], 1
    while s < max_batch:
        sizes.append(s)
        s *= 2
    return sizes + [max_batch]


class DecodeRunner:
    """Runs `stage.decode` at fixed batch sizes on `cache`; `__call__` takes one decode step."""

    def __init__(self, stage: JambaStage, cache: HybridCache, sizes: list[int] | None = None) -> None:
        """`sizes`: the batch sizes to compile (default: `capture_sizes(cache.num_slots)`)."""
        self.stage, self.cache = stage, cache
        p = next(stage.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.sizes = sorted(sizes) if sizes else capture_sizes(cache.num_slots)
        self.use_cuda_graphs = self.device.type == "cuda"
        # One compiled function; dynamo keeps a graph per size and per stage (a process running
        # several stages, as tests do, holds several): past its limit it would fall back to eager.
        limits = torch._dynamo.config
        limits.cache_size_limit = max(limits.cache_size_limit, 256)
        limits.accumulated_cache_size_limit = max(limits.accumulated_cache_size_limit, 1024)
        self.step = torch.compile(stage.decode, fullgraph=True, dynamic=False)
        # Static buffers of the largest size; size s uses their first s rows.
        n = self.sizes[-1]
        c = stage.config
        if stage.is_first:
            self.x = torch.zeros(n, dtype=torch.long, device=self.device)
        else:
            self.x = torch.zeros(n, c.hidden_size, dtype=self.dtype, device=self.device)
        self.slots = torch.full((n,), cache.pad_slot, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n, dtype=torch.long, device=self.device)
        self.outputs: dict[int, torch.Tensor] = {}  # per size: the output buffer (CUDA graphs) or the last output
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.compiled: set[int] = set()  # sizes compiled (and on CUDA, captured)
        self.traced: set[int] = set()  # sizes compiled by torch.compile (captured or not)
        self.background: threading.Thread | None = None  # compiling sizes while the stage serves
        self.compile_seconds: float | None = None  # how long compiling every size took, once done
        self.skip_guards = True

    def size_for(self, batch: int) -> int | None:
        """The size a batch of `batch` rows pads to; None when it is larger than all, or when that
        size is still being compiled in the background (the caller then runs the step eagerly)."""
        size = next((s for s in self.sizes if s >= batch), None)
        if size is not None and self.background is not None and (size not in self.traced or self.use_cuda_graphs):
            return None  # (on CUDA: no graph is captured while the other thread launches kernels)
        return size

    def warm_up(self) -> float:
        """Compile (or load from the disk cache) every size, and on CUDA capture its graph, before
        the stage serves; returns the seconds it took."""
        t0 = time.perf_counter()
        for s in self.sizes:
            self._prepare(s)
        self.compile_seconds = time.perf_counter() - t0
        log.info("decode step compiled for batch sizes %s in %.1fs (layers [%d, %d)%s)", self.sizes,
                 self.compile_seconds, self.stage.start, self.stage.end, ", CUDA graphs" if self.use_cuda_graphs else "")
        return self.compile_seconds

    def warm_up_in_background(self) -> threading.Thread:
        """Compile every size in a thread of its own, smallest first, and return it at once.
        Until a size is compiled, `size_for` does not offer it; a size that fails to compile is
        logged and never offered. On its own pad-row buffers: the serving thread's are in use.
        (The rows write only the cache's scratch slot and block, which no real row reads.)"""
        def compile_all() -> None:
            t0 = time.perf_counter()
            n = self.sizes[-1]
            x = torch.zeros_like(self.x)
            slots = torch.full((n,), self.cache.pad_slot, dtype=torch.long, device=self.device)
            positions = torch.zeros(n, dtype=torch.long, device=self.device)
            try:
                with torch.inference_mode():
                    for s in self.sizes:
                        self.step(x[:s], self.cache, slots[:s], positions[:s])
                        self.traced.add(s)
                        log.info("decode step compiled for batch size %d after %.1fs, in the background (layers "
                                 "[%d, %d)); steps of that size no longer run eagerly", s, time.perf_counter() - t0,
                                 self.stage.start, self.stage.end)
            except Exception:
                log.exception("compiling the decode step in the background failed; sizes %s stay eager",
                              [s for s in self.sizes if s not in self.traced])
                self.sizes = sorted(self.traced)
            self.compile_seconds = time.perf_counter() - t0
            self.background = None

        self.background = threading.Thread(target=compile_all, name="decode-compile", daemon=True)
        self.background.start()
        return self.background

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """One decode step: x (B,) token ids or (B, hidden) activations, one row per slot in `slots`.
        Returns (B, hidden), or (B, vocab) on the last stage."""
        B = len(slots)
        size = self.size_for(B)
        positions = self.cache.begin_decode(slots)
        self._prepare(size)
        self.x[:B].copy_(x)
        self.slots[:B].copy_(torch.tensor(slots, dtype=torch.long))
        self.positions[:B].copy_(torch.tensor(positions, dtype=torch.long))
        if size > B:  # the pad rows: the scratch slot at position 0 (their inputs are whatever was last there)
            self.slots[B:size].fill_(self.cache.pad_slot)
            self.positions[B:size].zero_()
        if self.use_cuda_graphs:
            self.graphs[size].replay()
            out = self.outputs[size][:B].clone()  # the graph's buffer is overwritten by the next replay
        else:
            out = self._run_warm(size)[:B]
        self.cache.commit_decode(slots)
        return out

    def _run(self, size: int) -> torch.Tensor:
        return self.step(self.x[:size], self.cache, self.slots[:size], self.positions[:size])

    def _run_warm(self, size: int) -> torch.Tensor:
        """`_run` once `size` is compiled: dynamo then need only tell the compiled graphs apart, not
        re-check the stage's parameters and the cache's tensors on every call (~0.2 ms a step,
        measured). If something its guards watch did change (another thread's torch settings,
        say), dynamo refuses to recompile under that stance: run with every guard from then on."""
        if self.skip_guards and self.background is None:  # (not while another thread compiles: the stance is global)
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._run(size)
            except RuntimeError as e:
                if "Recompilation triggered" not in str(e):
                    raise
                log.warning("the compiled decode step needs a new graph (%s); checking every guard from now on",
                            str(e).splitlines()[0])
                self.skip_guards = False
        return self._run(size)

    def _prepare(self, size: int) -> None:
        """Compile size `size` (a first call on the pad rows: scratch only) and capture its graph on CUDA."""
        if size in self.compiled:
            return
        with torch.inference_mode():
            saved = self.slots[:size].clone(), self.positions[:size].clone()
            self.slots[:size].fill_(self.cache.pad_slot)
            self.positions[:size].zero_()
            self._run(size)
            self.traced.add(size)
            if self.use_cuda_graphs:
                # Warm up on a side stream (as torch.cuda.graphs recommends), then capture.
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    self._run(size)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.outputs[size] = self._run(size)
                self.graphs[size] = graph
            self.slots[:size].copy_(saved[0])
            self.positions[:size].copy_(saved[1])
        self.compiled.add(size)

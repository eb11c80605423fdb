"""A synthetic, GPU-like pipeline stage for measuring the pipeline runtime itself (labelled as
such wherever it is used: it computes nothing).

    PipelineConfig(config_dir, num_stages=16, worker_cls="bench.synthetic:GpuLikeStage",
                   worker_kwargs={"fixed_ms": 32, "per_token_ms": 0.1, "num_stages": 16})

On a GPU node a stage's forward runs on the GPU while the host CPU waits, so what the host has to
do per microbatch is only the runtime's work: scheduling, transport, bookkeeping. This stage
reproduces that: it loads no weights and, per microbatch, *sleeps* (never spins, so the CPU stays
free for the runtime) for its share of a whole-model forward that costs
`fixed_ms + per_token_ms * tokens`: 1/num_stages of it, or, without `num_stages`, the fraction
of the model's layers it holds. It returns activations of the right shape (their values mean
nothing) and, on the last stage, valid answers: a fixed non-EOS token for sampled rows, log-prob
0 for scored positions, zero logits for classified rows. It needs only config.json in the model
folder (tokenizer files optional), so any config with at least P layers gives a P-stage pipeline.

`busy_seconds` in `info()` is the nominal compute time (the sleeps it was asked for), so busy
over wall time is how well the runtime keeps a GPU fed. `step_cpu_seconds` is the CPU its steps
used (their thread's clock: mostly waking from the sleep), which bench/pipeline.py takes from the
stage loop's CPU to leave the runtime's own.
"""

from __future__ import annotations

import os
import time

import torch

from stages.config import JambaConfig
from stages.microbatch import Answer, Microbatch, Row, Want


class GpuLikeStage:
    def __init__(self, model_dir: str, start: int, end: int, num_slots: int, max_seq_len: int,
                 threads: int | None = None, dtype: str | None = None, device: str = "cpu", *,
                 fixed_ms: float = 32.0, per_token_ms: float = 0.1, num_stages: int | None = None,
                 paging: dict | None = None, replacing: bool = False) -> None:
        t0 = time.perf_counter()
        config = JambaConfig.from_file(model_dir)
        L = config.num_hidden_layers
        self.share = 1 / num_stages if num_stages else (end - start) / L
        self.fixed_ms, self.per_token_ms = fixed_ms, per_token_ms
        self.is_last, self.hidden_size = end == L, config.hidden_size
        self.dtype, self.device = getattr(torch, dtype) if dtype else torch.float32, torch.device(device)
        not_a_token = set(config.eos_token_ids) | {config.pad_token_id}
        self.token = next(t for t in range(config.vocab_size) if t not in not_a_token)
        self.num_labels = config.num_labels if config.is_classifier else 0
        self.num_slots, self.slots = num_slots, set()
        self.load_info = {"layers": [start, end], "seconds": time.perf_counter() - t0, "bytes": 0, "files": 0,
                          "threads": torch.get_num_threads(), "pid": os.getpid(), "synthetic": True}
        self.busy_seconds = self.step_cpu_seconds = 0.0
        self.steps = 0

    @classmethod
    def load(cls, *args, **kwargs) -> "GpuLikeStage":
        """What the pipeline calls (stages/worker.py's contract): there is nothing to load."""
        return cls(*args, **kwargs)

    def info(self) -> dict:
        return dict(self.load_info, busy_seconds=self.busy_seconds, step_cpu_seconds=self.step_cpu_seconds,
                    steps=self.steps, used_slots=len(self.slots), num_slots=self.num_slots, rss_bytes=0)

    def step(self, mb: Microbatch, x: torch.Tensor) -> torch.Tensor | list[Answer]:
        cpu0 = time.thread_time()
        self.slots.difference_update(mb.free)
        self.slots.update(mb.alloc)
        rows = mb.rows
        tokens = mb.num_tokens
        wait = (self.fixed_ms + self.per_token_ms * tokens) * self.share / 1000 if rows else 0.0
        if wait:
            time.sleep(wait)
        self.busy_seconds += wait
        self.steps += 1
        if not self.is_last:
            out = torch.empty((tokens, self.hidden_size), dtype=self.dtype, device=self.device)
        else:
            out = [self._answer(r) for r in rows]
        self.step_cpu_seconds += time.thread_time() - cpu0
        return out

    def _answer(self, r: Row) -> Answer:
        if r.want == Want.TOKEN:
            return (self.token, 0.0)
        if r.want == Want.SCORES:
            return [None if t is None else 0.0 for t in r.targets]
        if r.want == Want.LOGITS:
            return [0.0] * self.num_labels
        return None


def write_config_only(config: JambaConfig, path) -> str:
    """A model folder with config.json alone: all GpuLikeStage needs."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return str(path)

"""One pipeline stage as a long-lived worker: its layers, its cache and, on the last stage, the
sampler. The scheduler's microbatches reach it in this process (cluster/runtime/local.py) or
through a Ray actor and the data plane (cluster/runtime/pipeline.py, stage_endpoint.py); it knows
neither.

Each `step` is one microbatch: its header (stages/microbatch.py says what it holds and what the
last stage answers) and one tensor, token ids into the first stage or activations between stages.
It returns the activations for the next stage, or on the last stage the answers, one per row.

What runs a worker needs only this of it, so another class can stand in (as
bench/synthetic.py:GpuLikeStage does, which sleeps instead of computing): a `load(model_dir,
start, end, num_slots, max_seq_len, threads, dtype, device, **kwargs)` class method (kwargs
include `replacing`: the stage replaces a lost one, so it should report ready as soon as it can serve), `step(mb,
x)`, `info()`, and the attributes `is_last`, `hidden_size`, `dtype` and `device` (what the
activations coming in look like).
"""

from __future__ import annotations

import os
import time

import torch

from .decode import DecodeRunner, decode_mode
from .loading import load_stage
from .microbatch import Answer, Microbatch, Want
from .model import JambaStage
from .sampling import sample
from .warmup import warm_up, warm_up_enabled


def _rss_bytes() -> int:
    """Resident memory of this process (Linux), for leak checks."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class StageWorker:
    def __init__(self, stage: JambaStage, num_slots: int, max_seq_len: int, paging: dict | None = None,
                 load_info: dict | None = None, enforce_eager: bool = False) -> None:
        """`paging`: block_size, num_blocks, num_snapshots of the cache (stages/cache.py); the
        scheduler hands out the blocks and snapshots. Decode steps run through a DecodeRunner
        (compiled, fixed shapes: stages/decode.py) unless `enforce_eager` or JAMBA_DECODE=eager."""
        self.stage = stage
        self.cache = stage.make_cache(num_slots, max_seq_len, manage_blocks=False, **(paging or {}))
        # (A classifier's rows are never decoded.)
        compiled = decode_mode(enforce_eager) == "compiled" and not stage.config.is_classifier
        self.decoder = DecodeRunner(stage, self.cache) if compiled else None
        p = next(stage.parameters())
        self.is_last, self.hidden_size = stage.is_last, stage.config.hidden_size
        self.dtype, self.device = p.dtype, p.device
        self.load_info = dict(load_info or {}, layers=[stage.start, stage.end], pid=os.getpid())
        self.busy_seconds = 0.0
        self.steps = 0

    @classmethod
    def load(cls, model_dir: str, start: int, end: int, num_slots: int, max_seq_len: int, threads: int | None = None,
             dtype: str | None = None, device: str = "cpu", quantize: str | None = None,
             paging: dict | None = None, enforce_eager: bool = False, replacing: bool = False) -> "StageWorker":
        """Load layers [start, end) of a checkpoint and compile their kernels and decode steps
        before reporting ready; `replacing` a lost stage, compile the decode steps while serving
        (stages/decode.py): the streams it rejoins are waiting."""
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        stage, stats = load_stage(model_dir, start, end, dtype=dtype, device=device, quantize=quantize)
        info = {"seconds": time.perf_counter() - t0, "bytes": stats.bytes_loaded, "files": len(stats.files_opened),
                "threads": torch.get_num_threads(), "quantize": quantize, "weight_bytes": stats.kept_bytes,
                "peak_load_bytes": stats.peak_bytes}
        worker = cls(stage, num_slots, max_seq_len, paging, info, enforce_eager)
        worker.warm_up(background=replacing)
        return worker

    def warm_up(self, background: bool = False) -> None:
        """Compile the stage's kernels and every size of its decode step now (from the on-disk
        caches after the first start), not inside the first requests (stages/warmup.py); with
        `background`, the decode steps in a thread while the stage serves."""
        self.load_info["warmup_seconds"] = warm_up(self.stage)
        self.warm_up_decode(background)

    def warm_up_decode(self, background: bool = False) -> None:
        """Compile every size of the decode step now, or in a thread (JAMBA_KERNEL_WARMUP=0: at first use)."""
        if self.decoder is None or not warm_up_enabled():
            return
        self.load_info["decode_warm_up"] = "background" if background else "before ready"
        if background:
            self.decoder.warm_up_in_background()
        else:
            self.decoder.warm_up()

    def info(self) -> dict:
        c, d = self.cache, self.decoder
        decode = {} if d is None else {"decode_compiling": d.background is not None,
                                       **({"decode_compile_seconds": d.compile_seconds} if d.compile_seconds else {})}
        return dict(self.load_info, **decode, busy_seconds=self.busy_seconds, steps=self.steps,
                    used_slots=c.used_slots, num_slots=c.num_slots, rss_bytes=_rss_bytes(), block_size=c.block_size,
                    num_blocks=c.num_blocks, num_snapshots=c.num_snapshots, cache_bytes=c.nbytes)

    def step(self, mb: Microbatch, x: torch.Tensor) -> torch.Tensor | list[Answer]:
        t0 = time.perf_counter()
        cache = self.cache
        for slot in mb.free:
            cache.free(slot)
        for slot in mb.alloc:
            cache.allocate(slot)
        for u in mb.blocks:
            cache.set_blocks(u.slot, u.index, u.blocks)
        for r in mb.restore:
            cache.restore(r.slot, r.snapshot, r.num_tokens)
        rows = mb.rows
        # A decode step (one token per row, no snapshot) of a size the decode runner holds goes through it.
        decode = (self.decoder is not None and rows and not mb.snapshots and all(r.num_tokens == 1 for r in rows)
                  and self.decoder.size_for(len(rows)) is not None)
        if not rows:
            out = [] if self.is_last else x
        elif decode:
            out = self.decoder(x, [r.slot for r in rows])  # (B, hidden), or (B, vocab): row k's output is k's
            if self.is_last:
                index = self._output_index(rows)  # for one-token rows: the rows that want something
                out = self._answers(rows, out if len(index) == len(rows) else out[index])
        else:
            out = self.stage(x, cache, [r.slot for r in rows], [r.num_tokens for r in rows],
                             output_index=None if not self.is_last else self._output_index(rows),
                             snapshots=mb.snapshots_by_row())
            if self.is_last:
                out = self._answers(rows, out)
        self.busy_seconds += time.perf_counter() - t0
        self.steps += 1
        return out

    @staticmethod
    def _output_index(rows) -> torch.Tensor:
        """The packed positions the rows want the head applied to, row by row: a TOKEN row its
        last token, a SCORES row every token, a LOGITS row its `position`."""
        index: list[int] = []
        base = 0
        for r in rows:
            if r.want == Want.TOKEN:
                index.append(base + r.num_tokens - 1)
            elif r.want == Want.SCORES:
                index.extend(range(base, base + r.num_tokens))
            elif r.want == Want.LOGITS:
                index.append(base + r.position)
            base += r.num_tokens
        return torch.tensor(index, dtype=torch.long)

    def _answers(self, rows, out: torch.Tensor) -> list[Answer]:
        """The last stage's answers from the head's output at `_output_index(rows)`."""
        spans, lo = [], 0
        for r in rows:
            n = r.num_tokens if r.want == Want.SCORES else 1 if r.want in (Want.TOKEN, Want.LOGITS) else 0
            spans.append((lo, lo + n))
            lo += n
        answers: list[Answer] = [None] * len(rows)
        drawing = [k for k, r in enumerate(rows) if r.want == Want.TOKEN]
        if drawing:
            tokens, logprobs, tops = sample(out[torch.tensor([spans[k][0] for k in drawing])],
                                            [rows[k].sampling for k in drawing])
            for k, t, lp, top in zip(drawing, tokens, logprobs, tops):
                answers[k] = (t, lp) if top is None else (t, lp, top)
        # Every scored position of every row in one log-softmax and one gather (not one read per token).
        scored = [(spans[k][0] + j, t) for k, r in enumerate(rows) if r.want == Want.SCORES
                  for j, t in enumerate(r.targets) if t is not None]
        if scored:
            positions, targets = zip(*scored)
            lp = torch.log_softmax(out[torch.tensor(positions)].float(), dim=-1)
            values = iter(lp[torch.arange(len(scored)), torch.tensor(targets)].tolist())
        for k, r in enumerate(rows):
            if r.want == Want.SCORES:
                answers[k] = [None if t is None else next(values) for t in r.targets]
            elif r.want == Want.LOGITS:
                answers[k] = out[spans[k][0]].float().tolist()
        return answers

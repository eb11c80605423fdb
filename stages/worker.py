"""One pipeline stage as a long-lived worker: its layers, its slot cache and, on the last stage,
the sampler. `cluster/pipeline.py` runs it in a Ray actor and `cluster/dataplane.py` feeds it;
nothing here knows about Ray or the transport.

Each `step` is one microbatch: the scheduler's header (msgpack on the wire, a dict here) plus one
tensor (token ids into the first stage, activations between stages). The header says which slots
to free and to allocate before the forward, and for each row its slot, its number of new tokens
and what the last stage should return for it:

    header = {"free": [slot, ...],
              "alloc": [slot, ...],
              "blocks": [[slot, index, block, block, ...], ...],   block table entries index.. of a slot
              "restore": [[slot, snapshot, n_tokens], ...],         start from a cached prefix
              "snapshots": [[row, offset, snapshot], ...],          Mamba states after that token
              "rows": [[slot, n_tokens, mode, arg], ...]}

(blocks, restore and snapshots are optional; stages/paging.py explains them.)

    mode "none"     arg None                        nothing (a prompt chunk that is not the last)
         "sample"   arg [temperature, top_k, top_p, seed, step]
                                                     one token sampled from the row's last position
         "score"    arg [target ids, length n]       log p(target j | tokens up to j) for each position
                                                     (a null target gives null)
         "classify" arg index in the row            the head's logits at that position

The last stage answers with msgpack: one entry per row, [token, logprob] / [logprobs] / [logits] / None.
Logits never leave the last stage; only these small answers travel back.

The data plane needs only this of a worker (so another class can stand in for it, as
`bench/synthetic.py:GpuLikeStage` does): `step(header, x)`, `info()`, and the attributes
`is_last`, `hidden_size`, `dtype` and `device` (what activations coming in look like).
"""

from __future__ import annotations

import os
import time

import msgpack
import torch

from .kernels.warmup import warm_up
from .loading import load_stage
from .sampling import SamplingParams, sample, token_generator


def _rss_bytes() -> int:
    """Resident memory of this process (Linux), for leak checks."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class StageWorker:
    def __init__(
        self,
        model_dir: str,
        start: int,
        end: int,
        num_slots: int,
        max_seq_len: int,
        threads: int | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        quantize: str | None = None,
        paging: dict | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.stage, stats = load_stage(model_dir, start, end, dtype=dtype, device=device, quantize=quantize)
        # The scheduler hands out blocks and snapshots (paging: block_size, num_blocks, num_snapshots).
        self.cache = self.stage.make_cache(num_slots, max_seq_len, manage_blocks=False, **(paging or {}))
        p = next(self.stage.parameters())
        self.is_last, self.hidden_size = self.stage.is_last, self.stage.config.hidden_size
        self.dtype, self.device = p.dtype, p.device
        self.load_info = {
            "layers": [start, end], "seconds": time.perf_counter() - t0, "bytes": stats.bytes_loaded,
            "files": len(stats.files_opened), "threads": torch.get_num_threads(), "pid": os.getpid(),
            "quantize": quantize, "weight_bytes": stats.kept_bytes, "peak_load_bytes": stats.peak_bytes,
        }
        self.busy_seconds = 0.0
        self.steps = 0
        self.load_info["warmup_seconds"] = warm_up(self.stage)  # compile kernels before reporting ready

    def info(self) -> dict:
        return dict(self.load_info, busy_seconds=self.busy_seconds, steps=self.steps,
                    used_slots=self.cache.used_slots, num_slots=self.cache.num_slots, rss_bytes=_rss_bytes(),
                    block_size=self.cache.block_size, num_blocks=self.cache.num_blocks,
                    num_snapshots=self.cache.num_snapshots, cache_bytes=self.cache.nbytes)

    def step(self, h: dict, x: torch.Tensor):
        t0 = time.perf_counter()
        for slot in h["free"]:
            self.cache.free(slot)
        for slot in h["alloc"]:
            self.cache.allocate(slot)
        for slot, index, *blocks in h.get("blocks", ()):
            self.cache.set_blocks(slot, index, blocks)
        for slot, snapshot, n in h.get("restore", ()):
            self.cache.restore(slot, snapshot, n)
        rows = h["rows"]
        snaps = None
        if h.get("snapshots"):
            snaps = [[] for _ in rows]
            for row, offset, snapshot in h["snapshots"]:
                snaps[row].append((offset, snapshot))
        if not rows:
            out = msgpack.packb([]) if self.is_last else x
        elif not self.is_last:
            out = self.stage(x, self.cache, [r[0] for r in rows], [r[1] for r in rows], snapshots=snaps)
        else:
            out = msgpack.packb(self._last_stage(x, rows, snaps))
        self.busy_seconds += time.perf_counter() - t0
        self.steps += 1
        return out

    def _last_stage(self, x: torch.Tensor, rows: list, snaps) -> list:
        # Which packed positions each row wants the head applied to.
        index, base, spans = [], 0, []
        for slot, n, mode, arg in rows:
            lo = len(index)
            if mode == "sample":
                index.append(base + n - 1)
            elif mode == "score":
                index.extend(range(base, base + n))
            elif mode == "classify":
                index.append(base + arg)
            spans.append((lo, len(index)))
            base += n
        out = self.stage(x, self.cache, [r[0] for r in rows], [r[1] for r in rows],
                         output_index=torch.tensor(index, dtype=torch.long), snapshots=snaps)
        results: list = [None] * len(rows)
        sampling = [(k, r) for k, r in enumerate(rows) if r[2] == "sample"]
        if sampling:
            params = [SamplingParams(temperature=r[3][0], top_k=r[3][1], top_p=r[3][2]) for _, r in sampling]
            gens = [token_generator(r[3][3], r[3][4]) for _, r in sampling]
            logits = out[torch.tensor([spans[k][0] for k, _ in sampling])]
            tokens, logprobs = sample(logits, params, gens)
            for (k, _), t, lp in zip(sampling, tokens, logprobs):
                results[k] = [t, lp]
        for k, (slot, n, mode, arg) in enumerate(rows):
            lo, hi = spans[k]
            if mode == "score":
                lp = torch.log_softmax(out[lo:hi].float(), dim=-1)
                results[k] = [None if t is None else lp[j, t].item() for j, t in enumerate(arg)]
            elif mode == "classify":
                results[k] = out[lo].float().tolist()
        return results

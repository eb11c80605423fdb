"""The engine in this process: one stage holding the whole model, driven by the same scheduler
as a Ray pipeline (scheduler.py), whose `send` calls the stage worker directly: no encoding, no
sockets, one microbatch at a time. This is the reference every distributed path (the Ray
pipeline, the gRPC and HTTP service, batch jobs) must match, and what `jamba generate|score|
classify` run without --stages.

    runner = LocalRunner(load_stage(model_dir)[0], Tokenizer.from_dir(model_dir))
    [result] = runner.generate([prompt_ids], [SamplingParams(max_new_tokens=32)])
"""

from __future__ import annotations

import asyncio
import weakref
from array import array

import torch

from stages.microbatch import Answer, Microbatch
from stages.model import JambaStage
from stages.worker import StageWorker

from .config import PipelineConfig, resolve_paging
from .engine import Engine, SyncEngine, new_scheduler
from .scheduler import Scheduler

# Offline work waits its turn rather than being refused, and takes bigger steps than serving does.
LOCAL_DEFAULTS = {"num_slots": 16, "max_batch_tokens": 2048, "max_queue": 1 << 30}


class LocalEngine(Engine):
    def __init__(self, worker: StageWorker, tokenizer, scheduler: Scheduler) -> None:
        super().__init__(worker.stage.config, tokenizer, scheduler)
        self.worker = worker

    @classmethod
    async def start(cls, stage: JambaStage, tokenizer, cfg: PipelineConfig) -> "LocalEngine":
        if not (stage.is_first and stage.is_last):
            raise ValueError("a local engine needs a stage that holds the whole model")
        paging = resolve_paging(cfg, stage.config)
        pools = {k: paging[k] for k in ("block_size", "num_blocks", "num_snapshots")}
        worker = StageWorker(stage, cfg.num_slots, paging["max_seq_len"], pools, enforce_eager=cfg.enforce_eager)
        worker.warm_up_decode()  # (the caller warmed the stage's kernels when it loaded it)

        async def send(mb: Microbatch, ids: array) -> list[Answer]:
            x = torch.frombuffer(ids, dtype=torch.long) if len(ids) else torch.empty(0, dtype=torch.long)
            return worker.step(mb, x)

        return cls(worker, tokenizer, new_scheduler(send, cfg, stage.config, paging, tokenizer, depth=1))


class LocalRunner(SyncEngine):
    """A local engine behind blocking, list-in list-out calls. `options` are PipelineConfig's
    (num_slots, max_batch_tokens, prefix_cache, block_size, num_blocks, ...), with the offline
    defaults of LOCAL_DEFAULTS. Its cache is allocated once, at the sizes a pipeline stage would
    have, and lives as long as the runner: prompts of later calls find earlier ones' prefixes.

    Its event loop runs in the calling thread, only while a call runs: the stage computes in the
    caller's thread, as a plain loop would (torch's and numba's OpenMP pools belong to the thread
    that starts them). So a call cannot come from a running event loop; async code uses
    `await LocalEngine.start(...)` instead."""

    def __init__(self, stage: JambaStage, tokenizer=None, **options) -> None:
        self.stage = stage
        cfg = PipelineConfig("", **{**LOCAL_DEFAULTS, **options})
        self.loop = asyncio.new_event_loop()
        # Whatever is left on the loop when the runner goes (a runner nobody closed) goes with it.
        self._finalizer = weakref.finalize(self, _close_loop, self.loop)

        async def start() -> LocalEngine:
            return await LocalEngine.start(stage, tokenizer, cfg)

        super().__init__(start)

    def _call(self, coro):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self.loop.run_until_complete(coro)
        coro.close()
        raise RuntimeError("LocalRunner's calls block: from a running event loop, use "
                           "`await LocalEngine.start(stage, tokenizer, config)` and its async methods")

    def close(self) -> None:
        if self._finalizer.alive:
            try:
                super().close()
            finally:
                self._finalizer()


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still on the loop (the scheduler's), let them end, close the loop."""
    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        loop.run_until_complete(cancel_all())
    except RuntimeError:  # dropped while some event loop runs in this thread: the tasks go with the loop
        pass
    loop.close()

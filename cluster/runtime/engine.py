"""The engine: the intake that checks requests (intake.py) and the scheduler that runs them
(scheduler.py), over whatever carries the microbatches: a Ray pipeline of stages (pipeline.py) or
a stage holding the whole model in this process (local.py). Both are an `Engine`.

The front ends (gRPC, OpenAI, rows) build requests with `engine.intake`, naming fields their own
way, and run them on `engine.scheduler`. The methods here are the Python API of the same path,
token ids in, with the intake's default field names. `SyncEngine` puts an engine behind a
blocking, list-in list-out interface (its event loop in a thread of its own), for the command
line's rows, batch jobs, tests and benchmarks.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

from stages.config import JambaConfig
from stages.paging import BlockManager
from stages.sequence import GenerationResult, SamplingParams

from .config import PipelineConfig
from .intake import ClassifyRequest, GenerateRequest, Intake, ScoreRequest
from .scheduler import Scheduler, Send, TokenEvent


class Engine:
    def __init__(self, config: JambaConfig, tokenizer, scheduler: Scheduler) -> None:
        self.config, self.tokenizer, self.scheduler = config, tokenizer, scheduler
        self.intake = Intake(config, tokenizer, scheduler.max_seq_len)

    @property
    def max_seq_len(self) -> int:
        """The longest prompt plus new tokens a request may have."""
        return self.scheduler.max_seq_len

    def generate(self, prompt: list[int], params: SamplingParams,
                 deadline: float | None = None) -> AsyncIterator[TokenEvent | GenerationResult]:
        return self.scheduler.generate(self.intake.generation(prompt, params), deadline)

    def generate_chunks(self, prompt: list[int], params: SamplingParams,
                        deadline: float | None = None) -> AsyncIterator[list[TokenEvent | GenerationResult]]:
        return self.scheduler.generate_chunks(self.intake.generation(prompt, params), deadline)

    async def generate_full(self, prompt: list[int], params: SamplingParams,
                            deadline: float | None = None) -> GenerationResult:
        return await self.scheduler.complete(self.intake.generation(prompt, params), deadline)

    async def score(self, prompt: list[int], deadline: float | None = None) -> list[float | None]:
        return await self.scheduler.score(self.intake.scoring(prompt), deadline)

    async def classify(self, prompt: list[int], deadline: float | None = None) -> list[float]:
        return await self.scheduler.classify(self.intake.classification(prompt), deadline)

    async def close(self) -> None:
        await self.scheduler.close()


def new_scheduler(send: Send, cfg: PipelineConfig, config: JambaConfig, paging: dict, tokenizer, depth: int,
                  recover: Callable[[], Awaitable[None]] | None = None) -> Scheduler:
    """The scheduler of an engine: `paging` is resolve_paging's, the stages' pools (config.py)."""
    # Prefix hashes are salted with what makes a cached block's content: the weights and their format.
    pages = BlockManager(paging["num_blocks"], paging["block_size"], paging["num_snapshots"],
                         prefix_cache=cfg.prefix_cache, salt=f"{cfg.model_dir}|{cfg.dtype}|{cfg.quantize}")
    return Scheduler(send, num_slots=cfg.num_slots, max_seq_len=paging["max_seq_len"], pages=pages,
                     eos_ids=config.eos_token_ids, tokenizer=tokenizer, max_batch_tokens=cfg.max_batch_tokens,
                     max_queue=cfg.max_queue, depth=depth, recover=recover, recover_timeout=cfg.recover_timeout_s)


class SyncEngine:
    """An engine behind blocking calls that take and return lists. Every request of a call is
    checked before any of them runs. `_call(coroutine)` runs a coroutine on the engine's event loop
    to its end: the subclasses say where that loop runs (local.py: in the calling thread;
    pipeline.py: a thread of its own). `close()` (or leaving a `with` block) stops the engine."""

    def __init__(self, start: Callable[[], Awaitable[Engine]]) -> None:
        self.engine = self._call(start())
        self.config, self.tokenizer = self.engine.config, self.engine.tokenizer
        self.max_seq_len = self.engine.max_seq_len

    def _call(self, coro):
        raise NotImplementedError

    def _gather(self, coros):
        async def all_of():
            return await asyncio.gather(*coros)
        return self._call(all_of())

    @property
    def intake(self) -> Intake:
        return self.engine.intake

    def run(self, requests: list[GenerateRequest | ScoreRequest | ClassifyRequest]) -> list:
        """Checked requests (from `intake`), all at once; their results in order: a
        GenerationResult, the token log-probabilities, or the logits."""
        scheduler = self.engine.scheduler

        def one(r):
            if isinstance(r, GenerateRequest):
                return scheduler.complete(r)
            return scheduler.score(r) if isinstance(r, ScoreRequest) else scheduler.classify(r)

        return self._gather([one(r) for r in requests])

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        return self.run([self.intake.generation(p, sp) for p, sp in zip(prompts, params)])

    def score(self, prompts: list[list[int]]) -> list[list[float | None]]:
        return self.run([self.intake.scoring(p) for p in prompts])

    def classify(self, prompts: list[list[int]]) -> list[list[float]]:
        return self.run([self.intake.classification(p) for p in prompts])

    def close(self) -> None:
        self._call(self.engine.close())

    def __enter__(self) -> "SyncEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

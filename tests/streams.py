"""Fault injection under live streams, shared by the recovery tests: start one stream per prompt
on a pipeline, inject a fault once every stream is well on its way, and collect what each
stream saw."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from cluster.runtime.pipeline import Pipeline
from stages.sequence import GenerationResult, SamplingParams, Structure


def stream_params(i: int) -> SamplingParams:
    """Stream i's parameters: odd streams greedy, even ones seeded sampling (which must also come
    out identical after a recovery); 40 tokens, never cut short by EOS. Every fourth stream also
    has penalties, a logit bias and top_logprobs, and the ones between are held to a grammar
    (whose matcher lives in the scheduler and must not be disturbed by the replay)."""
    if i % 2:
        return SamplingParams(max_new_tokens=40, ignore_eos=True)
    extra = {}
    if i % 4 == 0:
        extra = dict(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2, logit_bias={42: 2.0},
                     top_logprobs=2)
    else:
        extra = dict(structure=Structure("regex", "[a-z]+( [a-z]+)*"))
    return SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=100 + i, ignore_eos=True, **extra)


async def streams_through_a_fault(pipe: Pipeline, prompts: list[list[int]], params: list[SamplingParams],
                                  fault: Callable[[], None], tokens_before: int, timeout: float = 180,
                                  arrivals: list[list[float]] | None = None):
    """Returns (tokens, outcomes): the token ids each stream received, and per stream its
    GenerationResult or the exception that ended it. `fault()` runs once the streams have received
    `tokens_before` tokens in all. `arrivals`, if given, gets a list per stream of when
    (time.monotonic()) each token arrived."""
    tokens: list[list[int]] = [[] for _ in prompts]
    if arrivals is not None:
        arrivals[:] = [[] for _ in prompts]

    async def stream(i):
        async for ev in pipe.generate(prompts[i], params[i]):
            if isinstance(ev, GenerationResult):
                return ev
            tokens[i].append(ev.token_id)
            if arrivals is not None:
                arrivals[i].append(time.monotonic())
        raise AssertionError("the stream ended without a GenerationResult")

    tasks = [asyncio.ensure_future(stream(i)) for i in range(len(prompts))]
    while sum(map(len, tokens)) < tokens_before:
        await asyncio.sleep(0.01)
    fault()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=timeout)
    return tokens, outcomes


async def settle(pipe: Pipeline, timeout: float = 5) -> None:
    """Wait for the last frees, which ride on one more (empty) microbatch."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (pipe.scheduler.in_flight or pipe.scheduler.to_free) and loop.time() < end:
        await asyncio.sleep(0.05)

"""Stage failure recovery: a stage process killed mid-stream is restarted by Ray, the scheduler
replays every live request, and every stream completes token-identical to an undisturbed run.
The prompts share a prefix of several blocks, so the prefix cache is in use when the stage dies
and must be forgotten: the restarted stage's blocks and snapshots are empty."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from cluster.runtime.config import PipelineConfig
from cluster.runtime.local import LocalRunner
from cluster.runtime.pipeline import Pipeline
from stages.loading import load_stage
from stages.tokenizer import Tokenizer

from .streams import settle, stream_params, streams_through_a_fault


@pytest.fixture(scope="module")
def model(models):
    return models[0]


@pytest.mark.parametrize("victim", [0, 1])
def test_killed_stage_recovers_with_identical_streams(ray_cluster, model, victim):
    tok = Tokenizer.from_dir(model)
    shared = tok.encode("Every stream begins with the same long preamble, which the prefix cache keeps: " * 3)
    prompts = [shared + tok.encode(f"Stream number {i} says")[1:] for i in range(16)]
    want = LocalRunner(load_stage(model)[0], tok, prefix_cache=False).generate(prompts, [stream_params(i) for i in range(16)])

    async def run():
        pipe = await Pipeline.start(PipelineConfig(str(model), num_stages=2, layer_split="4,4", cpus_per_stage=0.25,
                                                   max_batch_tokens=64, block_size=16))
        try:
            pid = pipe.stage_info[victim]["pid"]
            tokens, finals = await streams_through_a_fault(
                pipe, prompts, [stream_params(i) for i in range(16)], lambda: os.kill(pid, signal.SIGKILL),
                tokens_before=16 * 8)  # every stream is live and well on its way
            await settle(pipe)
            return tokens, finals, pipe.scheduler.stats(), await pipe.stage_stats(), pid
        finally:
            await pipe.close()

    tokens, finals, stats, infos, pid = asyncio.run(run())
    assert stats["recoveries"] == 1
    assert stats["cache"]["cached_tokens"] >= 15 * 16  # the preamble was computed once, before and after
    assert infos[victim]["pid"] != pid  # a new process took the stage over
    for i, (got, fin, w) in enumerate(zip(tokens, finals, want)):
        assert not isinstance(fin, BaseException), fin
        assert got == fin.output_ids == w.output_ids, i  # no token lost, repeated or changed
    assert stats["slots_in_use"] == 0 and [i["used_slots"] for i in infos] == [0, 0]

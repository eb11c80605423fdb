"""Losing a whole node, on a simulated multi-node cluster (several raylets, each with its own
object store): the machine that holds a stage goes down (its Ray daemons and its processes)
while 16 streams are live. With a spare
node, Ray places the stage's bundle again, the actor restarts there and reloads its layers, the
scheduler replays, and every stream ends token-identical to an undisturbed run. Without one,
recovery is impossible: every request fails with a clear error once the recover timeout passes.

The head runs the driver only (no CPUs); each worker node holds at most one stage (STRICT_SPREAD).
GCS health checks are tightened so a dead node is noticed in about 2 s instead of about 15 s."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest
from ray.cluster_utils import Cluster

from cluster.runtime.config import PipelineConfig
from cluster.runtime.local import LocalRunner
from cluster.runtime.pipeline import Pipeline
from cluster.runtime.scheduler import SchedulerClosedError
from stages.loading import load_stage
from stages.sequence import SamplingParams
from stages.tokenizer import Tokenizer

from .harness import simulated_cluster
from .streams import settle, stream_params, streams_through_a_fault

FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                   "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster(3, FAST_NODE_DEATH) as c:
        yield c


@pytest.fixture(scope="module")
def model(models):
    return models[0]


def _config(model, **kw) -> PipelineConfig:
    return PipelineConfig(str(model), num_stages=2, layer_split="4,4", placement_strategy="STRICT_SPREAD",
                          cpus_per_stage=0.5, max_batch_tokens=64, **kw)


def _lose_node_of(cluster: Cluster, stage: dict) -> None:
    """The machine holding `stage` goes down: its raylet and object store, and its processes.
    (cluster_utils stops a node's Ray daemons, but a worker process can outlive its raylet for a
    while and keep answering its caller directly; a real machine takes it down with it.)"""
    [node] = [n for n in cluster.worker_nodes if n.node_id == stage["node_id"]]
    cluster.remove_node(node, allow_graceful=False)
    with contextlib.suppress(ProcessLookupError):
        os.kill(stage["pid"], signal.SIGKILL)


def test_removed_node_with_a_spare_recovers_identically(cluster, model):
    tok = Tokenizer.from_dir(model)
    prompts = [tok.encode(f"Node loss stream {i}") for i in range(16)]
    params = [stream_params(i) for i in range(16)]
    want = LocalRunner(load_stage(model)[0], tok).generate(prompts, params)

    async def run():
        pipe = await Pipeline.start(_config(model))
        try:
            before = [i["node_id"] for i in pipe.stage_info]
            tokens, finals = await streams_through_a_fault(
                pipe, prompts, params, lambda: _lose_node_of(cluster, pipe.stage_info[1]), tokens_before=16 * 8)
            await settle(pipe)
            after = [w["node_id"] for w in await asyncio.gather(*[a.where.remote() for a in pipe.actors])]
            return tokens, finals, pipe.scheduler.stats(), before, after
        finally:
            await pipe.close()

    tokens, finals, stats, before, after = asyncio.run(run())
    assert stats["recoveries"] == 1 and stats["slots_in_use"] == 0
    assert after[0] == before[0] and after[1] not in before  # stage 1 moved to the spare node
    for i, (got, fin, w) in enumerate(zip(tokens, finals, want)):
        assert not isinstance(fin, BaseException), fin
        assert got == fin.output_ids == w.output_ids, i


def test_removed_node_without_a_spare_fails_every_request_clearly(cluster, model):
    """Two worker nodes, one per stage: the lost stage has nowhere to go."""
    while len(cluster.worker_nodes) > 2:  # the first test removed one already, unless it ran alone
        cluster.remove_node(next(iter(cluster.worker_nodes)))
    tok = Tokenizer.from_dir(model)
    prompts = [tok.encode(f"Doomed stream {i}") for i in range(4)]
    params = [SamplingParams(max_new_tokens=200, ignore_eos=True) for _ in prompts]

    async def run():
        pipe = await Pipeline.start(_config(model, recover_timeout_s=15))
        try:
            _, outcomes = await streams_through_a_fault(pipe, prompts, params,
                                                        lambda: _lose_node_of(cluster, pipe.stage_info[0]),
                                                        tokens_before=8, timeout=120)
            with pytest.raises(SchedulerClosedError, match="not running"):
                await pipe.score(prompts[0])  # and new requests are refused at once
            return outcomes
        finally:
            await pipe.close()

    outcomes = asyncio.run(run())
    for o in outcomes:
        assert isinstance(o, SchedulerClosedError), o
        assert "could not be brought back: it was not back within 15s (no resources to restart it?)" in str(o)

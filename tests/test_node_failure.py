"""Losing a whole host while 16 streams are live: three worker hosts and a head, each in a network
namespace of its own (tests/hosts.py), and the host that holds a stage loses power (every process
in it killed at once: its raylet, its object store, the stage). With a spare host, Ray places the
stage's bundle again, the actor restarts there and reloads its layers, the scheduler replays, and
every stream ends token-identical to an undisturbed run. Without one, recovery is impossible: every
request fails with a clear error once the recover timeout passes.

The head has no CPUs (it and the driver's host hold no stage); each worker host holds at most one
stage (STRICT_SPREAD). GCS health checks are tightened so a dead node is noticed in about 2 s
instead of about 15 s."""

from __future__ import annotations

import asyncio

import pytest

from cluster.runtime.config import PipelineConfig
from cluster.runtime.local import LocalRunner
from cluster.runtime.pipeline import Pipeline
from cluster.runtime.scheduler import SchedulerClosedError
from stages.loading import load_stage
from stages.sequence import SamplingParams
from stages.tokenizer import Tokenizer

from .hosts import Hosts, hosts_or_skip
from .streams import settle, stream_params, streams_through_a_fault

FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                   "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}


@pytest.fixture(scope="module")
def hosts():
    with hosts_or_skip(cpus=(0, 1, 1, 1), system_config=FAST_NODE_DEATH) as h:
        yield h


@pytest.fixture(scope="module")
def model(models):
    return models[0]


def _config(model, **kw) -> PipelineConfig:
    options = dict(num_stages=2, layer_split="4,4", placement_strategy="STRICT_SPREAD", cpus_per_stage=0.5,
                   max_batch_tokens=64)
    return PipelineConfig(str(model), **{**options, **kw})


def _live_workers(hosts: Hosts) -> list[str]:
    return [name for name, h in hosts.hosts.items() if name != "head" and not h.down]


def test_lost_host_with_a_spare_recovers_identically(hosts, model):
    tok = Tokenizer.from_dir(model)
    prompts = [tok.encode(f"Node loss stream {i}") for i in range(16)]
    params = [stream_params(i) for i in range(16)]
    want = LocalRunner(load_stage(model)[0], tok).generate(prompts, params)

    async def run():
        pipe = await Pipeline.start(_config(model))
        try:
            before = [hosts.name_of(i["node_ip"]) for i in pipe.stage_info]
            tokens, finals = await streams_through_a_fault(
                pipe, prompts, params, lambda: hosts.power_off(hosts.name_of(pipe.stage_info[1]["node_ip"])),
                tokens_before=16 * 8)
            await settle(pipe)
            after = [hosts.name_of(w["node_ip"]) for w in await asyncio.gather(*[a.where.remote() for a in pipe.actors])]
            return tokens, finals, pipe.scheduler.stats(), before, after
        finally:
            await pipe.close()

    tokens, finals, stats, before, after = asyncio.run(run())
    assert stats["recoveries"] == 1 and stats["slots_in_use"] == 0
    assert after[0] == before[0] and after[1] not in before  # stage 1 moved to the spare host
    assert hosts[before[1]].down
    for i, (got, fin, w) in enumerate(zip(tokens, finals, want)):
        assert not isinstance(fin, BaseException), fin
        assert got == fin.output_ids == w.output_ids, i


def test_lost_host_without_a_spare_fails_every_request_clearly(hosts, model):
    """Two worker hosts, one per stage: the lost stage has nowhere to go."""
    while len(_live_workers(hosts)) > 2:  # the first test lost one already, unless it ran alone
        hosts.power_off(_live_workers(hosts)[0])
    tok = Tokenizer.from_dir(model)
    prompts = [tok.encode(f"Doomed stream {i}") for i in range(4)]
    params = [SamplingParams(max_new_tokens=200, ignore_eos=True) for _ in prompts]

    async def run():
        # A whole host's CPU a stage: the surviving host has no room for a replacement either (with
        # half a CPU a stage, a lost stage's replacement goes beside the other stage).
        pipe = await Pipeline.start(_config(model, recover_timeout_s=15, cpus_per_stage=1.0))
        try:
            _, outcomes = await streams_through_a_fault(pipe, prompts, params,
                                                        lambda: hosts.power_off(hosts.name_of(pipe.stage_info[0]["node_ip"])),
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

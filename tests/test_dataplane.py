"""The pipeline's data plane (cluster/dataplane.py): microbatches go stage to stage over its own
channels, with either activation transport giving the single-process results; the torch.distributed
path (gloo here, NCCL on GPUs) survives a stage being killed; the synthetic GPU-like stage runs
from a config-only folder; bad options are refused before anything is placed."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from bench.synthetic import GpuLikeStage, write_config_only
from cluster.runtime.config import PipelineConfig
from cluster.runtime.pipeline import Pipeline, SyncPipeline
from stages.config import JambaConfig
from stages.sequence import SamplingParams

from .streams import settle, stream_params, streams_through_a_fault

PROMPTS = ["The weather today is", "Cooking rice takes about twenty minutes if", "a", "Trains leave at noon"]


@pytest.mark.parametrize("transport", ["inline", "gloo"])
def test_both_transports_give_the_single_process_results(ray_cluster, models, reference, transport):
    lm, cls = models
    ref_lm, ref_cls, tok = reference
    prompts = [tok.encode(t) for t in PROMPTS]
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True) for _ in prompts]
    pipe = SyncPipeline(PipelineConfig(str(lm), num_stages=3, layer_split="2,3,3", cpus_per_stage=0.25,
                                       max_batch_tokens=5, transport=transport))  # prompts go in several chunks
    try:
        got = pipe.generate(prompts, params)
        scores = pipe.score(prompts)
        pipe._call(settle(pipe.pipe))
        stats = pipe._call(pipe.pipe.stage_stats())
        microbatches = pipe.pipe.scheduler.microbatches
    finally:
        pipe.close()
    assert [g.output_ids for g in got] == [w.output_ids for w in ref_lm.generate(prompts, params)]
    for s, w in zip(scores, ref_lm.score(prompts)):
        assert s[1:] == pytest.approx(w[1:], abs=1e-4)
    # Every microbatch reached every stage through its inbox: no stage was called per microbatch.
    assert [s["dataplane"]["microbatches"] for s in stats] == [microbatches] * 3
    pipe = SyncPipeline(PipelineConfig(str(cls), num_stages=2, cpus_per_stage=0.25, transport=transport))
    try:
        for g, w in zip(pipe.classify(prompts), ref_cls.classify(prompts)):
            assert g == pytest.approx(w, abs=1e-4)
    finally:
        pipe.close()


def test_gloo_transport_recovers_from_a_killed_stage(ray_cluster, models, reference):
    """The torch.distributed path (the one NCCL takes on GPUs): a middle stage is SIGKILLed under
    16 live streams; a new process group is formed around the restarted stage and every stream
    ends token-identical to an undisturbed run."""
    lm, _ = models
    ref_lm, _, tok = reference
    prompts = [tok.encode(f"Stream number {i} says") for i in range(16)]
    want = ref_lm.generate(prompts, [stream_params(i) for i in range(16)])

    async def run():
        pipe = await Pipeline.start(PipelineConfig(str(lm), num_stages=3, layer_split="2,3,3", cpus_per_stage=0.25,
                                                   max_batch_tokens=64, transport="gloo"))
        try:
            pid = pipe.stage_info[1]["pid"]
            epoch = pipe.dataplane.epoch
            tokens, finals = await streams_through_a_fault(
                pipe, prompts, [stream_params(i) for i in range(16)], lambda: os.kill(pid, signal.SIGKILL),
                tokens_before=16 * 8)
            await settle(pipe)
            return tokens, finals, pipe.scheduler.stats(), await pipe.stage_stats(), pid, epoch, pipe.dataplane.epoch
        finally:
            await pipe.close()

    tokens, finals, stats, infos, pid, epoch_before, epoch_after = asyncio.run(run())
    assert stats["recoveries"] == 1 and epoch_after > epoch_before
    assert infos[1]["pid"] != pid
    for i, (got, fin, w) in enumerate(zip(tokens, finals, want)):
        assert not isinstance(fin, BaseException), fin
        assert got == fin.output_ids == w.output_ids, i
    assert stats["slots_in_use"] == 0 and [i["used_slots"] for i in infos] == [0, 0, 0]


def test_gpu_like_stages_run_from_a_config_only_folder(ray_cluster, tmp_path):
    config = JambaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    folder = write_config_only(config, tmp_path / "config-only")
    assert sorted(os.listdir(folder)) == ["config.json"]
    kwargs = {"fixed_ms": 4.0, "per_token_ms": 0.5, "num_stages": 4}
    token = GpuLikeStage(folder, 0, 8, 1, 16, **kwargs).token
    assert token not in config.eos_token_ids

    async def run():
        pipe = await Pipeline.start(PipelineConfig(folder, num_stages=4, cpus_per_stage=0.25, num_slots=4,
                                                   worker_cls="bench.synthetic:GpuLikeStage", worker_kwargs=kwargs))
        try:
            outs = await asyncio.gather(*[pipe.generate_full([5] * (3 + i), SamplingParams(max_new_tokens=6,
                                                                                        ignore_eos=True))
                                          for i in range(6)])
            scores = await pipe.score([5, 6, 7])
            await settle(pipe)
            return outs, scores, await pipe.stage_stats(), pipe.scheduler.microbatches
        finally:
            await pipe.close()

    outs, scores, infos, microbatches = asyncio.run(run())
    assert [o.output_ids for o in outs] == [[token] * 6] * 6
    assert scores == [None, 0.0, 0.0]
    assert [i["steps"] for i in infos] == [microbatches] * 4
    assert all(i["synthetic"] and i["used_slots"] == 0 for i in infos)
    # The CPU accounting bench/pipeline.py reads: the step runs on the loop's thread, within its time.
    assert all(0 < i["step_cpu_seconds"] <= i["dataplane"]["loop_cpu_seconds"] for i in infos)
    # Nominal compute: each microbatch costs (4 ms + 0.5 ms per token) / 4 on every stage.
    assert infos[0]["busy_seconds"] == pytest.approx(infos[3]["busy_seconds"])
    assert infos[0]["busy_seconds"] >= (sum(3 + i for i in range(6)) * 0.5 + 4) / 4 / 1000


def test_messages_without_the_key_are_dropped(ray_cluster, models, reference):
    """The stages' sockets listen on the node's address: whatever reaches them without the
    epoch's key (garbage, a replayed frame, a forged microbatch) is dropped and counted, and the
    pipeline's answers are unchanged."""
    import socket

    import msgpack

    from cluster.runtime.channels import frame, parse_address

    lm, _ = models
    ref_lm, _, tok = reference
    prompts = [tok.encode(t) for t in PROMPTS]
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True) for _ in prompts]
    pipe = SyncPipeline(PipelineConfig(str(lm), num_stages=2, cpus_per_stage=0.25))
    try:
        forged = msgpack.packb({"free": [0, 1], "alloc": [], "rows": [[0, 1, "none", None]]})
        for address in pipe.pipe.dataplane.inboxes:
            with socket.create_connection(parse_address(address)) as sock:  # a forged microbatch
                sock.sendall(b"".join(frame(b"not the key 16 b", msgpack.packb([1, 0]), forged, bytes(8))))
            with socket.create_connection(parse_address(address)) as sock:  # garbage
                sock.sendall(b"garbage")
        got = pipe.generate(prompts, params)
        rejected = [s["dataplane"]["rejected"] for s in pipe._call(pipe.pipe.stage_stats())]
    finally:
        pipe.close()
    assert rejected == [2, 2]
    assert [g.output_ids for g in got] == [w.output_ids for w in ref_lm.generate(prompts, params)]


def test_strangers_stall_nothing(ray_cluster, models, reference):
    """Strangers at every socket of the data plane (both stages' inboxes, the scheduler's answer and
    heartbeat sockets): one sends a byte and waits, 200 more connect and say nothing. The answers are
    unchanged and come as fast (before, the one byte held a stage's loop for 30 s), and every
    stranger is dropped within its deadline and counted where it connected."""
    import socket

    from cluster.runtime.channels import UNTRUSTED_DEADLINE_S, parse_address

    lm, _ = models
    ref_lm, _, tok = reference
    prompts = [tok.encode(t) for t in PROMPTS]
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True) for _ in prompts]
    pipe = SyncPipeline(PipelineConfig(str(lm), num_stages=2, cpus_per_stage=0.25))
    strangers = []
    try:
        plane = pipe.pipe.dataplane
        pipe.generate(prompts, params)  # warm-up
        t0 = time.perf_counter()
        quiet = pipe.generate(prompts, params)
        quiet_s = time.perf_counter() - t0
        for address in [*plane.inboxes, plane.answer_address, plane.beat_address]:
            strangers.append(socket.create_connection(parse_address(address), timeout=10))
            strangers[-1].sendall(b"x")
            strangers += [socket.create_connection(parse_address(address), timeout=10) for _ in range(200)]
        time.sleep(0.2)  # the stage loops take the byte in
        t0 = time.perf_counter()
        besieged = pipe.generate(prompts, params)
        besieged_s = time.perf_counter() - t0
        give_up = time.monotonic() + UNTRUSTED_DEADLINE_S + 10
        while True:
            rejected = [s["dataplane"]["rejected"] for s in pipe._call(pipe.pipe.stage_stats())] + [plane.rejected]
            if rejected == [201, 201, 402] or time.monotonic() > give_up:
                break
            time.sleep(0.1)
    finally:
        for sock in strangers:
            sock.close()
        pipe.close()
    assert [g.output_ids for g in besieged] == [g.output_ids for g in quiet]
    assert [g.output_ids for g in quiet] == [w.output_ids for w in ref_lm.generate(prompts, params)]
    assert besieged_s < 1.2 * quiet_s + 2.0, (quiet_s, besieged_s)
    assert rejected == [201, 201, 402]


@pytest.mark.parametrize("option, message", [
    ({"worker_cls": "bench.synthetic:NoSuchStage"}, "cannot import worker class 'bench.synthetic:NoSuchStage'"),
    ({"transport": "carrier-pigeon"}, "unknown transport 'carrier-pigeon'"),
    ({"transport": "nccl"}, "nccl transport needs GPU stages"),
])
def test_bad_options_are_refused_before_placement(ray_cluster, models, option, message):
    with pytest.raises(ValueError, match=message):
        SyncPipeline(PipelineConfig(str(models[0]), num_stages=2, cpus_per_stage=0.25, **option))


def test_cpu_times_reads_a_process_and_a_thread_from_proc():
    from bench.stage_loop import cpu_times

    process0, thread0 = cpu_times("/proc/self/stat"), cpu_times(f"/proc/self/task/{threading.get_native_id()}/stat")
    cpu0 = time.thread_time()
    while time.thread_time() - cpu0 < 0.2:
        pass
    process1, thread1 = cpu_times("/proc/self/stat"), cpu_times(f"/proc/self/task/{threading.get_native_id()}/stat")
    used = sum(thread1) - sum(thread0)
    assert used == pytest.approx(time.thread_time() - cpu0, abs=0.05)
    assert sum(process1) - sum(process0) >= used - 0.02


def test_the_stage_loop_harness_counts_cpu_per_microbatch():
    """bench/stage_loop.py: a StageEndpoint outside Ray, fed one microbatch at a time."""
    from bench.stage_loop import measure

    for role in ("middle", "last"):
        r = measure(rows=2, microbatches=100, role=role, profile=False)
        assert 0 < r["cpu_us"] < 2 * r["round_trip_us"]  # within the wall time (read in two processes: slack)

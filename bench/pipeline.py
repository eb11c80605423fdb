"""Pipeline throughput, stage utilisation and transport overhead on Ray.

    .venv/bin/python bench/pipeline.py [--quick] [--gpu-like] [--real] [--transport] [--hosts]   (no flag: the first three)

1. --gpu-like: the runtime alone. Every stage is bench/synthetic.py:GpuLikeStage (synthetic: it
   sleeps its share of a GPU forward, 32 ms + 0.1 ms per token for the whole model, leaving the host
   CPU free, as a GPU stage would), from a config-only folder of the bench config with 16 layers.
   P = 1, 2, 4, 8, 16 stages, 32 concurrent requests, 16-token prompts, 48 new tokens each: tokens/s,
   the ratio to P=1, each stage's busy fraction (nominal compute over wall time), the overhead per
   hop ((microbatch latency - nominal compute) / (P + 1) hops), where the stage loops spent
   their time, and the CPU per microbatch of a stage: its loop thread outside the worker's step
   (the runtime's own: receive, header, send and the loop's wake-up), and its whole process
   (Ray's threads and the heartbeat too; the stages' own pids in /proc, this host only).
2. --real: real compute on the ~78M-parameter bench config (bench/model_vs_hf.py), 1 torch thread
   per stage: decode tokens/s and busy fractions for P=1 and P=2 at 1, 8, 32 and 64 concurrent.
3. --transport: per-hop cost for a decode-sized (32 x 512 fp32) and a prefill-sized (512 x 512 fp32)
   microbatch: chains of 4 and of 1 identity stages, (t4 - t1) / 3, through the pipeline's data
   plane (both activation transports) and, as baselines in the same run, plain Ray actor calls with
   object refs passed stage to stage (the pipeline's previous runtime) and a Ray Compiled Graph.
4. --hosts (root only; not part of the default): the same per-hop cost across hosts, on a Ray
   cluster of four hosts made of Linux network namespaces on a bridge (tests/hosts.py): a chain of 4
   with every stage on its own host (each hop crosses two veths and the bridge), one with all four
   stages on one host (its hops over loopback), and the chain of 1, measured side by side; beside the
   figures of section 3 from earlier in the same run (a one-node cluster on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, torn down at exit
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.openmp import use_openmp_env  # noqa: E402

use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from bench.model_vs_hf import BENCH_CONFIG  # noqa: E402
from bench.stage_loop import cpu_times  # noqa: E402
from bench.synthetic import write_config_only  # noqa: E402
from cluster.runtime.config import PipelineConfig  # noqa: E402
from cluster.runtime.pipeline import Pipeline  # noqa: E402
from stages.config import JambaConfig  # noqa: E402
from stages.demo import random_state  # noqa: E402
from stages.loading import save_checkpoint  # noqa: E402
from stages.microbatch import Microbatch, Row  # noqa: E402
from stages.sequence import SamplingParams  # noqa: E402

GPU_LIKE = {"fixed_ms": 32.0, "per_token_ms": 0.1}  # whole-model cost of one microbatch
SYNTHETIC = "bench.synthetic:GpuLikeStage"


async def generate_all(pipe: Pipeline, prompts: list[list[int]], new_tokens: int):
    """`new_tokens` for every prompt at once: (results, wall seconds, stage stats before, after)."""
    before = await pipe.stage_stats()
    t0 = time.perf_counter()
    res = await asyncio.gather(*[pipe.generate_full(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                                 for p in prompts])
    wall = time.perf_counter() - t0
    return res, wall, before, await pipe.stage_stats()


# ---- 1. the runtime alone: GPU-like stages ------------------------------------------------------
async def gpu_like_run(folder: str, stages: int, requests: int, new_tokens: int, transport: str) -> dict:
    cfg = PipelineConfig(folder, num_stages=stages, cpus_per_stage=0.1, num_slots=requests, transport=transport,
                         worker_cls=SYNTHETIC, worker_kwargs=dict(GPU_LIKE, num_stages=stages))
    pipe = await Pipeline.start(cfg)
    latencies: list[tuple[float, int]] = []
    send = pipe.scheduler.send

    async def timed_send(header, ids):  # microbatch latency, scheduler to answer
        t0 = time.perf_counter()
        answer = await send(header, ids)
        latencies.append((time.perf_counter() - t0, len(ids)))
        return answer

    pipe.scheduler.send = timed_send
    try:
        prompts = [[5 + i] * 16 for i in range(requests)]
        await asyncio.gather(*[pipe.generate_full(p, SamplingParams(max_new_tokens=4, ignore_eos=True)) for p in prompts])
        latencies.clear()
        cpu0 = [sum(cpu_times(f"/proc/{info['pid']}/stat")) for info in await pipe.stage_stats()]
        res, wall, before, after = await generate_all(pipe, prompts, new_tokens)
        cpu1 = [sum(cpu_times(f"/proc/{info['pid']}/stat")) for info in after]
    finally:
        await pipe.close()
    busy = [(a["busy_seconds"] - b["busy_seconds"]) / wall for a, b in zip(after, before)]
    steps = [a["dataplane"]["microbatches"] - b["dataplane"]["microbatches"] for a, b in zip(after, before)]
    loop_cpu = statistics.mean((a["dataplane"]["loop_cpu_seconds"] - b["dataplane"]["loop_cpu_seconds"]
                                - a["step_cpu_seconds"] + b["step_cpu_seconds"]) / n
                               for a, b, n in zip(after, before, steps))
    process = statistics.mean((c1 - c0) / n for c0, c1, n in zip(cpu0, cpu1, steps))
    loop = {k: sum(a["dataplane"][k] - b["dataplane"][k] for a, b in zip(after, before)) / stages / wall
            for k in ("idle_seconds", "receive_seconds", "step_seconds", "send_seconds")}
    nominal = lambda n: (GPU_LIKE["fixed_ms"] + GPU_LIKE["per_token_ms"] * n) / 1000  # noqa: E731
    hop = statistics.median(lat - nominal(n) for lat, n in latencies) / (stages + 1)
    tokens = sum(len(r.output_ids) for r in res)
    row = {"stages": stages, "tokens_per_s": tokens / wall, "busy": busy, "hop_ms": hop * 1000,
           "microbatches": len(latencies), "loop": loop, "loop_cpu_ms": loop_cpu * 1000,
           "process_cpu_ms": process * 1000}
    print(f"  GPU-like P={stages} ({transport}): {tokens / wall:.0f} tok/s, busy min {min(busy):.0%} "
          f"mean {statistics.mean(busy):.0%}, {hop * 1000:.2f} ms/hop, {len(latencies)} microbatches, "
          f"stage CPU per microbatch: loop outside the step {loop_cpu * 1000:.3f} ms, "
          f"process {process * 1000:.3f} ms", file=sys.stderr)
    return row


def print_gpu_like(rows: list[dict], transport: str, requests: int, new_tokens: int) -> None:
    print(f"\nGPU-like stages (synthetic: each sleeps its share of 32 ms + 0.1 ms/token per microbatch), "
          f"{requests} concurrent requests, 16-token prompts, {new_tokens} new tokens, activations over {transport}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| stages P | tokens/s | vs P=1 | stage busy min / mean / max | overhead per hop (ms) | "
          "stage loop: idle / receive / step / send | stage CPU per microbatch (ms): loop outside the step, process |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        b, lp = r["busy"], r["loop"]
        print(f"| {r['stages']} | {r['tokens_per_s']:.0f} | **{r['tokens_per_s'] / base:.2f}x** | "
              f"{min(b):.0%} / {statistics.mean(b):.0%} / {max(b):.0%} | {r['hop_ms']:.2f} | "
              f"{lp['idle_seconds']:.0%} / {lp['receive_seconds']:.0%} / {lp['step_seconds']:.0%} / {lp['send_seconds']:.0%} | "
              f"{r['loop_cpu_ms']:.3f}, {r['process_cpu_ms']:.3f} |")
    targets = {1: 0.90, 4: 0.85, 8: 0.80, 16: 0.70}
    for r in rows:
        if r["stages"] in targets:
            lo, want = min(r["busy"]), targets[r["stages"]]
            print(f"- target busy >= {want:.0%} at P={r['stages']}: lowest stage {lo:.0%}: {'met' if lo >= want else 'NOT met'}")
    last = rows[-1]
    ratio = last["tokens_per_s"] / base
    print(f"- target tokens/s at P={last['stages']} >= 0.7x P=1: {ratio:.2f}x: {'met' if ratio >= 0.7 else 'NOT met'}")


# ---- 2. real compute ----------------------------------------------------------------------------
def write_bench_model(path: Path) -> Path:
    config = JambaConfig(**BENCH_CONFIG)
    save_checkpoint(random_state(config, "lm"), config, path, max_shard_bytes=64 << 20)
    return path


async def decode_run(model: Path, stages: int, concurrency: list[int], new_tokens: int) -> list[dict]:
    split = None if stages == 1 else "4,4"
    pipe = await Pipeline.start(PipelineConfig(str(model), num_stages=stages, layer_split=split, threads_per_stage=1,
                                               num_slots=max(concurrency), max_batch_tokens=1024, max_seq_len=256))
    out = []
    try:
        g = torch.Generator().manual_seed(0)
        warm = [torch.randint(3, 8000, (16,), generator=g).tolist() for _ in range(4)]
        await asyncio.gather(*[pipe.generate_full(p, SamplingParams(max_new_tokens=8, ignore_eos=True)) for p in warm])
        for n in concurrency:
            prompts = [torch.randint(3, 8000, (16,), generator=g).tolist() for _ in range(n)]
            res, wall, before, after = await generate_all(pipe, prompts, new_tokens)
            busy = [(a["busy_seconds"] - b["busy_seconds"]) / wall for a, b in zip(after, before)]
            tokens = sum(len(r.output_ids) for r in res)
            out.append({"stages": stages, "concurrency": n, "tokens_per_s": tokens / wall, "busy": busy})
            print(f"  P={stages} n={n}: {tokens / wall:.0f} tok/s, busy {', '.join(f'{b:.0%}' for b in busy)}", file=sys.stderr)
    finally:
        await pipe.close()
    return out


def print_decode(results: dict, new_tokens: int) -> None:
    print(f"\nDecode throughput, bench config (one pipeline), {new_tokens} new tokens per request, "
          f"prompts of 16 tokens, 1 thread per stage, {os.cpu_count()} cores\n")
    print("| concurrent requests | P=1 tok/s | P=1 busy | P=2 tok/s | P=2 busy (stage 0, 1) | P=2 / P=1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(results[1], results[2]):
        print(f"| {a['concurrency']} | {a['tokens_per_s']:.0f} | {a['busy'][0]:.0%} | {b['tokens_per_s']:.0f} | "
              f"{', '.join(f'{x:.0%}' for x in b['busy'])} | **{b['tokens_per_s'] / a['tokens_per_s']:.2f}x** |")
    at32 = [(a, b) for a, b in zip(results[1], results[2]) if a["concurrency"] == 32][0]
    ratio = at32[1]["tokens_per_s"] / at32[0]["tokens_per_s"]
    print(f"\n- target P=2 no slower than P=1 at 32 concurrent: measured {ratio:.2f}x: {'met' if ratio >= 1.0 else 'NOT met'}")


# ---- 3. transport -------------------------------------------------------------------------------
SIZES = {"decode (32 x 512 fp32, 64 KiB)": 32, "prefill (512 x 512 fp32, 1 MiB)": 512}  # tokens; hidden 512


def identity_chain(folder: str, stages: int, transport: str, **kw) -> PipelineConfig:
    """A chain of identity stages (GpuLikeStage waiting 0 ms) on the pipeline's data plane."""
    return PipelineConfig(folder, num_stages=stages, cpus_per_stage=0.1, transport=transport, worker_cls=SYNTHETIC,
                          worker_kwargs={"fixed_ms": 0.0, "per_token_ms": 0.0}, **kw)


async def chain_times(chains: dict[str, PipelineConfig], reps: int) -> tuple[dict[str, dict[str, float]], dict]:
    """Seconds per microbatch through each chain, per size of SIZES: one microbatch at a time straight
    through the data plane's `send`, the chains up side by side and measured in alternating batches
    of 10, so that a burst of load elsewhere hits them all alike; the median batch. Also returns
    each chain's stage_info (where its stages ran)."""
    pipes = {}
    try:
        for name, cfg in chains.items():
            pipes[name] = await Pipeline.start(cfg)
        out: dict[str, dict[str, float]] = {name: {} for name in chains}
        for label, tokens in SIZES.items():
            rows = [Row(0, tokens)] if tokens > 32 else [Row(k, 1) for k in range(tokens)]
            header, ids = Microbatch(rows), array("q", [5] * tokens)
            batches: dict[str, list[float]] = {name: [] for name in chains}
            for _ in range(max(4, reps // 10)):
                for name, pipe in pipes.items():
                    for _ in range(2):
                        await pipe.dataplane.send(header, ids)
                    t0 = time.perf_counter()
                    for _ in range(10):
                        await pipe.dataplane.send(header, ids)
                    batches[name].append((time.perf_counter() - t0) / 10)
            for name in chains:
                out[name][label] = statistics.median(batches[name])
        return out, {name: pipe.stage_info for name, pipe in pipes.items()}
    finally:
        for pipe in pipes.values():
            await pipe.close()


async def dataplane_hops(folder: str, transport: str, reps: int) -> dict[str, float]:
    """Per hop (ms): the difference of a chain of 4 and a chain of 1 (chain_times) over 3."""
    times, _ = await chain_times({"1": identity_chain(folder, 1, transport), "4": identity_chain(folder, 4, transport)},
                                 reps)
    return {label: (times["4"][label] - times["1"][label]) / 3 * 1000 for label in SIZES}


@ray.remote(num_cpus=0.1)
class Hop:
    def fwd(self, x: torch.Tensor) -> torch.Tensor:
        return x


def ray_baseline_hops(reps: int) -> dict[str, dict[str, float]]:
    """The same measure through plain actor calls (object refs passed stage to stage, the pipeline's
    previous runtime) and a Ray Compiled Graph (decode size only: the 1 MiB case hangs in its CPU
    channels here)."""
    from ray.dag import InputNode

    hops = [Hop.remote() for _ in range(4)]
    ray.get([h.fwd.remote(torch.zeros(1)) for h in hops])
    out: dict[str, dict[str, float]] = {"Ray actor calls (before)": {}, "Ray Compiled Graph": {}}
    for label, tokens in SIZES.items():
        x = torch.randn(tokens, 512)
        for name in out:
            if name == "Ray Compiled Graph" and tokens > 32:
                out[name][label] = float("nan")
                continue
            times = {}
            for n in (1, 4):
                chain, close = hops[:n], None
                if name == "Ray Compiled Graph":
                    with InputNode() as inp:
                        node = inp
                        for h in chain:
                            node = h.fwd.bind(node)
                    dag = node.experimental_compile()
                    run, close = (lambda: ray.get(dag.execute(x), timeout=20)), dag.teardown  # noqa: E731
                else:
                    def run(chain=chain):
                        ref = x
                        for h in chain:
                            ref = h.fwd.remote(ref)
                        return ray.get(ref)
                try:
                    for _ in range(5):
                        run()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        run()
                    times[n] = (time.perf_counter() - t0) / reps
                except ray.exceptions.GetTimeoutError:
                    times[n] = float("nan")
                finally:
                    if close:
                        close()
            out[name][label] = (times[4] - times[1]) / 3 * 1000
    for h in hops:
        ray.kill(h)
    return out


def print_transport(rows: dict[str, dict[str, float]]) -> None:
    print("\nPer-hop transport (ms), identity stages, (4-stage chain - 1-stage chain) / 3, one microbatch at a time\n")
    print("| path | " + " | ".join(SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for name, per in rows.items():
        print(f"| {name} | " + " | ".join("n/a" if v != v else f"{v:.3f}" for v in per.values()) + " |")
    decode = next(iter(SIZES))
    best = min(v[decode] for k, v in rows.items() if k.startswith("data plane"))
    print(f"\n- target decode hop <= 0.3 ms: data plane {best:.3f} ms: {'met' if best <= 0.3 else 'NOT met'}")


# ---- 4. across hosts ------------------------------------------------------------------------------
TRANSPORTS = ("inline", "gloo")


async def hosts_hops(folder: str, transport: str, reps: int, hosts) -> dict[str, dict[str, float]]:
    """Per hop (ms) between stages on one host and between stages on different hosts: chains of 4
    placed STRICT_PACK and STRICT_SPREAD, less the chain of 1, over 3, all three measured side by
    side (chain_times). The driver is on a host of its own, so its hops to and from every chain
    cross the bridge alike and cancel out."""
    times, where = await chain_times({
        "1": identity_chain(folder, 1, transport),
        "same host": identity_chain(folder, 4, transport, placement_strategy="STRICT_PACK"),
        "across hosts": identity_chain(folder, 4, transport, placement_strategy="STRICT_SPREAD"),
    }, reps)
    placed = {name: [hosts.name_of(info["node_ip"]) for info in where[name]] for name in ("same host", "across hosts")}
    if len(set(placed["same host"])) != 1 or len(set(placed["across hosts"])) != 4:
        raise RuntimeError(f"the chains were not placed as intended: {placed}")
    print(f"  {transport}: stages on {placed}", file=sys.stderr)
    return {name: {label: (times[name][label] - times["1"][label]) / 3 * 1000 for label in SIZES} for name in placed}


def print_hosts(loopback: dict[str, dict[str, float]], across: dict[str, dict[str, dict[str, float]]]) -> None:
    print("\nPer-hop transport across hosts (ms): identity stages, (4-stage chain - 1-stage chain) / 3, one microbatch "
          "at a time. Hosts: Linux network namespaces, each with a veth pair on one bridge. The ratio is to the chain "
          "on one host (its hops over loopback), measured side by side with the chain across hosts; the one-node "
          f"cluster on 127.0.0.1 ran earlier in the same run; {os.cpu_count()} cores\n")
    print("| transport | stages | " + " | ".join(f"{label} | vs one host" for label in SIZES) + " |")
    print("|---|---|" + "---:|---:|" * len(SIZES))
    for t in TRANSPORTS:
        rows = {"one-node cluster on 127.0.0.1 (section 3)": loopback[t],
                "all on one host (loopback inside its namespace)": across[t]["same host"],
                "each on its own host (veth, bridge, veth)": across[t]["across hosts"]}
        base = across[t]["same host"]
        for name, per in rows.items():
            cells = [f"{per[label]:.3f} | {per[label] / base[label]:.2f}x" for label in SIZES]
            print(f"| {t} | {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    ap.add_argument("--gpu-like", action="store_true", help="section 1: GPU-like stages, P = 1..16")
    ap.add_argument("--real", action="store_true", help="section 2: real compute, P = 1 and 2")
    ap.add_argument("--transport", action="store_true", help="section 3: per-hop transport")
    ap.add_argument("--hosts", action="store_true", help="section 4: per-hop transport across network-namespace "
                                                         "hosts (root only)")
    ap.add_argument("--stages", default="1,2,4,8,16", help="P values for --gpu-like (default %(default)s)")
    ap.add_argument("--activations", default="inline", choices=["inline", "gloo"], help="transport for --gpu-like")
    args = ap.parse_args()
    sections = [k for k in ("gpu_like", "real", "transport", "hosts") if getattr(args, k)] or ["gpu_like", "real", "transport"]
    stages = [int(p) for p in args.stages.split(",")]
    new_tokens = 16 if args.quick else 48
    reps = 50 if args.quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_config_only(JambaConfig(**dict(BENCH_CONFIG, num_hidden_layers=16)), Path(tmp) / "config-only")
        # GPU-like stages ask Ray for 0.1 CPU each: what they need of the host is the runtime's share.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        try:
            if "gpu_like" in sections:
                rows = [asyncio.run(gpu_like_run(folder, p, 32, new_tokens, args.activations)) for p in stages]
                print_gpu_like(rows, args.activations, 32, new_tokens)
            if "real" in sections:
                model = write_bench_model(Path(tmp) / "bench")
                results = {p: asyncio.run(decode_run(model, p, [1, 8, 32, 64], 16 if args.quick else 32)) for p in (1, 2)}
                print_decode(results, 16 if args.quick else 32)
            if "transport" in sections or "hosts" in sections:
                loopback = {t: asyncio.run(dataplane_hops(folder, t, reps)) for t in TRANSPORTS}
            if "transport" in sections:
                rows = {f"data plane, {t}": loopback[t] for t in TRANSPORTS}
                rows.update(ray_baseline_hops(reps))
                print_transport(rows)
        finally:
            ray.shutdown()
        if "hosts" in sections:
            from tests.hosts import namespace_hosts

            with namespace_hosts(cpus=(1, 1, 1, 1)) as hosts:  # head, host1..3; the driver on a host of its own
                across = {t: asyncio.run(hosts_hops(folder, t, reps, hosts)) for t in TRANSPORTS}
            print_hosts(loopback, across)


if __name__ == "__main__":
    main()

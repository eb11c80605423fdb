"""Strangers at the data plane's sockets: stream latency with and without them (issue 23, item 4).

    .venv/bin/python bench/strangers.py [--streams 8] [--new-tokens 64] [--rounds 3]

A 2-stage pipeline of the bench config on a one-node Ray cluster (loopback). Each round runs the
same greedy streams twice, quiet and besieged, in alternating order. Besieged: at every socket
the data plane listens on (both stages' inboxes, the scheduler's answer and heartbeat sockets),
before the streams start,

    one byte          a connection that sends one byte and then nothing
    huge length       a prefix with a wrong key and a 2 GiB length
    short body        a prefix with a wrong key and a 1 KiB length, then 100 bytes and nothing
    idle              200 connections that say nothing

and while they run, a thread that opens a connection to one of the sockets every 20 ms and sends
one byte (before issue 23, one byte every 30 s from anything that could reach a stage's port
stopped it serving). Reports, per condition: wall time, the inter-token latency (p50, p99) and
the longest pause a stream saw; whether every stream's tokens are the quiet run's; and how many
connections each socket refused (`rejected`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, torn down at exit
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.openmp import use_openmp_env  # noqa: E402

use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)

import ray  # noqa: E402
import torch  # noqa: E402

from bench.pipeline import write_bench_model  # noqa: E402
from cluster.runtime.channels import PREFIX, parse_address  # noqa: E402
from cluster.runtime.config import PipelineConfig  # noqa: E402
from cluster.runtime.pipeline import Pipeline  # noqa: E402
from stages.sequence import GenerationResult, SamplingParams  # noqa: E402

WRONG_KEY = b"\x00" * 16
IDLE_PER_SOCKET = 200
TRICKLE_EVERY_S = 0.02


def listening_sockets(pipe: Pipeline) -> list[tuple[str, int]]:
    plane = pipe.dataplane
    return [parse_address(a) for a in [*plane.inboxes, plane.answer_address, plane.beat_address]]


def lay_siege(addresses: list[tuple[str, int]]) -> list[socket.socket]:
    """The standing strangers at every address; the caller closes them."""
    held = []
    for address in addresses:
        for opening in (b"x", PREFIX.pack(WRONG_KEY, 8, 8, (1 << 31) + 5),
                        PREFIX.pack(WRONG_KEY, 8, 8, 1008) + b"y" * 100):
            held.append(socket.create_connection(address, timeout=10))
            held[-1].sendall(opening)
        held += [socket.create_connection(address, timeout=10) for _ in range(IDLE_PER_SOCKET)]
    return held


def trickle(addresses: list[tuple[str, int]], stop: threading.Event) -> int:
    """A new one-byte stranger every TRICKLE_EVERY_S, round the addresses, until `stop`; returns how many."""
    n = 0
    while not stop.wait(TRICKLE_EVERY_S):
        try:
            with socket.create_connection(addresses[n % len(addresses)], timeout=1) as s:
                s.sendall(b"x")
        except OSError:
            pass
        n += 1
    return n


async def streams(pipe: Pipeline, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[list[float]], float]:
    arrivals: list[list[float]] = [[] for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        arrivals[i].append(time.perf_counter())
        async for ev in pipe.generate(prompts[i], SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
            if not isinstance(ev, GenerationResult):
                arrivals[i].append(time.perf_counter())
                outputs[i].append(ev.token_id)

    t0 = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(len(prompts))])
    return outputs, arrivals, time.perf_counter() - t0


async def rejected(pipe: Pipeline) -> list[int]:
    """Connections refused so far: each stage's inbox, then the scheduler's two sockets."""
    return [s["dataplane"]["rejected"] for s in await pipe.stage_stats()] + [pipe.dataplane.rejected]


async def run(model: Path, n_streams: int, new_tokens: int, rounds: int) -> dict:
    pipe = await Pipeline.start(PipelineConfig(str(model), num_stages=2, layer_split="4,4", cpus_per_stage=0.5,
                                               num_slots=n_streams, max_seq_len=256))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8000, (24,), generator=g).tolist() for _ in range(n_streams)]
    results: dict[str, list] = {"quiet": [], "besieged": []}
    reference = None
    trickled = 0
    try:
        await streams(pipe, prompts, 8)  # warm-up
        addresses = listening_sockets(pipe)
        for r in range(rounds):
            for condition in (["quiet", "besieged"] if r % 2 == 0 else ["besieged", "quiet"]):
                held, stop, counter = [], threading.Event(), None
                if condition == "besieged":
                    held = await asyncio.to_thread(lay_siege, addresses)  # (this loop accepts on two of them)
                    counter = asyncio.get_running_loop().run_in_executor(None, trickle, addresses, stop)
                    await asyncio.sleep(0.2)  # the loops have taken the first bytes in
                try:
                    outputs, arrivals, wall = await streams(pipe, prompts, new_tokens)
                finally:
                    stop.set()
                    for s in held:
                        s.close()
                if counter is not None:
                    trickled += await counter
                reference = reference or outputs
                gaps = [b - a for ts in arrivals for a, b in zip(ts[1:], ts[2:])]  # between tokens, not the first
                results[condition].append({"wall": wall, "itl": gaps, "identical": outputs == reference,
                                           "pause": max(gaps)})
                print(f"  round {r + 1} {condition}: {wall:.2f}s, ITL p50 {statistics.median(gaps) * 1e3:.1f} ms, "
                      f"longest pause {max(gaps) * 1e3:.0f} ms", flush=True)
        await asyncio.sleep(3)  # the last standing strangers reach their deadline
        refused = await rejected(pipe)
    finally:
        await pipe.close()
    return {"results": results, "rejected": refused, "trickled": trickled, "sockets": len(addresses)}


def summary(runs: list[dict]) -> dict:
    itl = sorted(g for r in runs for g in r["itl"])
    return {"wall": statistics.median(r["wall"] for r in runs), "p50": itl[len(itl) // 2],
            "p99": itl[int(len(itl) * 0.99)], "pause": max(r["pause"] for r in runs),
            "identical": all(r["identical"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="pairs of quiet and besieged runs, alternating in order")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = write_bench_model(Path(tmp) / "bench")
            out = asyncio.run(run(model, args.streams, args.new_tokens, args.rounds))
    finally:
        ray.shutdown()
    quiet, besieged = summary(out["results"]["quiet"]), summary(out["results"]["besieged"])
    standing = 3 + IDLE_PER_SOCKET
    print(f"\nStrangers at the data plane, bench config, 2 stages on one node (loopback), {args.streams} greedy "
          f"streams of {args.new_tokens} tokens, {args.rounds} rounds of quiet and besieged runs in alternating "
          f"order (medians of wall time; latencies over every token of every run)\n")
    print("| condition | wall s | ITL p50 ms | ITL p99 ms | longest pause ms | tokens as the quiet run's |")
    print("|---|---:|---:|---:|---:|---|")
    for name, s in (("quiet", quiet), ("besieged", besieged)):
        print(f"| {name} | {s['wall']:.2f} | {s['p50'] * 1e3:.1f} | {s['p99'] * 1e3:.1f} | {s['pause'] * 1e3:.0f} | "
              f"{'yes' if s['identical'] else 'NO'} |")
    ratio = {k: besieged[k] / quiet[k] for k in ("wall", "p50", "p99")}
    print(f"| besieged / quiet | {ratio['wall']:.2f}x | {ratio['p50']:.2f}x | {ratio['p99']:.2f}x | | |")
    print(f"\n- strangers: {standing} standing per socket and round at {out['sockets']} sockets, plus "
          f"{out['trickled']} one-byte connections trickled in during the besieged runs")
    print(f"- refused (`rejected`: stage 0 inbox, stage 1 inbox, the scheduler's answer and heartbeat sockets "
          f"together): {out['rejected']}")
    met = ratio["p50"] <= 1.2 and ratio["wall"] <= 1.2 and besieged["identical"]
    print(f"- target (issue 23): stream latency within 1.2x of undisturbed, nothing lost: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()

"""Paged KV cache and prefix caching (issue 16), on the bench config, all in one run.

    .venv/bin/python bench/prefix.py [--requests 32] [--system 2048] [--question 32] [--baseline-ref REF]

1. Shared prefix: `--requests` requests arrive together, each a `--system`-token system prompt
   plus its own `--question`-token question, through a 2-stage pipeline (1 thread per stage),
   greedy, 8 new tokens each: TTFT p50 / p99, and the prompt tokens the stages computed, with
   the prefix cache and without (--no-prefix-cache); the outputs must be identical.
2. Memory: at max_seq_len 64K, how many 512-token sequences fit beside one 65,536-token
   sequence in the cache memory that today's contiguous slots would take for 8 sequences;
   counted with the real allocators (a HybridCache allocated at that size, blocks taken by
   the BlockManager as the scheduler takes them), no forward passes.
3. Decode: tokens/s of batched decode steps (batch 8 and 32, 512-token contexts) through a
   full-model stage, in this tree and in a git worktree of --baseline-ref (the last commit
   before paging): two live processes that take turns, burst by burst, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, torn down at exit
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.openmp import use_openmp_env  # noqa: E402

use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
import torch  # noqa: E402

from bench.model_vs_hf import BENCH_CONFIG  # noqa: E402
from bench.pipeline import write_bench_model  # noqa: E402
from cluster.runtime.config import PipelineConfig  # noqa: E402
from cluster.runtime.pipeline import Pipeline  # noqa: E402
from stages.cache import HybridCache  # noqa: E402
from stages.config import JambaConfig  # noqa: E402
from stages.costs import block_bytes, slot_bytes, snapshot_bytes  # noqa: E402
from stages.paging import BlockManager, blocks_for  # noqa: E402
from stages.sequence import GenerationResult, SamplingParams  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# ---- 1. shared prefix ---------------------------------------------------------------------------
async def shared_prefix(model: Path, requests: int, system: int, question: int, prefix_cache: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    sys_ids = torch.randint(3, 8000, (system,), generator=g).tolist()
    prompts = [sys_ids + torch.randint(3, 8000, (question,), generator=g).tolist() for _ in range(requests)]
    pipe = await Pipeline.start(PipelineConfig(str(model), num_stages=2, layer_split="4,4", cpus_per_stage=1,
                                               num_slots=requests, max_batch_tokens=512, max_seq_len=4096,
                                               prefix_cache=prefix_cache))
    try:
        await pipe.generate_full(torch.randint(3, 8000, (80,), generator=g).tolist(), SamplingParams(max_new_tokens=2))
        before = pipe.scheduler.stats()["prefill_tokens"]
        t0 = time.perf_counter()
        ttft, outputs, cached = [0.0] * requests, [None] * requests, [0] * requests

        async def one(i):
            async for ev in pipe.generate(prompts[i], SamplingParams(max_new_tokens=8, ignore_eos=True)):
                if isinstance(ev, GenerationResult):
                    outputs[i], cached[i] = ev.output_ids, ev.cached_tokens
                elif not ttft[i]:
                    ttft[i] = time.perf_counter() - t0
        await asyncio.gather(*[one(i) for i in range(requests)])
        wall = time.perf_counter() - t0
        stats = pipe.scheduler.stats()
    finally:
        await pipe.close()
    return {"prefix_cache": prefix_cache, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "wall": wall,
            "prefill_tokens": stats["prefill_tokens"] - before, "cached_tokens": sum(cached), "outputs": outputs}


# ---- 2. memory ------------------------------------------------------------------------------------
def memory(long_len: int = 65536, short_len: int = 512, slots_today: int = 8, block_size: int = 64,
           snapshots: int = 16) -> dict:
    config = JambaConfig(**dict(BENCH_CONFIG, max_position_embeddings=long_len))
    layers = range(config.num_hidden_layers)
    budget = slots_today * slot_bytes(config, layers, long_len, 4)  # contiguous slots, fp32
    per_block = block_bytes(config, layers, block_size, 4)
    per_slot = snapshot_bytes(config, layers, 4)  # a slot's Mamba state = one snapshot's
    # Paged: as many slots as sequences; blocks fill the rest of the same memory.
    best = 0
    for n_short in range(1, 100_000):
        slots = 1 + n_short
        blocks = blocks_for(long_len, block_size) + n_short * blocks_for(short_len, block_size)
        if (slots + snapshots) * per_slot + blocks * per_block > budget:
            break
        best = n_short
    slots = best + 1
    num_blocks = (budget - (slots + snapshots) * per_slot) // per_block
    cache = HybridCache(config, layers, slots, long_len, block_size=block_size, num_blocks=num_blocks,
                        num_snapshots=snapshots, manage_blocks=False)
    assert cache.nbytes <= budget, (cache.nbytes, budget)
    pages = BlockManager(num_blocks, block_size, snapshots)
    admitted = 0
    long_seq = pages.new_sequence([5] * long_len)
    pages.admit(long_seq, long_len - 1)
    cache.allocate(0)
    cache.set_blocks(0, 0, pages.grow(long_seq, long_len))
    for i in range(1, slots):
        seq = pages.new_sequence([7 + i] * short_len)
        pages.admit(seq, short_len - 1)
        if not pages.can_grow(seq, short_len):
            break
        cache.allocate(i)
        cache.set_blocks(i, 0, pages.grow(seq, short_len))
        admitted += 1
    return {"budget_bytes": budget, "cache_bytes": cache.nbytes, "contiguous_short": slots_today - 1,
            "paged_short": admitted, "block_size": block_size, "snapshots": snapshots, "slots": slots,
            "num_blocks": num_blocks}


# ---- 3. decode, this tree against a baseline ------------------------------------------------------
# One worker process per tree, both alive for the whole measurement: the parent has them run
# bursts of decode steps in turn, so the drift of this noisy machine falls on both alike.
DECODE_WORKER = r"""
import sys, time, torch
from stages.loading import load_stage
torch.set_num_threads(int(sys.argv[4]))
model, batch, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stage = load_stage(model)[0]
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, 8000, (ctx,), generator=g).tolist() for _ in range(batch)]
cache = stage.make_cache(batch, ctx + 4096)
slots = [cache.allocate() for _ in prompts]
for s, p in zip(slots, prompts):
    stage(torch.tensor(p), cache, [s], [len(p)])
tok = torch.randint(3, 8000, (batch,), generator=g)
for line in sys.stdin:
    steps = int(line)
    for s in slots:  # decode at the same context every burst
        cache.lengths[s] = ctx
    t0 = time.perf_counter()
    for _ in range(steps):
        stage(tok, cache, slots, [1] * batch)
    print(time.perf_counter() - t0, flush=True)
"""


def decode(model: Path, baseline: Path, batches: list[int], ctx: int, rounds: int, steps: int = 8,
           threads: int = 2) -> list[dict]:
    rows = []
    for batch in batches:
        procs = {}
        for name, tree in (("baseline", baseline), ("paged", REPO)):
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", DECODE_WORKER, str(model), str(batch), str(ctx), str(threads)],
                cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True)
        seconds = {name: [] for name in procs}
        try:
            for r in range(rounds + 1):  # round 0 warms both up
                for name, proc in procs.items():
                    proc.stdin.write(f"{steps}\n")
                    proc.stdin.flush()
                    took = float(proc.stdout.readline())
                    if r:
                        seconds[name].append(took)
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait(timeout=60)
        tps = {name: [batch * steps / t for t in ts] for name, ts in seconds.items()}
        ratios = [p / b for p, b in zip(tps["paged"], tps["baseline"])]  # burst by burst, side by side
        rows.append({"batch": batch, "baseline": statistics.median(tps["baseline"]),
                     "paged": statistics.median(tps["paged"]), "ratio": statistics.median(ratios),
                     "ratio_q1": pct(ratios, 0.25), "ratio_q3": pct(ratios, 0.75)})
        print(f"  decode batch {batch}: {rows[-1]}", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system", type=int, default=2048)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--baseline-ref", default="b7be7d2", help="commit of the contiguous cache (before paging)")
    ap.add_argument("--rounds", type=int, default=40, help="bursts of decode steps per tree and batch size")
    ap.add_argument("--batch", type=int, action="append", default=None, help="decode batch sizes (default 8 and 32)")
    ap.add_argument("--skip", action="append", default=[], choices=["prefix", "memory", "decode"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_bench_model(Path(tmp) / "bench")
        if "prefix" not in args.skip:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
            try:
                off = asyncio.run(shared_prefix(model, args.requests, args.system, args.question, False))
                on = asyncio.run(shared_prefix(model, args.requests, args.system, args.question, True))
            finally:
                ray.shutdown()
            same = off["outputs"] == on["outputs"]
            print(f"\n### Shared {args.system}-token system prompt, {args.requests} requests of +{args.question} tokens "
                  f"(2 stages, greedy, 8 new tokens)\n")
            print("| prefix cache | TTFT p50 s | TTFT p99 s | wall s | prompt tokens computed | cached tokens |")
            print("|---|---:|---:|---:|---:|---:|")
            for r in (off, on):
                print(f"| {'on' if r['prefix_cache'] else 'off'} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
                      f"{r['wall']:.1f} | {r['prefill_tokens']} | {r['cached_tokens']} |")
            print(f"\nTTFT p50 {off['ttft_p50'] / on['ttft_p50']:.1f}x lower, p99 {off['ttft_p99'] / on['ttft_p99']:.1f}x "
                  f"lower; {off['prefill_tokens'] / max(1, on['prefill_tokens']):.1f}x fewer prompt tokens computed; "
                  f"outputs identical: {same}")
        if "memory" not in args.skip:
            m = memory()
            print(f"\n### Memory at max_seq_len 65536 (bench config, fp32 cache, {m['budget_bytes'] / 2**30:.2f} GiB: "
                  f"8 contiguous slots)\n")
            print("| cache | sequences of 512 tokens beside one of 65,536 |")
            print("|---|---:|")
            print(f"| contiguous slots (before) | {m['contiguous_short']} |")
            print(f"| paged, {m['block_size']}-token blocks, {m['snapshots']} snapshots ({m['num_blocks']} blocks, "
                  f"{m['slots']} slots, {m['cache_bytes'] / 2**30:.2f} GiB allocated) | {m['paged_short']} |")
            print(f"\n{m['paged_short'] / m['contiguous_short']:.0f}x more")
        if "decode" not in args.skip:
            base = Path(tmp) / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.baseline_ref], cwd=REPO, check=True)
            try:
                rows = decode(model, base, args.batch or [8, 32], 512, args.rounds)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
            print(f"\n### Decode, 512-token contexts, 2 threads ({args.rounds} alternating bursts of 8 steps)\n")
            print("| batch | tok/s before (contiguous) | tok/s paged | paged / before, median of bursts | quartiles |")
            print("|---:|---:|---:|---:|---:|")
            for r in rows:
                print(f"| {r['batch']} | {r['baseline']:.0f} | {r['paged']:.0f} | {r['ratio']:.3f}x | "
                      f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f} |")


if __name__ == "__main__":
    main()

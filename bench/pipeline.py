"""Pipeline throughput and transport overhead on Ray.

    .venv/bin/python bench/pipeline.py [--quick] [--skip-transport]

1. Aggregate decode tokens/s and each stage's busy fraction, for P=1 (one stage, 1 thread) and
   P=2 (two stages, 1 thread each), at 1, 8, 32 and 64 concurrent requests, on the ~78M-parameter
   bench config (see bench/model_vs_hf.py).
2. Per-hop transport overhead for a decode-sized and a prefill-sized microbatch of activations,
   through plain actor calls (object refs passed stage to stage) and through a Ray Compiled Graph
   (shared-memory channels on CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, torn down at exit
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see cluster/pipeline.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from bench.model_vs_hf import BENCH_CONFIG  # noqa: E402
from cluster.pipeline import Pipeline, PipelineConfig  # noqa: E402
from stages.config import JambaConfig  # noqa: E402
from stages.demo import random_state  # noqa: E402
from stages.loading import save_checkpoint  # noqa: E402
from stages.sampling import SamplingParams  # noqa: E402


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
            before = await pipe.stage_stats()
            t0 = time.perf_counter()
            res = await asyncio.gather(*[pipe.generate_full(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                                         for p in prompts])
            wall = time.perf_counter() - t0
            after = await pipe.stage_stats()
            busy = [(a["busy_seconds"] - b["busy_seconds"]) / wall for a, b in zip(after, before)]
            tokens = sum(len(r.output_ids) for r in res)
            out.append({"stages": stages, "concurrency": n, "tokens_per_s": tokens / wall, "busy": busy})
            print(f"  P={stages} n={n}: {tokens / wall:.0f} tok/s, busy {', '.join(f'{b:.0%}' for b in busy)}", file=sys.stderr)
    finally:
        await pipe.close()
    return out


@ray.remote(num_cpus=0.5)
class Hop:
    def fwd(self, x: torch.Tensor) -> torch.Tensor:
        return x


def transport_run(reps: int) -> list[dict]:
    """Per-hop overhead: a chain of H identity stages, minus a chain of 1, divided by H-1."""
    sizes = {"decode (32 x 512 fp32, 64 KiB)": (32, 512), "prefill (512 x 512 fp32, 1 MiB)": (512, 512)}
    rows = []
    hops = [Hop.remote() for _ in range(4)]
    ray.get([h.fwd.remote(torch.zeros(1)) for h in hops])

    def actor_chain(chain, x):
        ref = x
        for h in chain:
            ref = h.fwd.remote(ref)
        return ray.get(ref)

    for label, shape in sizes.items():
        x = torch.randn(*shape)
        per = {}
        for name in ("actor calls", "compiled graph"):
            times = {}
            for n in (1, 4):
                chain = hops[:n]
                if name == "actor calls":
                    run = lambda: actor_chain(chain, x)  # noqa: E731
                    close = None
                else:
                    from ray.dag import InputNode

                    with InputNode() as inp:
                        node = inp
                        for h in chain:
                            node = h.fwd.bind(node)
                    dag = node.experimental_compile(_buffer_size_bytes=8 << 20)  # room for a prefill microbatch
                    run = lambda: ray.get(dag.execute(x), timeout=20)  # noqa: E731
                    close = dag.teardown
                try:
                    for _ in range(5):
                        run()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        run()
                    times[n] = (time.perf_counter() - t0) / reps
                except ray.exceptions.GetTimeoutError:  # seen with 1 MiB tensors through CPU channels
                    times[n] = float("nan")
                finally:
                    if close:
                        close()
            per[name] = (times[4] - times[1]) / 3 * 1000
        rows.append({"size": label, **per})
        print(f"  {label}: " + ", ".join(f"{k} {v:.3f} ms/hop" for k, v in per.items()), file=sys.stderr)
    for h in hops:
        ray.kill(h)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-transport", action="store_true")
    ap.add_argument("--transport-only", action="store_true")
    args = ap.parse_args()
    concurrency = [1, 8, 32, 64]
    new_tokens = 16 if args.quick else 32
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = write_bench_model(Path(tmp))
            results = {}
            for stages in () if args.transport_only else (1, 2):
                results[stages] = asyncio.run(decode_run(model, stages, concurrency, new_tokens))
        transport = [] if args.skip_transport else transport_run(50 if args.quick else 200)
    finally:
        ray.shutdown()

    if results:
        print_decode(results, new_tokens)
    if transport:
        print("\nPer-hop transport overhead (ms), identity stages, measured as (4-stage chain - 1-stage chain) / 3\n")
        print("| microbatch | " + " | ".join(k for k in transport[0] if k != "size") + " |")
        print("|---|" + "---:|" * (len(transport[0]) - 1))
        for r in transport:
            print(f"| {r['size']} | " + " | ".join(f"{v:.3f}" for k, v in r.items() if k != "size") + " |")
        hop = transport[0]["actor calls"]
        best = min(v for k, v in transport[0].items() if k != "size")
        print(f"\n- target decode hop <= 0.5 ms: actor calls {hop:.3f} ms, best {best:.3f} ms: {'met' if best <= 0.5 else 'NOT met'}")


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
    print(f"\n- target P=2 / P=1 at 32 concurrent >= 1.7x: measured {ratio:.2f}x: {'met' if ratio >= 1.7 else 'NOT met'}")
    busy = min(at32[1]["busy"])
    print(f"- target every stage busy >= 85% at 32 concurrent: lowest {busy:.0%}: {'met' if busy >= 0.85 else 'NOT met'}")


if __name__ == "__main__":
    main()

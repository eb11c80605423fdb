"""Batch scoring throughput: `jamba batch score` on Ray Data vs a plain single-process loop.

    .venv/bin/python bench/batch.py [--rows 2000] [--quick] [--threads 1]

Rows of mixed length (token ids, lengths log-uniform in [--min-len, --max-len]) on the ~70M
parameter bench config (bench/model_vs_hf.py), scored three ways in one run:
  (c) plain loop: one process, `LocalRunner.score([ids])` one row at a time (the model core, no
      Ray, no I/O; the rows are already parsed), timed on every k-th row (--plain-rows of them, the
      same length distribution) since one row at a time is slow,
  (a) the batch job with 1 pipeline of 2 stages,
  (b) the batch job with 2 pipelines of 1 stage,
each stage and the plain loop with --threads torch threads. The batch figures are steady state
(from the first pipeline being ready to the last committed part: reading, parsing, scheduling and
writing Parquet included, start-up excluded) and end to end (the whole job: counting the input,
starting the pipelines, finishing). Prints a Markdown table and the ratios vs the plain loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, torn down at exit
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.openmp import use_openmp_env  # noqa: E402

use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.pipeline import write_bench_model  # noqa: E402


def make_rows(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        u = torch.rand((), generator=g).item()
        length = int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
        rows.append([1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist())
    return rows


def plain_loop(model: Path, rows: list[list[int]], threads: int, sample: int) -> dict:
    from cluster.runtime.local import LocalRunner
    from stages.loading import load_stage

    torch.set_num_threads(threads)
    rows = rows[:: max(1, len(rows) // sample)] if sample else rows
    runner = LocalRunner(load_stage(model)[0], None)
    runner.score([rows[0][:8]])  # warm up
    t0 = time.perf_counter()
    for ids in rows:
        runner.score([ids])
    dt = time.perf_counter() - t0
    tokens = sum(map(len, rows))
    return {"name": f"(c) plain loop, LocalRunner.score one row at a time ({len(rows)} rows)", "rows_per_s": len(rows) / dt,
            "tokens_per_s": tokens / dt, "seconds": dt, "e2e_rows_per_s": len(rows) / dt, "startup": 0.0}


def batch_job(model: Path, inp: Path, out: Path, pipelines: int, stages: int, threads: int, batch_size: int) -> dict:
    from cluster.batch.job import BatchConfig, run_job

    t0 = time.perf_counter()
    s = run_job(BatchConfig("score", str(model), [str(inp)], str(out), pipelines=pipelines, stages=stages,
                            threads_per_stage=threads, batch_size=batch_size, progress_interval=15))
    wall = time.perf_counter() - t0
    r = s["this_run"]
    assert s["rows_failed"] == 0 and r["rows"] == s["rows"], s
    return {"name": f"({'a' if pipelines == 1 else 'b'}) batch: {pipelines} pipeline(s) x {stages} stage(s)",
            "rows_per_s": r["steady_rows_per_s"], "tokens_per_s": r["steady_tokens_per_s"], "seconds": r["steady_seconds"],
            "e2e_rows_per_s": r["rows"] / wall, "startup": r["startup_seconds"], "cpus_per_stage": s["cpus_per_stage"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="300 rows, the plain loop timed on 100")
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per stage, and of the plain loop")
    ap.add_argument("--batch-size", type=int, default=100, help="rows per batch (and per committed part)")
    ap.add_argument("--cpus", type=int, default=None, help="Ray CPUs (default: all cores)")
    ap.add_argument("--plain-rows", type=int, default=400, help="rows the plain loop is timed on (0: all)")
    args = ap.parse_args()
    n = 300 if args.quick else args.rows
    if args.quick:
        args.plain_rows = min(args.plain_rows, 100)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import ray

    from bench.model_vs_hf import BENCH_CONFIG

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_bench_model(tmp / "model")
        rows = make_rows(n, args.min_len, args.max_len, BENCH_CONFIG["vocab_size"])
        inp = tmp / "rows.jsonl"
        inp.write_text("".join(json.dumps({"id": i, "input_ids": ids}) + "\n" for i, ids in enumerate(rows)))
        tokens = sum(map(len, rows))
        print(f"{n} rows, {tokens} tokens (lengths {args.min_len}..{args.max_len}, mean {tokens / n:.0f})", file=sys.stderr)
        results = [plain_loop(model, rows, args.threads, args.plain_rows)]
        print(f"  plain loop: {results[0]['rows_per_s']:.1f} rows/s", file=sys.stderr)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            for pipelines, stages in ((1, 2), (2, 1)):
                results.append(batch_job(model, inp, tmp / f"out-{pipelines}x{stages}", pipelines, stages, args.threads,
                                         args.batch_size))
                print(f"  {results[-1]['name']}: {results[-1]['rows_per_s']:.1f} rows/s", file=sys.stderr)
        finally:
            ray.shutdown()

    base = results[0]
    print(f"\nBatch scoring, bench config (~70M params, fp32), {n} rows of {args.min_len}..{args.max_len} tokens "
          f"(mean {tokens / n:.0f}), {args.threads} torch thread(s) per stage / plain loop, {os.cpu_count()} cores, "
          f"batch size {args.batch_size}\n")
    print("| run | rows/s | tokens/s | vs plain loop | end-to-end rows/s (start-up s) | e2e vs plain loop |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['rows_per_s']:.1f} | {r['tokens_per_s']:.0f} | **{r['rows_per_s'] / base['rows_per_s']:.2f}x** | "
              f"{r['e2e_rows_per_s']:.1f} ({r['startup']:.1f}) | {r['e2e_rows_per_s'] / base['rows_per_s']:.2f}x |")
    a, b = results[1]["rows_per_s"] / base["rows_per_s"], results[2]["rows_per_s"] / base["rows_per_s"]
    print(f"\n- target 1 pipeline >= 1x the plain loop: {a:.2f}x: {'met' if a >= 1 else 'NOT met'}")
    print(f"- target 2 pipelines >= 1.6x the plain loop: {b:.2f}x: {'met' if b >= 1.6 else 'NOT met'}")
    print(f"- CPUs per stage (the CPU rule): {results[1]['cpus_per_stage']:g} for (a), {results[2]['cpus_per_stage']:g} for (b)")


if __name__ == "__main__":
    main()

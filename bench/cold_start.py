"""Cold start: the first request's latency in a fresh process against the next request's.

    .venv/bin/python bench/cold_start.py [--serve] [--threads 2]

Every case runs in a fresh Python process (and, with --serve, a fresh Ray cluster), on the demo
model, under four conditions:

    warm-up   JAMBA_KERNEL_WARMUP=0 (what main did before issue 12) or on (the default now)
    cache     JAMBA_KERNEL_CACHE an empty directory (a fresh machine / image without a cache)
              or the directory the previous case filled

local:   load the model, warm up (or not), then two requests through LocalRunner (an 8-token
         prompt, 8 greedy tokens each): start-up seconds, first and second request latency.
--serve: also the `make demo` setup (Ray Serve, a 2-stage pipeline of the demo LM behind the
         gRPC ingress, cluster/demo.py's resources), two streamed generations through the client:
         time to service up, and the time to first token of the first and second request.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.openmp import OPENMP_ENV  # noqa: E402
PROMPT = [1, 17, 4, 99, 250, 3, 7, 42]


def child_local(model: str, threads: int) -> dict:
    t0 = time.perf_counter()
    import torch

    from cluster.runtime.local import LocalRunner
    from stages.loading import load_stage
    from stages.sequence import SamplingParams
    from stages.warmup import warm_up

    torch.set_num_threads(threads)
    stage, _ = load_stage(model)
    warm = warm_up(stage)
    runner = LocalRunner(stage, num_slots=2)
    startup = time.perf_counter() - t0
    lat = []
    for _ in range(2):
        t = time.perf_counter()
        runner.generate([PROMPT], [SamplingParams(max_new_tokens=8, ignore_eos=True)])
        lat.append(time.perf_counter() - t)
    return dict(startup=startup, warmup=warm, first=lat[0], second=lat[1])


def child_serve(model: str) -> dict:
    t0 = time.perf_counter()
    import logging

    import ray
    from ray import serve

    from client import JambaClient
    from cluster.serve.app import build_app, grpc_options, limit_message_size, wait_until_serving

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limit_message_size()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        serve.start(grpc_options=grpc_options(port), http_options={"host": "127.0.0.1", "port": 0},
                    logging_config={"log_level": "WARNING"})
        serve.run(build_app({"model": model, "name": "lm", "stages": 2, "cpus_per_stage": 0.5}),
                  name="lm", route_prefix="/lm")
        wait_until_serving("lm")
        up = time.perf_counter() - t0
        ttft = []
        with JambaClient(f"127.0.0.1:{port}", application="lm", timeout=300) as c:
            for _ in range(2):
                t = time.perf_counter()
                first = None
                for _delta in c.generate_stream(PROMPT, max_new_tokens=8, ignore_eos=True):
                    first = first or time.perf_counter() - t
                ttft.append(first)
        return dict(startup=up, first=ttft[0], second=ttft[1])
    finally:
        serve.shutdown()
        ray.shutdown()


def run_case(kind: str, model: str, cache: Path, warmup: bool, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(JAMBA_KERNEL_CACHE=str(cache), JAMBA_KERNEL_WARMUP="1" if warmup else "0",
               PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", **OPENMP_ENV)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--model", model, "--threads", str(threads)],
                         env=env, cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help="also measure through Ray Serve (the make demo setup)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["local", "serve"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        res = child_local(args.model, args.threads) if args.child == "local" else child_serve(args.model)
        print(json.dumps(res))
        return

    sys.path.insert(0, str(ROOT))
    from stages.demo import make_demo_model

    kinds = ["local"] + (["serve"] if args.serve else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_demo_model(Path(tmp) / "demo-lm"))
        for kind in kinds:
            for warmup in (False, True):
                cache = Path(tmp) / f"cache-{kind}-{int(warmup)}"  # empty: nothing compiled yet
                for state in ("empty", "filled"):  # the second run reuses what the first compiled
                    r = run_case(kind, model, cache, warmup, args.threads)
                    rows.append((kind, warmup, state, r))
                    print(f"  {kind} warm-up={warmup} cache={state}: {r}", file=sys.stderr)

    print(f"\nDemo model, fresh process per row, {args.threads} torch threads; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| entry point | warm-up | kernel cache | start-up s | first request s | second request s | first / second |")
    print("|---|---|---|---:|---:|---:|---:|")
    for kind, warmup, state, r in rows:
        what = "LocalRunner, 8 tokens" if kind == "local" else "Serve 2-stage, TTFT"
        print(f"| {what} | {'on' if warmup else 'off (before)'} | {state} | {r['startup']:.1f} | {r['first']:.2f} "
              f"| {r['second']:.2f} | {r['first'] / r['second']:.1f}x |")


if __name__ == "__main__":
    main()

"""What a caller sees while an application deploys: how long a call made during start-up waits
for an answer, with the pipeline started in the background (the default) against the constructor
that loads it (start_in_background=False, what the KubeRay manifests use and what every replica
did before), in the same run.

    .venv/bin/python bench/startup.py [--stages 2] [--probe-interval 0.25] [--deadline 10]

For each mode and each case, a fresh Ray cluster and Serve on loopback, then serve.run without
waiting, and from that moment a probe thread calls ModelInfo through Serve's gRPC proxy every
--probe-interval seconds with a --deadline, recording when each call was sent, how long it took
and its status code, until one succeeds (or, when the stages cannot be placed, for --watch seconds):

    loads        the demo LM, --stages stages: it can be placed, and loads
    unplaceable  the same with a stage that needs more CPUs than the cluster has

The figures: the time from deploy to the first answer of any kind, to the first OK, the median and
the longest wait of a call made before the pipeline served, and how many calls ran into their
deadline. One run, on this machine's 2 cores: compare the modes with each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(mode: str, case: str, stages: int, interval: float, deadline: float, watch: float) -> dict:
    sys.path.insert(0, str(ROOT))
    import ray
    from ray import serve

    from client import JambaClient, JambaError
    from cluster.serve.app import build_app, grpc_options, limit_message_size
    from stages.demo import ensure_demo_model
    from tests.harness import free_port

    port = free_port()
    limit_message_size()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    try:
        serve.start(grpc_options=grpc_options(port), http_options={"host": "127.0.0.1", "port": free_port()},
                    logging_config={"log_level": "WARNING"})
        cpus = 0.5 if case == "loads" else 4.0  # 2 stages x 4 CPUs on a 2-CPU cluster: never placed
        app = build_app({"model": str(ensure_demo_model("lm")), "name": "lm", "stages": stages,
                         "cpus_per_stage": cpus, "start_in_background": mode == "background"})
        calls: list[tuple[float, float, str]] = []  # (sent, seconds, code), times from deploy
        done = threading.Event()

        def probe():
            with JambaClient(f"127.0.0.1:{port}", application="lm", timeout=deadline, retry=None) as c:
                while not done.is_set():
                    sent = time.perf_counter()
                    try:
                        c.model_info()
                        code = "OK"
                    except JambaError as e:
                        code = e.code_name
                    calls.append((sent - t0, time.perf_counter() - sent, code))
                    if code == "OK":
                        return
                    time.sleep(max(0.0, sent + interval - time.perf_counter()))

        probes = threading.Thread(target=probe, daemon=True)
        serve.run_many([serve.RunTarget(app, name="lm", route_prefix="/lm")], wait_for_applications_running=False)
        t0 = time.perf_counter()  # the deploy call returned: the moment a user starts calling
        probes.start()
        probes.join(timeout=watch if case == "unplaceable" else 600)
        done.set()
        probes.join(timeout=deadline + 5)
        return {"calls": calls}
    finally:
        serve.shutdown()
        ray.shutdown()


def summarize(calls: list) -> dict:
    ok = [sent + took for sent, took, code in calls if code == "OK"]
    before = [took for sent, took, code in calls if code != "OK"]
    return {
        "first_answer": min(sent + took for sent, took, _ in calls) if calls else None,
        "first_ok": ok[0] if ok else None,
        "median_wait": statistics.median(before) if before else None,
        "max_wait": max(before) if before else None,
        "calls": len(calls),
        "deadline_exceeded": sum(code == "DEADLINE_EXCEEDED" for _, _, code in calls),
        "codes": sorted({code for _, _, code in calls}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--probe-interval", type=float, default=0.25)
    ap.add_argument("--deadline", type=float, default=10.0, help="each probe call's deadline, seconds")
    ap.add_argument("--watch", type=float, default=40.0, help="how long to probe the unplaceable case, seconds")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.stages, args.probe_interval, args.deadline, args.watch)))
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    rows = []
    for case in ("loads", "unplaceable"):
        for mode in ("foreground", "background"):
            print(f"  {case}, {mode}...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", mode, case, "--stages", str(args.stages),
                                  "--probe-interval", str(args.probe_interval), "--deadline", str(args.deadline),
                                  "--watch", str(args.watch)],
                                 env=env, cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
            r = summarize(json.loads(out.stdout.strip().splitlines()[-1])["calls"])
            print(f"  {r}", file=sys.stderr, flush=True)
            rows.append((case, mode, r))

    def s(x):
        return "-" if x is None else f"{x:.2f}"

    print(f"\nDemo LM, {args.stages} stages, ModelInfo every {args.probe_interval:g} s with a {args.deadline:g} s "
          f"deadline from the moment the deploy call returns; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| case | replica start | first answer s | first OK s | calls before OK | median wait s | longest wait s "
          "| deadline exceeded | codes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for case, mode, r in rows:
        what = "in the background (now)" if mode == "background" else "in the constructor (before)"
        before = r["calls"] - (1 if r["first_ok"] is not None else 0)
        print(f"| {case} | {what} | {s(r['first_answer'])} | {s(r['first_ok'])} | {before} | {s(r['median_wait'])} "
              f"| {s(r['max_wait'])} | {r['deadline_exceeded']} | {', '.join(r['codes'])} |")


if __name__ == "__main__":
    main()

"""`jamba serve`: the gRPC service in the foreground (argument parsing stays light; Ray loads on use)."""

from __future__ import annotations

import logging

log = logging.getLogger("jamba")


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the gRPC service on Ray Serve (foreground)",
                       description="Serve one or more Jamba checkpoints over gRPC through Ray Serve. Each --model is "
                                   "an application; clients pick one with the `application` metadata key.")
    s.add_argument("--model", action="append", metavar="[NAME=]DIR",
                   help="checkpoint to serve (repeatable; NAME defaults to the directory name; 'demo' and "
                        "'demo-classifier' are the embedded demo models); default: the demo LM")
    s.add_argument("--stages", type=int, default=1, help="pipeline stages per replica")
    s.add_argument("--layer-split", help="layers per stage, e.g. '4,4' (default: balanced)")
    s.add_argument("--replicas", type=int, default=1, help="replicas (pipelines) per application")
    s.add_argument("--grpc-port", type=int, default=9000)
    s.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy, on 127.0.0.1 (health, routes)")
    s.add_argument("--num-slots", type=int, default=32)
    s.add_argument("--max-batch-tokens", type=int, default=512)
    s.add_argument("--max-queue", type=int, default=1024)
    s.add_argument("--stream-interval-ms", type=float, default=0.0,
                   help="least time between two messages of a stream; tokens produced meanwhile go out together, "
                        "which saves proxy CPU when there are many streams (default 0: every token at once)")
    s.add_argument("--threads-per-stage", type=int, default=1)
    s.add_argument("--cpus-per-stage", type=float, default=None, help="Ray CPUs reserved per stage (default: threads)")
    s.add_argument("--gpus-per-stage", type=float, default=0)
    g = s.add_argument_group("failures")
    g.add_argument("--max-restarts", type=int, default=3,
                   help="how often Ray restarts a dead stage actor before the replica gives up (default 3)")
    g.add_argument("--recover-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long a failed stage may take to come back before requests fail UNAVAILABLE (default 120)")
    g.add_argument("--health-check-period", type=float, default=10.0, metavar="SECONDS",
                   help="how often Serve checks each replica; a replica whose pipeline is down is replaced (default 10)")
    s.add_argument("--direct-ingress-port", type=int, metavar="PORT",
                   help="also let each replica serve gRPC itself, on ports from PORT up (Ray Serve's experimental "
                        "direct ingress: no proxy hop, about 1.5x the streaming throughput here; local cluster only)")
    s.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    s.set_defaults(func=run_serve)


def resolve_model(spec: str) -> tuple[str, str]:
    """'[NAME=]DIR' -> (name, dir); the names 'demo' and 'demo-classifier' are the embedded demo models."""
    from stages.demo import ensure_demo_model

    name, _, path = spec.rpartition("=")
    if path in ("demo", "demo-classifier"):
        return name or path, str(ensure_demo_model("classification" if path == "demo-classifier" else "lm"))
    return name or path.rstrip("/").split("/")[-1], path


def run_serve(args) -> int:
    import signal
    import threading

    import ray
    from ray import serve

    from .service import build_app, grpc_options, limit_message_size

    apps = [resolve_model(m) for m in (args.model or ["demo"])]
    if len({n for n, _ in apps}) != len(apps):
        raise ValueError("two --model entries have the same application name; name them NAME=DIR")
    limit_message_size()
    if args.direct_ingress_port:
        if args.address:
            raise ValueError("--direct-ingress-port needs a local cluster; on a running cluster, start its nodes with "
                             "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 instead")
        import os

        # Serve's processes, started by ray.init below, read these.
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(args.direct_ingress_port)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"] = str(args.direct_ingress_port + 100)
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(address="local", num_cpus=max(2, len(apps) * args.replicas * args.stages * args.threads_per_stage))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(grpc_options=grpc_options(args.grpc_port), http_options={"host": "127.0.0.1", "port": args.http_port})
        for name, path in apps:
            serve.run(build_app({
                "model": path, "name": name, "stages": args.stages, "layer_split": args.layer_split,
                "replicas": args.replicas, "num_slots": args.num_slots, "max_batch_tokens": args.max_batch_tokens,
                "max_queue": args.max_queue, "threads_per_stage": args.threads_per_stage,
                "gpus_per_stage": args.gpus_per_stage, "max_restarts": args.max_restarts,
                "recover_timeout_s": args.recover_timeout, "health_check_period_s": args.health_check_period,
                "stream_interval_ms": args.stream_interval_ms,
                "cpus_per_stage": args.cpus_per_stage if args.cpus_per_stage is not None else args.threads_per_stage,
            }), name=name, route_prefix=f"/{name}")
            log.info("application %r: %s, %d stage(s) x %d replica(s)", name, path, args.stages, args.replicas)
        print(f"jamba: serving {', '.join(n for n, _ in apps)} on gRPC port {args.grpc_port} "
              "(application metadata picks one); Ctrl-C stops", flush=True)
        if args.direct_ingress_port:
            print(f"jamba: each replica also serves gRPC directly, on ports from {args.direct_ingress_port} up "
                  "(one per replica, in start order)", flush=True)
        try:
            while not stop.wait(1):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()

"""`jamba serve`: the gRPC and OpenAI-compatible HTTP service (cluster/serve) in the foreground
(argument parsing stays light; Ray loads on use).

Start-up is bounded: the arguments and the layer split are checked before Ray starts, a local
cluster is sized for what the applications ask for (cluster/runtime/resources.py), and an application
whose replicas do not all serve within --start-timeout (the stages cannot be placed, the pipeline
failed to load, the replica keeps failing) stops the command with a message saying what a replica
needs, what the cluster has and what the replica was waiting for. Meanwhile each phase of the
start is logged as it begins, and the replicas answer calls UNAVAILABLE (cluster/serve/replica.py).
SIGTERM and SIGINT stop the command in every phase, start-up included.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from cluster.runtime.config import default

from .args import (add_batching_args, add_cache_args, add_model_args, add_pipeline_args, check_model_dir, engine_fields,
                   resolve_model, resolve_split)

log = logging.getLogger("jamba")

SHUTDOWN_GRACE_S = 15.0  # how long Serve may take to drain in-flight requests when stopping


class StartupError(RuntimeError):
    """An application did not come up; the message says why."""


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the gRPC and OpenAI-compatible HTTP service on Ray Serve (foreground)",
                       description="Serve one or more Jamba checkpoints through Ray Serve, over gRPC and the "
                                   "OpenAI-compatible HTTP API. Each --model is an application: gRPC clients pick one "
                                   "with the `application` metadata key; over HTTP, one application answers at "
                                   "http://HOST:PORT/v1, several each at http://HOST:PORT/NAME/v1, and `model` is "
                                   "the application's name.")
    s.add_argument("--model", action="append", metavar="[NAME=]DIR",
                   help="checkpoint to serve (repeatable; NAME defaults to the directory name; 'demo' and "
                        "'demo-classifier' are the embedded demo models); default: the demo LM")
    add_pipeline_args(s, 1, "pipeline stages per replica")
    s.add_argument("--replicas", type=int, default=1, help="replicas (pipelines) per application")
    s.add_argument("--grpc-port", type=int, default=9000, help="Serve's gRPC proxy (default 9000)")
    s.add_argument("--http-port", type=int, default=8000,
                   help="Serve's HTTP proxy: the OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health); default 8000")
    s.add_argument("--http-host", default="127.0.0.1",
                   help="address the HTTP proxy listens on (default 127.0.0.1; 0.0.0.0 for every interface)")
    s.add_argument("--http-request-timeout", type=float, default=None, metavar="SECONDS",
                   help="Serve's end-to-end timeout of an HTTP request, streams included (default: none); a "
                        "request past it is cancelled and its slots freed")
    s.add_argument("--start-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long the applications may take to be placed and loaded before the command gives up "
                        "and exits non-zero (default 600)")
    add_batching_args(s, default("max_batch_tokens"))
    add_cache_args(s)
    s.add_argument("--max-queue", type=int, default=default("max_queue"),
                   help=f"requests waiting for a slot before new ones are refused (default {default('max_queue')})")
    s.add_argument("--stream-interval-ms", type=float, default=0.0,
                   help="least time between two messages of a stream; tokens produced meanwhile go out together, "
                        "which saves proxy CPU when there are many streams (default 0: every token at once)")
    add_model_args(s)
    g = s.add_argument_group("failures")
    g.add_argument("--max-restarts", type=int, default=default("max_restarts"),
                   help="how often Ray restarts a dead stage actor before the replica gives up (default 3)")
    g.add_argument("--recover-timeout", type=float, default=default("recover_timeout_s"), metavar="SECONDS",
                   help="how long a failed stage may take to come back before requests fail UNAVAILABLE (default 120)")
    g.add_argument("--health-check-period", type=float, default=10.0, metavar="SECONDS",
                   help="how often Serve checks each replica; a replica whose pipeline is down is replaced (default 10)")
    s.add_argument("--direct-ingress-port", type=int, metavar="PORT",
                   help="also let each replica serve gRPC itself, on ports from PORT up (Ray Serve's experimental "
                        "direct ingress: no proxy hop, about 1.5x the streaming throughput here; local cluster only)")
    s.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    s.set_defaults(func=run_serve)


def _check_args(args) -> list[tuple[str, str]]:
    """Everything that can be checked before Ray starts; returns the (name, checkpoint) pairs."""
    for flag in ("stages", "replicas", "threads_per_stage"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.cpus_per_stage is not None and args.cpus_per_stage <= 0:
        raise ValueError(f"--cpus-per-stage must be > 0, got {args.cpus_per_stage}")
    if args.start_timeout <= 0:
        raise ValueError(f"--start-timeout must be > 0 seconds, got {args.start_timeout}")
    apps = [resolve_model(m) for m in (args.model or ["demo"])]
    if len({n for n, _ in apps}) != len(apps):
        raise ValueError("two --model entries have the same application name; name them NAME=DIR")
    for name, path in apps:
        check_model_dir(path, f"--model {name}={path}")
        resolve_split(path, args.stages, args.layer_split)
    if args.direct_ingress_port and args.address:
        raise ValueError("--direct-ingress-port needs a local cluster; on a running cluster, start its nodes with "
                         "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 instead")
    return apps


def _raise_on_sigterm() -> None:
    """SIGTERM stops the command as Ctrl-C does, wherever it is (Ray's own handler, which ray.init
    installs, would exit without cleaning up the local cluster)."""
    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def app_args(args, name: str, path: str) -> dict:
    """build_app's arguments for one application (cluster/serve/app.py): the engine's fields by
    their names there, the replica's options and how Serve deploys it."""
    engine = {("stages" if k == "num_stages" else k): v for k, v in engine_fields(args).items()}
    return {**engine, "model": path, "name": name, "replicas": args.replicas,
            "health_check_period_s": args.health_check_period, "stream_interval_ms": args.stream_interval_ms,
            "request_timeout_s": args.http_request_timeout}


def route_prefix(name: str, n_apps: int) -> str:
    """One application answers at the root (base URL http://HOST:PORT/v1, as OpenAI clients
    expect); several each at /NAME (http://HOST:PORT/NAME/v1)."""
    return "/" if n_apps == 1 else f"/{name}"


def run_serve(args) -> int:
    apps = _check_args(args)
    cpus = args.cpus_per_stage if args.cpus_per_stage is not None else args.threads_per_stage
    _raise_on_sigterm()
    serving = False
    phase = None  # what there is to stop: "ray" once ray.init runs, "serve" once Serve starts
    try:
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions

        from cluster.runtime.resources import local_cluster_size
        from cluster.serve.app import build_app, grpc_options, limit_message_size, serve_need

        limit_message_size()
        if args.direct_ingress_port:
            # Serve's processes, started by ray.init below, read these.
            os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
            os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(args.direct_ingress_port)
            os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"] = str(args.direct_ingress_port + 100)
        need = serve_need(len(apps), args.replicas, args.stages, cpus, args.gpus_per_stage)
        phase = "ray"  # set first: a signal during ray.init still stops what it started
        if args.address:
            ray.init(address=args.address)
        else:
            threads = len(apps) * args.replicas * args.stages * args.threads_per_stage
            # A cluster of this machine alone, on loopback (the pipeline's channels too).
            ray.init(address="local", _node_ip_address="127.0.0.1", **local_cluster_size(need, threads))
        _raise_on_sigterm()  # again: ray.init installed its own
        phase = "serve"
        serve.start(grpc_options=grpc_options(args.grpc_port),
                    http_options=HTTPOptions(host=args.http_host, port=args.http_port,
                                             request_timeout_s=args.http_request_timeout))
        serve.run_many([serve.RunTarget(build_app(app_args(args, name, path)), name=name,
                                        route_prefix=route_prefix(name, len(apps))) for name, path in apps],
                       wait_for_applications_running=False)
        log.info("deploying %s: %s", ", ".join(n for n, _ in apps), need.describe())
        wait_until_running([n for n, _ in apps], args, cpus)
        for name, path in apps:
            log.info("application %r: %s, %d stage(s) x %d replica(s)", name, path, args.stages, args.replicas)
        http = f"http://{args.http_host}:{args.http_port}"
        bases = ", ".join(f"{http}{route_prefix(n, len(apps)).rstrip('/')}/v1" for n, _ in apps)
        print(f"jamba: serving {', '.join(n for n, _ in apps)} on gRPC port {args.grpc_port} "
              f"(application metadata picks one) and the OpenAI API at {bases}; Ctrl-C stops", flush=True)
        if args.direct_ingress_port:
            print(f"jamba: each replica also serves gRPC directly, on ports from {args.direct_ingress_port} up "
                  "(one per replica, in start order)", flush=True)
        serving = True
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as e:
        print(f"jamba: {e.args[0] if e.args else 'SIGINT'} received, stopping", file=sys.stderr, flush=True)
        return 0 if serving else 130
    except StartupError as e:
        print(f"jamba serve: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if phase:
            _stop(local=not args.address, serve_started=phase == "serve", names=[n for n, _ in apps])


def wait_until_running(names: list[str], args, cpus_per_stage: float) -> None:
    """Return once every replica of every application serves; StartupError when one failed to
    deploy or its pipeline failed to start, or when they do not serve within --start-timeout
    (Serve itself would wait for resources for ever). Says each phase of the start as it begins."""
    from ray import serve

    from cluster.runtime.resources import cluster_summary
    from cluster.serve.app import replica_need, replica_starts

    deadline = time.monotonic() + args.start_timeout
    seen: dict[str, dict[str, dict]] = {name: {} for name in names}  # app -> replica -> its start
    said: dict[str, str] = {}
    while True:
        status = serve.status().applications
        pending = []
        for name in names:
            app = status.get(name)
            state = app.status if app else "NOT_STARTED"
            if state == "DEPLOY_FAILED":
                raise StartupError(f"application {name!r} failed to deploy: {_last_lines(app.message)}")
            if state != "RUNNING":
                pending.append((name, app, None))
                continue
            replicas = seen[name]
            replicas.update(replica_starts(name, args.replicas))
            failed = [r for r in replicas.values() if r["error"]]
            if failed:
                raise StartupError(f"application {name!r}: a replica's pipeline failed to start: {failed[0]['error']}")
            ready = [r for r in replicas.values() if r["phase"] == "ready"]
            if len(ready) < args.replicas:
                starting = [r for r in replicas.values() if r["phase"] != "ready"]
                pending.append((name, app, starting[0] if starting else None))
                if starting and said.get(name) != starting[0]["detail"]:
                    said[name] = starting[0]["detail"]
                    log.info("application %r: %s", name, said[name])
        if not pending:
            return
        if time.monotonic() > deadline:
            name, app, start = pending[0]
            messages = [d.message for d in (app.deployments.values() if app else []) if d.message]
            one = replica_need(args.stages, cpus_per_stage, args.gpus_per_stage)
            raise StartupError(
                f"application {name!r} was not serving after {args.start_timeout:g}s (--start-timeout). Each of its "
                f"{args.replicas} replica(s) needs {one.describe()}; {cluster_summary()}. "
                + (f"A replica was {start['detail']}. " if start else "")
                + (f"Serve says: {_last_lines(messages[0])} " if messages else "")
                + "Reserve less with --cpus-per-stage, use fewer --stages or --replicas, or add nodes.")
        time.sleep(0.5)


def _last_lines(message: str, n: int = 3) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return " ".join(lines[-n:]) or "(no message)"


def _stop(local: bool, serve_started: bool, names: list[str]) -> None:
    """Leave Ray. On a local cluster, ray.shutdown() stops every process the cluster started,
    Serve's included, at once (a graceful Serve shutdown first would wait for its proxies' drain
    period, 30 s, for nothing). On a cluster that was joined, this command's applications are
    deleted first, so they do not outlive it, and Serve keeps serving whatever else runs there;
    that gets SHUTDOWN_GRACE_S, and a signal cuts it short."""
    import ray
    from ray import serve

    done = threading.Event()

    def shutdown_serve():
        try:
            for name in names:
                serve.delete(name)
        except Exception as e:  # best effort: stopping goes on
            log.warning("the applications were not deleted cleanly: %s", e)
        finally:
            done.set()

    if serve_started and not local and ray.is_initialized():
        threading.Thread(target=shutdown_serve, name="serve-shutdown", daemon=True).start()
        try:
            if not done.wait(SHUTDOWN_GRACE_S):
                log.warning("the applications were not deleted within %gs; leaving anyway", SHUTDOWN_GRACE_S)
        except KeyboardInterrupt:
            pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # while the cluster's processes are stopped
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ray.shutdown()
    if not local and serve_started:
        log.info("left the Ray cluster; deleted the application(s) %s on it", ", ".join(names))

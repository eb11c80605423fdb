"""The Serve application: built from a Serve config's `args` (or `jamba serve`'s flags), and
watched until its replicas serve.

    import_path: cluster.serve.app:build_app        (a Serve config; see serve_config.yaml, k8s/)
    args:
      model: /models/AI21-Jamba-Mini-1.6           a checkpoint directory, or demo / demo-classifier
      stages: 2                                     and any other field of the engine's PipelineConfig
      ...                                           (cluster/runtime/config.py) by its name

The arguments are the engine's PipelineConfig fields (`model` and `stages` are its model_dir and
num_stages), the replica's options (ReplicaOptions: name, start_in_background,
stream_interval_ms, request_timeout_s) and how Serve deploys it (replicas, autoscaling_config,
health_check_period_s, health_check_timeout_s). One set of defaults: the PipelineConfig's, but
placement_timeout_s, which is none for a service (Serve itself would wait for an autoscaler to
add nodes).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import fields
from typing import Any

from ray import serve
from ray.serve.config import gRPCOptions

from cluster.runtime.config import PipelineConfig, config_fields
from cluster.runtime.resources import Need
from stages.config import check_quant_mode

from .deployment import REPLICA_CPUS, JambaService
from .replica import ReplicaOptions
from .routing import router_config

log = logging.getLogger("ray.serve")

SERVICER = "protos.jamba_pb2_grpc.add_JambaServiceServicer_to_server"
MAX_MESSAGE_BYTES = 16 << 20

RENAMED = {"model": "model_dir", "stages": "num_stages"}  # argument name -> PipelineConfig field
INTERNAL = {"model_dir", "num_stages", "use_current_placement_group", "actor_options", "worker_cls", "worker_kwargs"}
ENGINE_ARGS = (config_fields() - INTERNAL) | set(RENAMED)
REPLICA_ARGS = {f.name for f in fields(ReplicaOptions)}
DEPLOYMENT_ARGS = {"replicas", "autoscaling_config", "health_check_period_s", "health_check_timeout_s"}
APP_ARGS = ENGINE_ARGS | REPLICA_ARGS | DEPLOYMENT_ARGS


def build_app(args: dict[str, Any]):
    """Serve application builder (`import_path: cluster.serve.app:build_app` in a Serve config).

    start_in_background (default true): the replica is up at once and places and loads its stages
    in the background, answering UNAVAILABLE (HTTP 503) with what it is waiting for until they
    serve; placement_timeout_s bounds that wait. false: Serve places the replica and its stages
    together and the replica is up only once its pipeline serves, which is what a KubeRay
    RayService upgrade needs (it moves traffic to the new cluster once its applications are
    RUNNING); calls made meanwhile wait in Serve's proxy.
    """
    args = dict(args)
    if "model" not in args:
        raise ValueError("the Jamba application needs args.model (a checkpoint directory, or 'demo')")
    unknown = sorted(set(args) - APP_ARGS)
    if unknown:
        raise ValueError(f"unknown argument(s) of the Jamba application: {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted(APP_ARGS))}")
    check_quant_mode(args.get("quantize") or None)  # a bad value fails here, not in a replica
    deploy = {k: args.pop(k) for k in DEPLOYMENT_ARGS if k in args}
    replica = {k: args.pop(k) for k in REPLICA_ARGS if k in args}
    replica.setdefault("name", args["model"].rstrip("/").split("/")[-1])
    options = ReplicaOptions(**replica)
    engine = {RENAMED.get(k, k): v for k, v in args.items()}
    engine["model_dir"] = resolve_model_dir(engine["model_dir"])
    engine["quantize"] = engine.get("quantize") or None
    engine.setdefault("placement_timeout_s", None)
    cfg = PipelineConfig(**engine, use_current_placement_group=not options.start_in_background)

    settings: dict[str, Any] = dict(request_router_config=router_config())
    if not options.start_in_background:  # Serve places the replica (bundle 0) and its stages together
        cpus = cfg.threads_per_stage if cfg.cpus_per_stage is None else cfg.cpus_per_stage
        stage = {"CPU": cpus, **({"GPU": cfg.gpus_per_stage} if cfg.gpus_per_stage else {})}
        settings.update(placement_group_bundles=[{"CPU": REPLICA_CPUS}] + [dict(stage) for _ in range(cfg.num_stages)],
                        placement_group_strategy=cfg.placement_strategy)
    for key in ("health_check_period_s", "health_check_timeout_s"):
        if key in deploy:
            settings[key] = float(deploy[key])
    if deploy.get("autoscaling_config"):
        settings["autoscaling_config"] = deploy["autoscaling_config"]
    else:
        settings["num_replicas"] = deploy.get("replicas", 1)
    return JambaService.options(**settings).bind(cfg, options)


def resolve_model_dir(model: str) -> str:
    """A checkpoint directory, or the path of an embedded demo model ('demo', 'demo-classifier'),
    resolved where the application is built: the replicas get the path."""
    from stages.demo import model_dir  # imports torch, which this module's importers (the replica) need not

    return model_dir(model)


# ---- what an application asks of the cluster ----------------------------------------------------
def replica_need(stages: int, cpus_per_stage: float, gpus_per_stage: float = 0) -> Need:
    """One replica: its own bundle, then one bundle per stage, placed together."""
    return Need(REPLICA_CPUS + stages * cpus_per_stage, stages * gpus_per_stage,
                f"{REPLICA_CPUS:g} for the replica + {stages} stage(s) x {cpus_per_stage:g}")


def serve_need(apps: int, replicas: int, stages: int, cpus_per_stage: float, gpus_per_stage: float = 0) -> Need:
    one = replica_need(stages, cpus_per_stage, gpus_per_stage)
    n = apps * replicas
    return Need(n * one.cpus, n * one.gpus, f"{apps} application(s) x {replicas} replica(s) x ({one.what})")


# ---- watching it start ------------------------------------------------------------------------------
def replica_starts(name: str, replicas: int) -> dict[str, dict]:
    """Where the replicas of a running application are in their start (JambaService.startup_state),
    by replica id. Serve's router picks the replica of each call, so a few calls per replica reach
    every one soon; a replica that does not answer is left out (the next round asks again)."""
    handle = serve.get_app_handle(name)
    responses = [handle.startup_state.remote() for _ in range(2 * replicas)]
    states = {}
    for r in responses:
        try:
            state = r.result(timeout_s=10)
        except Exception as e:  # a replica being replaced
            log.debug("startup_state of %r: %s", name, e)
            continue
        states[state["replica"]] = state
    return states


def wait_until_serving(name: str, replicas: int = 1, timeout: float = 600) -> None:
    """Block until `replicas` replicas of application `name` serve (after serve.run, which returns
    once they are up, not once their pipelines are); RuntimeError if a pipeline failed to start,
    TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    seen: dict[str, dict] = {}
    while True:
        seen.update(replica_starts(name, replicas))
        failed = [r["error"] for r in seen.values() if r["error"]]
        if failed:
            raise RuntimeError(f"application {name!r}: a replica's pipeline failed to start: {failed[0]}")
        if sum(r["phase"] == "ready" for r in seen.values()) >= replicas:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {name!r} was not serving after {timeout:g}s: "
                               + "; ".join(r["detail"] for r in seen.values()))
        time.sleep(0.2)


# ---- Serve's proxies ----------------------------------------------------------------------------------
def limit_message_size() -> None:
    """Serve's gRPC proxy accepts 2 GiB messages by default, an easy way to exhaust its memory;
    cap it (RESOURCE_EXHAUSTED beyond). Must run before Ray starts: the proxy reads the env."""
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(MAX_MESSAGE_BYTES))


def grpc_options(port: int) -> gRPCOptions:
    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER])

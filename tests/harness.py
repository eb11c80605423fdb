"""What several test modules set up the same way: a free loopback port, Ray Serve with Jamba
applications on a private cluster, a simulated multi-node cluster and hanging one of its hosts,
and waiting for a condition."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_apps(apps: dict[str, dict], env: dict[str, str] | None = None,
               system_config: dict | None = None, http_port: int | None = None,
               http_request_timeout_s: float | None = None) -> Iterator[str]:
    """Start a private Ray cluster and Serve with each application of `apps` (name -> build_app
    args, plus an optional route_prefix, default /NAME, and wait_for_replicas, how many replicas
    must serve before the next application is deployed, default all); yields "127.0.0.1:PORT" of
    Serve's gRPC proxy. Serve's HTTP proxy listens on http_port (default: any free port) with the given request
    timeout. `env` is set for Ray's processes (they inherit it) and restored afterwards."""
    import ray
    from ray import serve

    from cluster.serve.app import build_app, grpc_options, limit_message_size, wait_until_serving

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    port = free_port()
    limit_message_size()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             **({"_system_config": system_config} if system_config else {}))
    try:
        serve.start(grpc_options=grpc_options(port),
                    http_options={"host": "127.0.0.1", "port": http_port or free_port(),
                                  "request_timeout_s": http_request_timeout_s})
        for name, args in apps.items():
            args = dict(args)
            prefix = args.pop("route_prefix", f"/{name}")
            serving = args.pop("wait_for_replicas", args.get("replicas", 1))
            serve.run(build_app({"name": name, **args}), name=name, route_prefix=prefix)
            if serving:  # serve.run returns once the replicas are up; their pipelines start behind
                wait_until_serving(name, serving)
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def simulated_cluster(nodes: int = 3, system_config: dict | None = None, loopback: bool = False):
    """A head that runs the driver only (no CPUs) and `nodes` 1-CPU raylets, each with its own
    object store; the driver is connected for the duration. Yields the cluster_utils Cluster.
    With `loopback`, every node is on 127.0.0.1 (else on the machine's address, as Ray picks)."""
    import ray
    from ray.cluster_utils import Cluster

    ip = {"node_ip_address": "127.0.0.1"} if loopback else {}
    head = {"num_cpus": 0, **ip, **({"_system_config": system_config} if system_config else {})}
    with _ray_on_loopback() if loopback else contextlib.nullcontext():
        c = Cluster(initialize_head=True, head_node_args=head)
        try:
            for _ in range(nodes):
                c.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024, **ip)
            c.wait_for_nodes()
            ray.init(address=c.address, log_to_driver=False, **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


@contextlib.contextmanager
def _ray_on_loopback():
    """Ray takes the machine's address in places where it is given none (the head's GCS address,
    its processes' own), unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is off, as on a laptop: then
    127.0.0.1. Ray reads it at import, so this process's copy is set as well as its children's."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


class SimulatedHost:
    """A node of a simulated cluster as a host that can hang: `hang()` stops its raylet and every
    process under it (SIGSTOP: the stage actors, the node's agents), so nothing of it answers,
    its sockets stay open and nothing exits, as with a hung machine or a cut cable; `heal()`
    lets them go on."""

    def __init__(self, node) -> None:
        self.node_id = node.node_id
        self.pids = _with_descendants(node.all_processes["raylet"][0].process.pid)

    @classmethod
    def of(cls, cluster, node_id: str) -> "SimulatedHost":
        [node] = [n for n in cluster.worker_nodes if n.node_id == node_id]
        return cls(node)

    def hang(self) -> None:
        self._signal(signal.SIGSTOP)

    def heal(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command's name (state, ppid, ...), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _with_descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = int(stat[1])
    family = [pid]
    for p in family:
        family += [child for child, parent in parents.items() if parent == p]
    return family


def gone(pid: int) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] in "ZX"  # exited (perhaps not yet reaped)


def until(predicate, timeout: float = 60, what: str = "condition"):
    """Poll `predicate` until it returns something true, and return that."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")

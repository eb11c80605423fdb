"""What several test modules set up the same way: a free loopback port, Ray Serve with Jamba
applications on a private cluster, and waiting for a condition. (Clusters of several hosts:
tests/hosts.py.)"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from pathlib import Path
from typing import Iterator


# Ports for the servers a test starts. Not bind(0)'s: that draws from Linux's ephemeral range
# (32768-60999), where every outgoing connection and every Ray process that binds port 0 also
# draws, so a port picked that way and released can be taken before the test's server binds it
# (CI saw Serve's gRPC proxy lose its port to an HTTP/1 server). 20000-32767 is below that range
# and above Ray's worker ports (10002-19999).
_PORTS = range(20000, 32768)
_given: set[int] = set()  # never the same port twice in one test process


def free_port(host: str = "127.0.0.1") -> int:
    """A port no one listens on at `host` now, that neither Ray nor the kernel will hand out."""
    for _ in range(1000):
        port = random.choice(_PORTS)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1} at {host}")


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

    from cluster.serve.app import grpc_options, limit_message_size

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
        deploy_apps(apps)
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deploy_apps(apps: dict[str, dict]) -> None:
    """Deploy each application of `apps` on the running Serve (see serve_apps for the arguments)."""
    from ray import serve

    from cluster.serve.app import build_app, wait_until_serving

    for name, args in apps.items():
        args = dict(args)
        prefix = args.pop("route_prefix", f"/{name}")
        serving = args.pop("wait_for_replicas", args.get("replicas", 1))
        serve.run(build_app({"name": name, **args}), name=name, route_prefix=prefix)
        if serving:  # serve.run returns once the replicas are up; their pipelines start behind
            wait_until_serving(name, serving)


def gone(pid: int) -> bool:
    """Whether process `pid` has exited (perhaps not yet reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in "ZX"


def until(predicate, timeout: float = 60, what: str = "condition"):
    """Poll `predicate` until it returns something true, and return that."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")

"""Hosts for the test suite: Ray nodes on addresses of their own, each in a Linux network namespace,
so that a multi-node test crosses a network link as it would between machines (a single-address
cluster, several raylets on 127.0.0.1, never does: every socket it opens is on loopback).

    with namespace_hosts(cpus=(0, 1, 1, 1)) as hosts:   # a head and three hosts, each a Ray node
        ...                                            # this process is a driver of the cluster
        hosts.partition("host2")                       # its link goes silent
        hosts.heal("host2")

The layout, for a cluster whose subnet is 198.18.N.0/24 (198.18.0.0/15 is the range set aside for
benchmarking networks, RFC 2544; N is the first subnet no interface of this machine uses yet):

    root namespace: the bridge jb<tag>, 198.18.N.254, and a Ray node with no resources ("client").
    |               This process joins the cluster as a driver from there: a Ray driver attaches to
    |               the raylet of its own address, so the driver's address needs a node of its own.
    +- veth jv<tag>0 -- eth0 of namespace jamba-<tag>-head,  198.18.N.1: the Ray head (GCS on :6379)
    +- veth jv<tag>1 -- eth0 of namespace jamba-<tag>-host1, 198.18.N.2: a Ray worker node
    +- ...

Each node is `ray start --block` (inside its namespace: `ip netns exec NS ray start ...`) with
`--node-ip-address` its own address and a temp dir of its own, short (under /tmp, not the test's tmp
path): Ray's unix sockets live in it and a socket path may not exceed 107 bytes. Everything is torn
down in `finally`, whatever failed: each node's processes (its `ray start --block` and whatever is
in its session or its namespace, killed by process id), the namespaces (their veths go with them),
the bridge and the temp dirs. `ray stop` is never used: it would stop every Ray process of the machine.

Needs root and iproute2 (`ip`, `bridge`); `namespaces_unavailable()` says why not where they are
missing, and `hosts_or_skip` skips a test module with that reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .harness import free_port

SUBNET_PREFIX = "198.18."  # 198.18.0.0/15: benchmarking networks. Nothing else is ever used.
DRIVER_HOST = "client"  # the root namespace's node, where this process (the driver) lives
GCS_PORT = 6379
OBJECT_STORE_BYTES = 80 * 1024 * 1024
START_TIMEOUT_S = 120.0
LOCK_FILE = "/tmp/jamba-hosts.lock"  # serialises picking a subnet between processes of this machine


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, no bridge support)."""


@dataclass
class Host:
    name: str
    address: str  # its address on the bridge, also its Ray node's --node-ip-address
    netns: str | None  # None for the driver's host (the root namespace)
    veth: str | None  # the bridge's end of its link
    temp_dir: Path  # its Ray node's --temp-dir
    process: subprocess.Popen | None = None  # its `ray start --block`
    partitioned: bool = False  # its bridge port disabled (Hosts.partition)
    down: bool = False  # powered off (every process killed)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def namespaces_unavailable() -> str | None:
    """Why network namespaces on a bridge cannot be made here, or None if they can (tried for real,
    then removed)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None or shutil.which("bridge") is None:
        return "iproute2 (ip, bridge) is not installed"
    tag = secrets.token_hex(3)
    try:
        _ip("netns", "add", f"jamba-probe-{tag}")
        _ip("link", "add", f"jp{tag}", "type", "bridge")
    except RuntimeError as e:
        return f"cannot make network namespaces and bridges here: {e}"
    finally:
        _ip("link", "del", f"jp{tag}", check=False)
        _ip("netns", "del", f"jamba-probe-{tag}", check=False)
    return None


@contextlib.contextmanager
def hosts_or_skip(**layout) -> Iterator["Hosts"]:
    """`namespace_hosts(**layout)` for a pytest fixture: the test is skipped, with the reason,
    where namespaces cannot be made."""
    import pytest

    with contextlib.ExitStack() as stack:
        try:
            hosts = stack.enter_context(namespace_hosts(**layout))
        except HostsUnavailable as e:
            pytest.skip(str(e))
        yield hosts


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")  # the venv's, with the interpreter running this
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def _describe(pid: int) -> str | None:
    """"PID (name, state S)" for a live process; None for one that is gone or a zombie (it holds
    nothing but its process id, until its parent or init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return None if state in "ZX" else f"{pid} ({name}, state {state})"


def _session_pids(sid: int) -> set[int]:
    """The live processes of session `sid` (Ray's reaper changes its process group, not its session)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid and _describe(int(entry)):
                    pids.add(int(entry))
    return pids


def _namespace_pids(netns: str) -> set[int]:
    """The live processes in network namespace `netns`."""
    r = _ip("netns", "pids", netns, check=False)
    return {int(p) for p in r.stdout.split() if _describe(int(p))} if r.returncode == 0 else set()


def _pick_subnet() -> str:
    """198.18.N. for the first N in 0..254 that no interface of the root namespace is on."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for n in range(0, 255):
        if f" {SUBNET_PREFIX}{n}." not in used:
            return f"{SUBNET_PREFIX}{n}."
    raise RuntimeError(f"every subnet of {SUBNET_PREFIX}0.0/15 used here is taken")


class Hosts:
    """A Ray cluster of network-namespace hosts; see the module's docstring. `hosts["host1"]` is a
    Host; `gcs_address` the head's GCS ("198.18.N.1:6379")."""

    def __init__(self, tag: str, subnet: str, root: Path) -> None:
        self.tag, self.subnet, self.root = tag, subnet, root
        self.bridge = f"jb{tag}"
        self.hosts: dict[str, Host] = {}
        self.driver = Host(DRIVER_HOST, f"{subnet}254", None, None, root / "c")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def head(self) -> Host:
        return self.hosts["head"]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    def name_of(self, address: str) -> str:
        """The host whose address `address` is ("198.18.N.2" or "tcp://198.18.N.2:PORT")."""
        ip = address.removeprefix("tcp://").rsplit(":", 1)[0] if address.count(":") else address
        for h in [*self.hosts.values(), self.driver]:
            if h.address == ip:
                return h.name
        raise KeyError(f"{address} is not the address of any host of this cluster")

    def node_id(self, name: str) -> str:
        """The Ray node id of a host (the driver must be connected)."""
        import ray

        address = self.driver.address if name == DRIVER_HOST else self.hosts[name].address
        ids = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == address]
        if not ids:
            raise KeyError(f"no live Ray node on {name} ({address})")
        return ids[0]

    # ---- running things on a host ----------------------------------------------------------------
    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` as run on host `name` (inside its namespace)."""
        host = self.hosts[name]
        return ["ip", "netns", "exec", host.netns, *argv]

    def run(self, name: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run `argv` on host `name` to completion (subprocess.run's keywords)."""
        return subprocess.run(self.command(name, argv), **kw)

    # ---- faults ----------------------------------------------------------------------------------
    def partition(self, name: str) -> None:
        """Cut host `name` off the network, silently: the bridge stops forwarding to and from its
        port (port state disabled). The links stay up on both ends (no carrier change), nothing is
        reset and no process exits: what a failed switch port or a hung host looks like from
        elsewhere. Connections stay open and simply hear nothing; new ones get no answer."""
        self._bridge_port(name, "disabled")

    def heal(self, name: str) -> None:
        """Undo `partition`: the bridge forwards to and from the host's port again."""
        self._bridge_port(name, "forwarding")

    def _bridge_port(self, name: str, state: str) -> None:
        host = self.hosts[name]
        r = subprocess.run(["bridge", "link", "set", "dev", host.veth, "state", {"disabled": "0", "forwarding": "3"}[state]],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cannot set {name}'s bridge port {host.veth} {state}: {r.stderr.strip()}")
        host.partitioned = state == "disabled"

    def power_off(self, name: str) -> None:
        """Host `name` goes down: every process in it is killed at once (SIGKILL: its raylet, its
        object store, its workers), as a machine losing power. One difference: the kernel here
        lives on and closes their connections, so peers hear a FIN or a reset; `partition` first
        makes the loss silent, as a real power cut is. The namespace stays, with nothing in it,
        until the cluster is torn down."""
        host = self.hosts[name]
        for _ in range(50):
            pids = _namespace_pids(host.netns) | (_session_pids(host.process.pid) if host.process else set())
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if host.process is not None:
            host.process.wait(timeout=10)
        host.down = True

    # ---- building and tearing down ---------------------------------------------------------------
    def _add_host(self, name: str, index: int) -> Host:
        netns, veth = f"jamba-{self.tag}-{name}", f"jv{self.tag}{index}"
        host = Host(name, f"{self.subnet}{index + 1}", netns, veth, self.root / str(index))
        self.hosts[name] = host  # registered first: teardown removes whatever part of it exists
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        return host

    def _start_node(self, host: Host, cpus: float, resources: dict, system_config: dict | None,
                    env: dict[str, str]) -> None:
        host.temp_dir.mkdir(parents=True)
        argv = [_ray_executable(), "start", "--block", "--node-ip-address", host.address, "--temp-dir", str(host.temp_dir),
                "--num-cpus", f"{cpus:g}", "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]
        if resources:
            argv += ["--resources", json.dumps(resources)]
        if host.name == "head":
            argv += ["--head", "--port", str(GCS_PORT), "--include-dashboard=false"]
            if system_config:
                argv += ["--system-config", json.dumps(system_config)]
        else:
            argv += ["--address", self.gcs_address]
        if host.netns is None:  # the root namespace: its ports are shared with whatever else runs here
            argv += ["--dashboard-agent-listen-port", str(free_port(""))]
        else:
            argv = ["ip", "netns", "exec", host.netns, *argv]
        log = open(host.temp_dir / "ray-start.log", "wb")
        with log:
            host.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **env}, start_new_session=True)

    def _wait_started(self, host: Host, deadline: float) -> None:
        log = host.temp_dir / "ray-start.log"
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if host.process.poll() is not None or time.monotonic() > deadline:
                why = "exited" if host.process.poll() is not None else "did not start in time"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"the Ray node of {host.name} ({host.address}) {why}:\n{tail}")
            time.sleep(0.2)

    def _stop_nodes(self) -> list[str]:
        """Kill every node's processes: its `ray start --block` and whatever is in its session or
        its namespace (SIGKILL: a test cluster needs no graceful stop, which takes Ray 5-10 s here
        and is what a lost host never gets either). Returns what could not be done."""
        problems = []
        nodes = [h for h in [*self.hosts.values(), self.driver] if h.process is not None]
        for _ in range(100):
            left = set()
            for h in nodes:
                left |= _session_pids(h.process.pid)
            for h in self.hosts.values():
                left |= _namespace_pids(h.netns)
            left.discard(os.getpid())
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        else:
            problems.append("processes still running: " + ", ".join(filter(None, map(_describe, sorted(left)))))
        for h in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.process.wait(timeout=5)
        return problems

    def _remove_network(self) -> list[str]:
        """Delete each host's veth pair and namespace, and the bridge; returns what could not be done.
        The veths go explicitly: a namespace outlives `ip netns del` while a socket in it still
        holds it (a connection of a killed process still sending its FIN), and its veth with it."""
        problems = []
        for h in self.hosts.values():
            r = _ip("link", "del", h.veth, check=False)  # both ends of the pair
            if r.returncode != 0 and "Cannot find device" not in r.stderr:
                problems.append(f"ip link del {h.veth}: {r.stderr.strip()}")
            r = _ip("netns", "del", h.netns, check=False)
            if r.returncode != 0 and "No such file" not in r.stderr:
                problems.append(f"ip netns del {h.netns}: {r.stderr.strip()}")
        r = _ip("link", "del", self.bridge, check=False)
        if r.returncode != 0 and "Cannot find device" not in r.stderr:
            problems.append(f"ip link del {self.bridge}: {r.stderr.strip()}")
        return problems


@contextlib.contextmanager
def namespace_hosts(cpus: Sequence[float] = (1, 1, 1), resources: Sequence[dict] | None = None,
                    system_config: dict | None = None, env: dict[str, str] | None = None,
                    connect: bool = True) -> Iterator[Hosts]:
    """A Ray cluster of len(cpus) hosts: "head" (with cpus[0] CPUs), "host1" (cpus[1]), ...; each
    host's extra Ray resources in `resources`; Ray's `system_config` given to the head; `env` added
    to the environment of every node's processes. With `connect`, this process is a driver of the
    cluster (ray.init from the driver's host) until the end. Raises HostsUnavailable where
    namespaces cannot be made."""
    reason = namespaces_unavailable()
    if reason:
        raise HostsUnavailable(reason)
    resources = list(resources or [{}] * len(cpus))
    if len(resources) != len(cpus):
        raise ValueError(f"{len(cpus)} hosts but {len(resources)} resource dicts")
    root = Path(tempfile.mkdtemp(prefix="jh", dir="/tmp"))  # short: Ray's socket paths live under it
    with open(LOCK_FILE, "w") as lock:  # one subnet per cluster, even with several made at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        hosts = Hosts(secrets.token_hex(2), _pick_subnet(), root)
        try:
            _ip("link", "add", hosts.bridge, "type", "bridge")
            _ip("addr", "add", f"{hosts.driver.address}/24", "dev", hosts.bridge)
        except BaseException:
            _ip("link", "del", hosts.bridge, check=False)
            shutil.rmtree(root, ignore_errors=True)
            raise
    connected = failed = False
    try:
        _ip("link", "set", hosts.bridge, "up")
        for i in range(len(cpus)):
            hosts._add_host("head" if i == 0 else f"host{i}", i)
        deadline = time.monotonic() + START_TIMEOUT_S
        specs = list(zip(hosts.hosts.values(), cpus, resources))
        head, others = specs[0], specs[1:]
        hosts._start_node(*head, system_config, env or {})
        hosts._wait_started(hosts.head, deadline)
        for host, n, res in others:
            hosts._start_node(host, n, res, None, env or {})
        hosts._start_node(hosts.driver, 0, {}, None, env or {})
        for host in [*hosts.hosts.values(), hosts.driver]:
            hosts._wait_started(host, deadline)
        if connect:
            import ray

            ray.init(address=hosts.gcs_address, _node_ip_address=hosts.driver.address, log_to_driver=False)
            connected = True
            want = len(cpus) + 1
            while sum(n["Alive"] for n in ray.nodes()) < want:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {sum(n['Alive'] for n in ray.nodes())} of {want} Ray nodes joined")
                time.sleep(0.2)
        yield hosts
    except BaseException:
        failed = True
        raise
    finally:
        if connected:
            import ray

            ray.shutdown()
        for host in hosts.hosts.values():  # so that the killed processes' connections close at once
            if host.partitioned:
                with contextlib.suppress(RuntimeError):
                    hosts.heal(host.name)
        problems = hosts._stop_nodes() + hosts._remove_network()
        shutil.rmtree(root, ignore_errors=True)
        if problems and not failed:  # (after a failure, the failure is what to report)
            raise RuntimeError("tearing down the hosts left things behind: " + "; ".join(problems))

"""`jamba serve` as a user runs it: its own process and Ray cluster, serving until SIGTERM; and
its start-up, bounded and interruptible, on a cluster that cannot hold what it asks for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from client import JambaClient
from cluster.runtime.local import LocalRunner
from stages.loading import load_stage
from stages.sequence import SamplingParams
from stages.tokenizer import Tokenizer

from .harness import free_port, until

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))


def _start(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`jamba serve ARGS` in its own process group (Ray's processes join it), output to log_path."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", *args], cwd=ROOT, env=env or ENV,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_line(p: subprocess.Popen, log_path: Path, text: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while text not in log_path.read_text():
        assert p.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _assert_stops_cleanly(p: subprocess.Popen, log_path: Path, rc: int, within: float = 90) -> None:
    """The command exits with `rc` and leaves no process behind: Ray's processes (GCS, raylet,
    workers, Serve's actors) were started in its process group."""
    try:
        assert p.wait(timeout=within) == rc, log_path.read_text()[-3000:]
        deadline = time.time() + 30
        while _group_alive(p.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _group_alive(p.pid), subprocess.run(["ps", "-o", "pid,cmd", "-g", str(p.pid)],
                                                       capture_output=True, text=True).stdout
    finally:
        if _group_alive(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _http_get(url: str) -> tuple[int, dict, dict]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def test_jamba_serve_answers_and_stops_on_sigterm(models, tmp_path):
    """The README's command on this 2-core machine: 2 stages of 1 thread each, and no
    --cpus-per-stage; the local cluster is sized for the replica and its stages. Answers through
    Serve's proxy and, with --direct-ingress-port, straight from the replica; SIGTERM stops it."""
    lm, _ = models
    port, direct = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    p = _start(["--model", f"tiny={lm}", "--stages", "2", "--layer-split", "3,5", "--grpc-port", str(port),
                "--http-port", str(free_port()), "--max-restarts", "1", "--recover-timeout", "30",
                "--health-check-period", "2", "--direct-ingress-port", str(direct)], log_path,
               env=dict(ENV, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1"))
    try:
        _wait_for_line(p, log_path, "jamba: serving tiny on gRPC port")
        assert "starting a local Ray cluster with 3 CPU(s) for 2.1 CPU(s)" in log_path.read_text()
        tok = Tokenizer.from_dir(lm)
        want = LocalRunner(load_stage(lm)[0], tok).generate([tok.encode("Served by the CLI")],
                                                            [SamplingParams(max_new_tokens=6)])[0]
        with JambaClient(f"127.0.0.1:{port}", application="tiny", timeout=60) as c:
            assert c.generate(["Served by the CLI"], max_new_tokens=6)[0].output_ids == want.output_ids
            info = c.model_info()
        with JambaClient(f"127.0.0.1:{direct}", application="tiny", timeout=60) as c:  # the replica itself
            assert c.generate(["Served by the CLI"], max_new_tokens=6)[0].output_ids == want.output_ids
        assert [(s.start_layer, s.end_layer) for s in info.stages] == [(0, 3), (3, 8)]
        p.send_signal(signal.SIGTERM)
        _assert_stops_cleanly(p, log_path, rc=0)
        assert "SIGTERM received, stopping" in log_path.read_text()
    finally:
        if _group_alive(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_sigterm_stops_jamba_serve_during_start_up(models, tmp_path):
    """SIGTERM while the application is still deploying (the replica loading its stages) stops
    the command at once, with every Ray process it started."""
    lm, _ = models
    log_path = tmp_path / "serve.log"
    p = _start(["--model", f"tiny={lm}", "--stages", "2", "--grpc-port", str(free_port()),
                "--http-port", str(free_port())], log_path)
    _wait_for_line(p, log_path, "jamba: deploying tiny")
    p.send_signal(signal.SIGTERM)
    _assert_stops_cleanly(p, log_path, rc=130, within=60)
    assert "jamba: serving" not in log_path.read_text()


def test_unplaceable_application_fails_in_bounded_time(models, tmp_path):
    """Joining a 1-CPU cluster with 2 stages of 1 CPU: the replica (0.1 CPU) is up at once, its
    stages can never be placed. Meanwhile the replica answers UNAVAILABLE at once, over gRPC and
    HTTP, saying what it waits for (Serve's proxy would hold the call for ever). The command gives
    up after --start-timeout, says what a replica needs and what the cluster has, exits 1 and
    deletes its application, whose placement group goes with it; Serve stays up for whatever
    else runs on that cluster."""
    import ray

    lm, _ = models
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        gcs = ray.get_runtime_context().gcs_address
        port, http_port = free_port(), free_port()
        log_path = tmp_path / "serve.log"
        p = _start(["--model", f"tiny={lm}", "--stages", "2", "--cpus-per-stage", "1", "--start-timeout", "20",
                    "--address", gcs, "--grpc-port", str(port), "--http-port", str(http_port)], log_path)
        try:
            _wait_for_line(p, log_path, "jamba: application 'tiny': waiting for resources: 2 stage bundle(s) of 1 CPU")
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "cluster.cli", "client", "info", "--address", f"127.0.0.1:{port}",
                                "--application", "tiny", "--timeout", "20"], cwd=ROOT, env=ENV, capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 2, r.stderr
            assert "jamba client: UNAVAILABLE: application 'tiny' is starting: waiting for resources" in r.stderr, r.stderr
            assert time.time() - t0 < 10  # the client's own start included; its deadline was 20 s
            status, headers, body = _http_get(f"http://127.0.0.1:{http_port}/health")
            assert status == 503 and headers["retry-after"] == "5", (status, headers)
            assert body["error"]["code"] == "model_not_ready" and "waiting for resources" in body["error"]["message"]
            assert p.wait(timeout=120) == 1, log_path.read_text()[-3000:]
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        out = log_path.read_text()
        assert "jamba serve: error: application 'tiny' was not serving after 20s (--start-timeout)" in out, out[-3000:]
        assert "needs 2.1 CPU(s) (0.1 for the replica + 2 stage(s) x 1)" in out
        assert "the cluster has 1 CPU(s) in all" in out
        assert "A replica was waiting for resources: 2 stage bundle(s)" in out
        assert "deleted the application(s) tiny" in out
        # The replica went with its application, and Ray removed the placement group it made.
        from ray.util import placement_group_table

        until(lambda: all(g["state"] == "REMOVED" for g in placement_group_table().values()), 60,
              "the stages' placement group to be removed")
        assert ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")  # Serve itself was left running
    finally:
        ray.shutdown()

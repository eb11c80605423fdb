"""`jamba serve` as a user runs it: its own process and Ray cluster, serving until SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from client import JambaClient
from stages.loading import load_stage
from stages.runner import LocalRunner
from stages.sampling import SamplingParams
from stages.tokenizer import Tokenizer

from .harness import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_jamba_serve_answers_and_stops_on_sigterm(models, tmp_path):
    """Through Serve's proxy and, with --direct-ingress-port, straight from the replica."""
    lm, _ = models
    port, direct = free_port(), free_port()
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--model", f"tiny={lm}", "--stages", "2", "--layer-split", "3,5",
           "--cpus-per-stage", "0.5", "--grpc-port", str(port), "--http-port", str(free_port()),
           "--max-restarts", "1", "--recover-timeout", "30", "--health-check-period", "2",
           "--direct-ingress-port", str(direct)]
    log = open(tmp_path / "serve.log", "w+")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1")  # quick stop
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "jamba: serving tiny on gRPC port" not in (tmp_path / "serve.log").read_text():
            assert p.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
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
        assert p.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()

"""A replica answers while its pipeline starts, and Serve's router prefers replicas that serve.

One private cluster of 4 CPUs, on which:
- "pair": 2 replicas whose stage needs 2 CPUs; the first replica's stage is placed, the second's
  never can be (1.8 CPUs are left), so that replica stays starting for good.
- "big": one replica whose stage needs 8 CPUs: it is up, but can never serve.
- "broken": a checkpoint whose weights are truncated: its pipeline fails while loading.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import openai
import pytest
from ray import serve
from ray.util import placement_group_table

from client import JambaClient, JambaError
from cluster.serve.app import replica_starts, wait_until_serving
from cluster.serve.routing import STATS_PERIOD_S
from stages.sequence import SamplingParams

from .harness import free_port, serve_apps, until

PROMPT = "Starting up takes"


@pytest.fixture(scope="module")
def service(models, tmp_path_factory):
    lm, _ = models
    broken = tmp_path_factory.mktemp("broken")
    for f in lm.iterdir():  # the same checkpoint, its weight files cut to a quarter
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 4] if f.suffix == ".safetensors" else data)
    http = free_port()
    apps = {
        "pair": {"model": str(lm), "stages": 1, "cpus_per_stage": 2, "replicas": 2, "wait_for_replicas": 1},
        "big": {"model": str(lm), "stages": 1, "cpus_per_stage": 8, "wait_for_replicas": 0},
        "broken": {"model": str(broken), "stages": 1, "cpus_per_stage": 0.25, "max_restarts": 0,
                   "health_check_period_s": 600, "wait_for_replicas": 0},
    }
    with serve_apps(apps, http_port=http) as grpc_address:
        yield grpc_address, f"http://127.0.0.1:{http}"


def _unavailable(call) -> tuple[str, float]:
    """Run `call`, which must fail UNAVAILABLE; its message and how long it took."""
    t0 = time.perf_counter()
    with pytest.raises(JambaError) as e:
        call()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE, str(e.value)
    return e.value.details, time.perf_counter() - t0


def test_calls_go_to_the_replica_that_serves(service, reference):
    """Serve's default router would send half the calls to the replica that cannot start; this
    one sends them all to the one that serves (30 calls: 2^-30 by chance)."""
    address, base = service
    ref, _, tok = reference
    want = ref.generate([tok.encode(PROMPT)], [SamplingParams(max_new_tokens=6)])[0].output_ids
    # In Serve's eyes both replicas are up; one's stage is placed, the other's waits for resources.
    pair = serve.status().applications["pair"]
    assert pair.status == "RUNNING" and pair.deployments["JambaService"].replica_states == {"RUNNING": 2}
    stage_groups = [g["state"] for g in placement_group_table().values() if g["bundles"] == {0: {"CPU": 2.0}}]
    assert sorted(stage_groups) == ["CREATED", "PENDING"], stage_groups
    time.sleep(3 * STATS_PERIOD_S)  # Serve's routers hear the replicas' routing stats
    api = openai.OpenAI(base_url=f"{base}/pair/v1", api_key="unused", max_retries=0, timeout=60)
    with JambaClient(address, application="pair", timeout=60, retry=None) as c:
        for i in range(10):
            assert c.generate([PROMPT], max_new_tokens=6)[0].output_ids == want
            assert c.model_info().model_name == "pair"
            assert api.models.list().data[0].id == "pair"


def test_a_starting_replica_answers_every_call_at_once(service):
    """'big' can never be placed; every RPC and HTTP route still answers at once, with the phase
    the replica is in, instead of Serve's proxy holding the call (for ever, here)."""
    address, base = service
    until(lambda: replica_starts("big", 1), 60, "the replica to be up")
    with JambaClient(address, application="big", timeout=30, retry=None) as c:
        for call in (lambda: c.model_info(), lambda: c.generate([PROMPT], max_new_tokens=4),
                     lambda: c.score([PROMPT]), lambda: c.classify([PROMPT]),
                     lambda: list(c.generate_stream(PROMPT, max_new_tokens=4))):
            details, took = _unavailable(call)
            assert details.startswith("application 'big' is starting: waiting for resources: 1 stage bundle(s) "
                                      "of 8 CPU, PACK ("), details
            assert took < 5, took
    api = openai.OpenAI(base_url=f"{base}/big/v1", api_key="unused", max_retries=0, timeout=30)
    for call in (lambda: api.models.list(),
                 lambda: api.completions.create(model="big", prompt=PROMPT, max_tokens=4),
                 lambda: api.chat.completions.create(model="big", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True)):
        with pytest.raises(openai.APIStatusError) as e:
            call()
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "5"
        err = e.value.response.json()["error"]
        assert err["code"] == "model_not_ready" and "waiting for resources" in err["message"], err
    health = api._client.get(f"{base}/big/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "model_not_ready"
    # Starting is healthy: Serve keeps the replica (health checks every 10 s) instead of replacing it.
    first = replica_starts("big", 1)
    time.sleep(12)
    assert replica_starts("big", 1).keys() == first.keys()


def test_a_pipeline_that_fails_to_start_says_why(service):
    address, _ = service
    with pytest.raises(RuntimeError, match="application 'broken': a replica's pipeline failed to start: "):
        wait_until_serving("broken", 1, timeout=120)
    with JambaClient(address, application="broken", timeout=30, retry=None) as c:
        details, took = _unavailable(lambda: c.model_info())
    assert details.startswith("application 'broken' is unavailable: its pipeline failed to start ("), details
    assert took < 5


def test_the_replica_does_not_import_torch():
    """A replica schedules and streams; the stages compute. Without torch its process was up about
    2 s sooner here (the time a call made during deployment waits in Serve's proxy) and took 223
    instead of 406 MB (BENCHMARKS.md)."""
    root = Path(__file__).resolve().parents[1]
    code = ("import sys, cluster.serve.deployment, cluster.serve.openai_api, cluster.serve.routing\n"
            "from cluster.runtime.config import PipelineConfig, plan_pipeline\n"
            f"plan_pipeline(PipelineConfig({str(root / 'models' / 'jamba-demo-lm')!r}, num_stages=2, quantize='int8'))\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch'); assert not bad, bad[:5]")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)

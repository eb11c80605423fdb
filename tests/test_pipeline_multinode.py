"""Across hosts: three Ray nodes, each in a network namespace of its own with its own address on a
bridge (tests/hosts.py), and this process a driver on a fourth address with no resources. Stages
placed STRICT_SPREAD land on different hosts, the data plane binds on the hosts' addresses, every
microbatch crosses the bridge, and the results are those of one process: the pipeline alone (both
CPU activation transports), the command line started on the head, the Serve application called
from outside the head (gRPC and OpenAI streams), and a batch job. And the fault the partition tests
inject, `hosts.partition`, is silent and heals.

One cluster for the module (Ray takes tens of seconds to start here)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pyarrow.parquet as pq
import pytest
import ray
from ray import serve

from client import JambaClient
from cluster.batch.job import BatchConfig, run_job
from cluster.batch.rows import run_chunk
from cluster.runtime.config import PipelineConfig
from cluster.runtime.pipeline import SyncPipeline
from cluster.serve.app import grpc_options
from stages.sequence import SamplingParams

from .harness import deploy_apps, until
from .hosts import hosts_or_skip

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Across the hosts", "Every hop crosses a bridge", "x", "The weather today is"]
WORKER_HOSTS = ["head", "host1", "host2"]
GRPC_PORT, HTTP_PORT = 9000, 8000  # in the head's namespace: nothing else listens there


@pytest.fixture(scope="module")
def hosts():
    with hosts_or_skip(cpus=(2, 2, 2)) as h:  # head, host1, host2; the driver's host has none
        yield h


def _stage_actors() -> dict[str, str]:
    """Every stage actor the cluster has seen, live or dead: actor id -> the address of its node.
    (Ray's GCS actor table; the state API needs the dashboard, which these clusters do not run.)"""
    return {aid: a["Address"]["IPAddress"] for aid, a in ray._private.state.actors().items()
            if a["ActorClassName"] == "StageActor"}


def test_partition_is_silent_and_heal_restores_the_link(hosts):
    """What tests/hosts.py promises the partition tests: while a host is partitioned, an open
    connection to it hears nothing and is not reset, a new one gets no answer; once healed, what was
    sent meanwhile arrives and the same connection carries on."""
    host = hosts["host2"]
    echo = ("import socket\n"
            f"s = socket.create_server(({host.address!r}, 7000))\n"
            "print('listening', flush=True)\n"
            "c, _ = s.accept()\n"
            "while data := c.recv(100):\n"
            "    c.sendall(data)\n")
    server = subprocess.Popen(hosts.command("host2", [sys.executable, "-c", echo]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        with socket.create_connection((host.address, 7000), timeout=10) as conn:
            conn.sendall(b"before")
            assert conn.recv(100) == b"before"
            hosts.partition("host2")
            try:
                conn.sendall(b"during")
                conn.settimeout(2)
                with pytest.raises(socket.timeout):  # silence: no answer, and no reset either
                    conn.recv(100)
                with pytest.raises(OSError) as failed:  # timed out, or unreachable once ARP gives up
                    socket.create_connection((host.address, 7000), timeout=2)
                assert not isinstance(failed.value, ConnectionRefusedError)  # nothing answers, not even a reset
            finally:
                hosts.heal("host2")
            conn.settimeout(30)
            assert conn.recv(100) == b"during"  # retransmitted once the link is back
            conn.sendall(b"after")
            assert conn.recv(100) == b"after"
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("transport", ["inline", "gloo"])
def test_pipeline_across_three_hosts(hosts, models, reference, transport):
    lm, _ = models
    ref, _, tok = reference
    prompts = [tok.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=6 + i, ignore_eos=True) for i in range(len(prompts))]
    pipe = SyncPipeline(PipelineConfig(str(lm), num_stages=3, layer_split="2,3,3", placement_strategy="STRICT_SPREAD",
                                       cpus_per_stage=1, max_batch_tokens=8, transport=transport))
    try:
        stage_hosts = [hosts.name_of(i["node_ip"]) for i in pipe.pipe.stage_info]
        plane = pipe.pipe.dataplane
        inboxes, answers, store = list(plane.inboxes), plane.answer_address, plane.store
        got = pipe.generate(prompts, params)
        scores = pipe.score(prompts)
        # every microbatch went through every host (a stage counts one just after sending it on)
        until(lambda: len({s["dataplane"]["microbatches"] for s in pipe._call(pipe.pipe.stage_stats())}) == 1,
              timeout=10, what="every stage to count the same microbatches")
    finally:
        pipe.close()
    assert sorted(stage_hosts) == WORKER_HOSTS  # one stage on each host
    assert [hosts.name_of(a) for a in inboxes] == stage_hosts  # each stage listens on its own host's address
    assert hosts.name_of(answers) == "client"  # and the answers come back to the driver's
    if transport == "gloo":  # the process groups meet at the driver's rendezvous store
        assert store is not None and store.host == hosts.driver.address
    assert [g.output_ids for g in got] == [r.output_ids for r in ref.generate(prompts, params)]
    for s, r in zip(scores, ref.score(prompts)):
        assert s[1:] == pytest.approx(r[1:], abs=1e-4)


def test_strict_spread_with_too_few_hosts_fails_clearly(hosts, models):
    """Four stages, three hosts with CPUs (the driver's has none)."""
    with pytest.raises(RuntimeError, match="could not place 4 stages .* STRICT_SPREAD"):
        SyncPipeline(PipelineConfig(str(models[0]), num_stages=4, placement_strategy="STRICT_SPREAD",
                                    cpus_per_stage=0.5, placement_timeout_s=5))


def test_cli_on_the_head_joins_the_cluster(hosts, models, reference, tmp_path):
    """`jamba generate --address HEAD:6379 --stages 2 --placement-strategy STRICT_SPREAD`, run on the
    head as a user would there (its own process, in the head's namespace)."""
    lm, _ = models
    ref, _, tok = reference
    rows = [{"prompt": "Hello from the head", "max_new_tokens": 5}, {"input_ids": [1, 2, 3], "max_new_tokens": 3}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _stage_actors()
    r = hosts.run("head", [sys.executable, "-m", "cluster.cli", "generate", "--model", str(lm), "--input",
                           str(tmp_path / "in.jsonl"), "--stages", "2", "--placement-strategy", "STRICT_SPREAD",
                           "--address", hosts.gcs_address], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    want = ref.generate([tok.encode(rows[0]["prompt"]), rows[1]["input_ids"]],
                        [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=3)])
    assert [o["output_ids"] for o in out] == [w.output_ids for w in want]
    stages = {a: ip for a, ip in _stage_actors().items() if a not in before}
    assert len(stages) == 2 and len({hosts.name_of(ip) for ip in stages.values()}) == 2


def test_serve_across_hosts_streams_from_a_client_elsewhere(hosts, models, reference):
    """Serve's proxies on the head only, listening on its address; the application's two stages on
    two hosts. This process, on another address, streams through gRPC and the OpenAI API."""
    lm, _ = models
    ref, _, tok = reference
    head = hosts.head.address
    serve.start(proxy_location="HeadOnly", grpc_options=grpc_options(GRPC_PORT),
                http_options={"host": head, "port": HTTP_PORT})
    try:
        deploy_apps({"lm": {"model": str(lm), "stages": 2, "layer_split": "3,5", "placement_strategy": "STRICT_SPREAD",
                            "cpus_per_stage": 0.5, "max_batch_tokens": 16, "route_prefix": "/"}})
        want = ref.generate([tok.encode(p) for p in PROMPTS], [SamplingParams(max_new_tokens=8) for _ in PROMPTS])
        with JambaClient(f"{head}:{GRPC_PORT}", application="lm", timeout=60) as c:
            for p, w in zip(PROMPTS, want):
                stream = c.generate_stream(p, max_new_tokens=8)
                assert [t for d in stream for t in d.token_ids] == w.output_ids == stream.completion.output_ids
        oai = openai.OpenAI(base_url=f"http://{head}:{HTTP_PORT}/v1", api_key="unused", max_retries=0, timeout=60)
        for p, w in zip(PROMPTS, want):
            chunks = oai.completions.create(model="lm", prompt=p, max_tokens=8, temperature=0, stream=True)
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == w.text
        stats = serve.get_app_handle("lm").stats.remote().result()
    finally:
        serve.shutdown()
    stage_hosts = [hosts.name_of(a) for a in stats["dataplane"]["inboxes"]]
    assert len(set(stage_hosts)) == 2 and "client" not in stage_hosts  # two hosts, neither the driver's
    assert hosts.name_of(stats["dataplane"]["answers"]) in WORKER_HOSTS  # the replica's host
    assert all(s["dataplane"]["microbatches"] > 0 for s in stats["stages"])


def test_batch_job_stages_span_hosts(hosts, models, reference, tmp_path):
    lm, _ = models
    ref, _, _ = reference
    rows = [{"id": i, "prompt": f"{p} ({i})", "max_new_tokens": 3 + i % 4} for i, p in enumerate(PROMPTS * 3)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _stage_actors()
    summary = run_job(BatchConfig("generate", [str(path)], str(tmp_path / "out"),
                                  PipelineConfig(str(lm), num_stages=3, layer_split="2,3,3",
                                                 placement_strategy="STRICT_SPREAD", max_batch_tokens=16),
                                  batch_size=4, progress_interval=0.5))
    assert summary["complete"] and summary["rows_ok"] == len(rows)
    want, _ = run_chunk(ref, "generate", list(enumerate(map(json.dumps, rows), 1)))
    got = {r["source_row"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    assert [got[i]["output_ids"] for i in range(1, len(rows) + 1)] == [w["output_ids"] for w in want]
    stages = [ip for a, ip in _stage_actors().items() if a not in before]
    assert sorted(hosts.name_of(ip) for ip in stages) == WORKER_HOSTS

"""The service when things go wrong, through Ray Serve's real gRPC port: a full queue answers
RESOURCE_EXHAUSTED with a retry hint, TLS works through a terminating proxy, and a stage that
cannot be brought back fails requests with UNAVAILABLE until Serve has replaced the replica.

One small application ("tiny"): one slot and a queue of one, so "full" is reached by two
requests, deterministically; stage actors that are not restarted (max_restarts 0), so killing
one makes recovery impossible; a 1 s health check, so Serve notices quickly."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import pytest
import ray
from ray import serve

from client import JambaClient, JambaError
from cluster.runtime.local import LocalRunner
from stages.loading import load_stage
from stages.sequence import SamplingParams
from stages.tokenizer import Tokenizer

from .harness import serve_apps, until
from .tls_terminator import tls_terminator

PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def service(models):
    lm = str(models[0])
    apps = {"tiny": {"model": lm, "stages": 2, "layer_split": "4,4", "cpus_per_stage": 0.25, "num_slots": 1,
                     "max_queue": 1, "max_restarts": 0, "health_check_period_s": 1, "health_check_timeout_s": 10},
            "paced": {"model": lm, "stages": 1, "cpus_per_stage": 0.25, "stream_interval_ms": 1000}}
    # metrics show up in the test's time
    with serve_apps(apps, system_config={"metrics_report_interval_ms": 500}) as address:
        yield address


@pytest.fixture(scope="module")
def reference(models):
    lm, _ = models
    tok = Tokenizer.from_dir(lm)
    return LocalRunner(load_stage(lm)[0], tok), tok


def _stats() -> dict:
    return serve.get_app_handle("tiny").stats.remote().result()


def test_full_queue_gives_resource_exhausted_with_a_retry_hint(service, reference):
    ref, tok = reference
    want = ref.generate([tok.encode(PROMPT)], [SamplingParams(max_new_tokens=4, ignore_eos=True)])[0].output_ids
    with JambaClient(service, application="tiny", timeout=120) as c:
        holder = c.generate_stream("hold the only slot", max_new_tokens=1500, ignore_eos=True)
        next(iter(holder))  # admitted: the one slot is taken
        waiter = c.generate_stream(PROMPT, max_new_tokens=4, ignore_eos=True)
        until(lambda: _stats()["scheduler"]["waiting"] == 1, what="the second request to queue")

        with pytest.raises(JambaError) as e:
            c.generate(["one too many"], max_new_tokens=2)
        assert e.value.code_name == "RESOURCE_EXHAUSTED" and "queue bound 1" in e.value.details
        assert 0.1 <= e.value.retry_after <= 60, e.value.details
        with pytest.raises(JambaError, match="RESOURCE_EXHAUSTED.*retry after"):
            list(c.generate_stream("one too many", max_new_tokens=2))

        # Patient clients (a call and a stream) wait out the refusals as hinted, and get in once
        # the line moves.
        patient: dict = {}
        with JambaClient(service, application="tiny", timeout=120, wait_when_busy=120) as p:
            def stream():
                patient["stream"] = [x for d in p.generate_stream(PROMPT, max_new_tokens=4, ignore_eos=True)
                                     for x in d.token_ids]
            threads = [threading.Thread(target=lambda: patient.update(
                           call=p.generate([PROMPT], max_new_tokens=4, ignore_eos=True)[0].output_ids)),
                       threading.Thread(target=stream)]
            for t in threads:
                t.start()
            time.sleep(1.5)  # refused at least once meanwhile
            assert not patient
            holder.close()  # the holder leaves: the waiter, then the patient clients get the slot
            assert [x for d in waiter for x in d.token_ids] == want
            for t in threads:
                t.join(timeout=120)
    assert patient == {"call": want, "stream": want}
    s = until(lambda: (st := _stats())["scheduler"]["slots_in_use"] == 0 and st, what="the slot to be freed")
    assert s["scheduler"]["waiting"] == 0 and [st["used_slots"] for st in s["stages"]] == [0, 0]


def _metrics() -> list[str]:
    """The Prometheus samples Ray exports on this node (ray.util.metrics are prefixed `ray_`)."""
    [node] = ray.nodes()
    body = urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).read()
    return [line for line in body.decode().splitlines() if line.startswith("ray_jamba_")]


def test_metrics_count_requests_by_status(service):
    """Runs after the queue-full test: its refusals, its streams and the pipeline's health are
    on Ray's Prometheus endpoint."""
    def sample(name: str, *labels: str) -> float | None:
        for line in _metrics():  # Serve tags every sample with its application
            if line.startswith(name + "{") and all(label in line for label in labels + ('application="tiny"',)):
                return float(line.rsplit(" ", 1)[1])
        return None

    long = "The same long prompt, sent twice, so that its blocks come from the prefix cache. " * 5
    with JambaClient(service, application="tiny", timeout=120) as c:
        for _ in range(2):
            c.generate([long], max_new_tokens=1)
    assert until(lambda: (sample("ray_jamba_prefix_cache_hits_total") or 0) >= 64, what="prefix-cache hits")
    assert sample("ray_jamba_prefix_cache_queries_total") >= 2 * 64
    assert until(lambda: (sample("ray_jamba_requests_total", 'code="RESOURCE_EXHAUSTED"', 'method="Generate"') or 0) >= 1,
                  what="the refusal to be counted")
    assert until(lambda: (sample("ray_jamba_requests_total", 'code="OK"', 'method="GenerateStream"') or 0) >= 1,
                  what="a finished stream to be counted")
    assert until(lambda: (sample("ray_jamba_time_to_first_token_seconds_count") or 0) >= 1, what="TTFT samples")
    assert until(lambda: sample("ray_jamba_pipeline_up") == 1.0, what="the pipeline_up gauge")
    assert sample("ray_jamba_stage_recoveries") == 0.0


def test_stream_interval_groups_tokens_into_fewer_messages(service, reference):
    """stream_interval_ms 1000: the first token goes out at once, the ones produced in the next
    second go out together; the stream's tokens and text are unchanged."""
    ref, tok = reference
    want = ref.generate([tok.encode(PROMPT)], [SamplingParams(max_new_tokens=12, ignore_eos=True)])[0]
    with JambaClient(service, application="paced", timeout=120) as c:
        stream = c.generate_stream(PROMPT, max_new_tokens=12, ignore_eos=True)
        deltas = list(stream)
    assert [t for d in deltas for t in d.token_ids] == want.output_ids == stream.completion.output_ids
    assert "".join(d.text for d in deltas) == want.text
    assert len(deltas[0].token_ids) == 1 and len(deltas) < 12, [len(d.token_ids) for d in deltas]


def test_tls_through_a_terminating_proxy(service, reference, pki):
    """The deployment's TLS story: a terminator in front of Serve's plaintext port (Envoy in
    k8s/); the client library speaks TLS, optionally with a client certificate, end to end."""
    ref, tok = reference
    want = ref.generate([tok.encode(PROMPT)], [SamplingParams(max_new_tokens=6)])[0].output_ids
    with tls_terminator(service, pki["server_cert"], pki["server_key"]) as tls_address:
        with JambaClient(tls_address, application="tiny", timeout=60, tls=True, root_certificates=pki["ca"]) as c:
            assert c.generate([PROMPT], max_new_tokens=6)[0].output_ids == want
            assert [x for d in c.generate_stream(PROMPT, max_new_tokens=6) for x in d.token_ids] == want
        with JambaClient(tls_address, application="tiny", timeout=10, retry=None) as c:
            with pytest.raises(JambaError, match="UNAVAILABLE"):
                c.model_info()  # plaintext to the TLS port
    with tls_terminator(service, pki["server_cert"], pki["server_key"], client_ca_pem=pki["ca"]) as mtls_address:
        with JambaClient(mtls_address, application="tiny", timeout=60, tls=True, root_certificates=pki["ca"],
                         private_key=pki["client_key"], certificate_chain=pki["client_cert"]) as c:
            assert c.generate([PROMPT], max_new_tokens=6)[0].output_ids == want
        with JambaClient(mtls_address, application="tiny", timeout=10, tls=True, root_certificates=pki["ca"],
                         retry=None) as c:
            with pytest.raises(JambaError, match="UNAVAILABLE"):
                c.model_info()  # no client certificate


def test_unrecoverable_stage_gives_unavailable_and_serve_replaces_the_replica(service, reference):
    """Runs last: it kills the replica's stage for good (max_restarts 0)."""
    ref, tok = reference
    want = ref.generate([tok.encode(PROMPT)], [SamplingParams(max_new_tokens=8)])[0].output_ids
    with JambaClient(service, application="tiny", timeout=120, retry=None) as c:
        assert c.generate([PROMPT], max_new_tokens=8)[0].output_ids == want
        old = _stats()
        stream = c.generate_stream("doomed", max_new_tokens=1500, ignore_eos=True)
        next(iter(stream))
        os.kill(old["stages"][1]["pid"], signal.SIGKILL)
        with pytest.raises(JambaError) as e:
            list(stream)
        assert e.value.code_name == "UNAVAILABLE", str(e.value)
        assert "could not be brought back: stage 1 is gone for good" in e.value.details

        # Serve sees the failed health check and starts a fresh replica (new pipeline, new
        # stages); until then requests fail fast with UNAVAILABLE, never hang or succeed wrongly.
        codes = set()

        def serving_again():
            try:
                return c.generate([PROMPT], max_new_tokens=8, timeout=30)[0].output_ids
            except JambaError as err:
                codes.add(err.code_name)
                return None

        assert until(serving_again, timeout=180, what="a replacement replica") == want
    assert codes <= {"UNAVAILABLE"}, codes
    new = _stats()
    assert {st["pid"] for st in new["stages"]}.isdisjoint(st["pid"] for st in old["stages"])
    assert new["scheduler"]["recoveries"] == 0 and new["scheduler"]["slots_in_use"] == 0

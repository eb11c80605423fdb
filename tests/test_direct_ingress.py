"""The service under Ray Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): the replica
serves gRPC on its own port, with no proxy hop (about 1.5x the streaming throughput on this
machine, see BENCHMARKS.md). The same answers, status codes and cancellation as through the proxy."""

from __future__ import annotations

import pytest
from ray import serve

from client import JambaClient, JambaError
from cluster.runtime.local import LocalRunner
from stages.loading import load_stage
from stages.sequence import SamplingParams
from stages.tokenizer import Tokenizer

from .harness import free_port, serve_apps, until

PROMPTS = ["The weather today is", "Trains leave at noon and"]


@pytest.fixture(scope="module")
def replica_address(models):
    """Yields "127.0.0.1:PORT" of the one replica's own gRPC server."""
    port = free_port()
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",  # read by Serve's processes
           "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(port), "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(port + 10),
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}  # a quick shutdown
    apps = {"lm": {"model": str(models[0]), "stages": 2, "layer_split": "4,4", "cpus_per_stage": 0.25,
                   "num_slots": 2, "max_queue": 1}}
    with serve_apps(apps, env=env):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def reference(models):
    lm, _ = models
    tok = Tokenizer.from_dir(lm)
    return LocalRunner(load_stage(lm)[0], tok), tok


def _stats() -> dict:
    return serve.get_app_handle("lm").stats.remote().result()


def test_same_answers_as_offline(replica_address, reference):
    ref, tok = reference
    want = ref.generate([tok.encode(p) for p in PROMPTS], [SamplingParams(max_new_tokens=8) for _ in PROMPTS])
    with JambaClient(replica_address, application="lm", timeout=60) as c:
        assert [g.output_ids for g in c.generate(PROMPTS, max_new_tokens=8)] == [w.output_ids for w in want]
        stream = c.generate_stream(PROMPTS[0], max_new_tokens=8)
        assert [t for d in stream for t in d.token_ids] == want[0].output_ids == stream.completion.output_ids
        scores = c.score([PROMPTS[1]])
    assert scores[0].token_logprobs[1:] == pytest.approx(ref.score([tok.encode(PROMPTS[1])])[0][1:], abs=1e-4)


def test_status_codes(replica_address):
    with JambaClient(replica_address, application="lm", timeout=60, retry=None) as c:
        with pytest.raises(JambaError) as e:
            c.generate(["hi"], top_p=1.5)
        assert e.value.code_name == "INVALID_ARGUMENT" and "params.top_p" in e.value.details
        with pytest.raises(JambaError) as e:
            c.classify(["hi"])
        assert e.value.code_name == "FAILED_PRECONDITION"
        with pytest.raises(JambaError) as e:
            c.generate(["slow"], max_new_tokens=3000, ignore_eos=True, timeout=1.0)
        assert e.value.code_name == "DEADLINE_EXCEEDED"
        # A full queue: two slots held, one request waiting, the next refused with a retry hint.
        held = [c.generate_stream(f"hold {i}", max_new_tokens=2000, ignore_eos=True) for i in range(2)]
        for h in held:
            next(iter(h))
        waiting = c.generate_stream("wait", max_new_tokens=2, ignore_eos=True)
        until(lambda: _stats()["scheduler"]["waiting"] == 1, what="the third request to queue")
        with pytest.raises(JambaError) as e:
            c.generate(["refused"], max_new_tokens=2)
        assert e.value.code_name == "RESOURCE_EXHAUSTED" and e.value.retry_after is not None
        for h in held + [waiting]:
            h.close()  # cancelled: their slots are freed
    s = until(lambda: (st := _stats())["scheduler"]["slots_in_use"] == 0 and st, what="the slots to be freed")
    assert s["scheduler"]["waiting"] == 0
    assert [st["used_slots"] for st in s["stages"]] == [0, 0]

"""End to end: Ray Serve's gRPC proxy on a loopback port, the client library, the offline reference."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest
from ray import serve

from client import AsyncJambaClient, JambaClient, JambaError
from cluster.runtime.local import LocalRunner
from stages.loading import load_stage
from stages.sequence import SamplingParams
from stages.tokenizer import Tokenizer

from .harness import serve_apps


@pytest.fixture(scope="module")
def service(models):
    lm, cls = models
    apps = {"lm": {"model": str(lm), "stages": 2, "layer_split": "3,5", "cpus_per_stage": 0.25, "num_slots": 40,
                   "max_batch_tokens": 64},
            "cls": {"model": str(cls), "stages": 1, "cpus_per_stage": 0.25}}
    with serve_apps(apps) as address:
        yield address


@pytest.fixture(scope="module")
def reference(models):
    lm, cls = models
    tok = Tokenizer.from_dir(lm)
    return LocalRunner(load_stage(lm)[0], tok), LocalRunner(load_stage(cls)[0], tok), tok


PROMPTS = ["The weather today is", "Cooking rice takes", "Trains leave at noon and", "Hello"]


def _stats(app: str) -> dict:
    return serve.get_app_handle(app).stats.remote().result()


def test_unary_stream_and_offline_agree(service, reference):
    ref_lm, _, tok = reference
    want = ref_lm.generate([tok.encode(p) for p in PROMPTS], [SamplingParams(max_new_tokens=10) for _ in PROMPTS])
    with JambaClient(service, application="lm", timeout=60) as c:
        unary = c.generate(PROMPTS, max_new_tokens=10)
        assert [u.output_ids for u in unary] == [w.output_ids for w in want]
        assert [u.text for u in unary] == [w.text for w in want]
        for p, w in zip(PROMPTS, want):
            stream = c.generate_stream(p, max_new_tokens=10)
            deltas = list(stream)
            final = stream.completion
            assert [t for d in deltas for t in d.token_ids] == w.output_ids == final.output_ids
            assert "".join(d.text for d in deltas) == w.text == final.text
            assert final.finish_reason == w.finish_reason
            assert final.prompt_tokens == len(tok.encode(p)) and final.completion_tokens == len(w.output_ids)
        chat = [{"role": "user", "content": "Say hello."}]
        ref_chat = ref_lm.generate([tok.encode_chat(chat)], [SamplingParams(max_new_tokens=6)])[0]
        assert c.chat(chat, max_new_tokens=6).output_ids == ref_chat.output_ids
        seeded = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=11)
        assert c.generate([PROMPTS[0]], **seeded)[0].output_ids == \
            ref_lm.generate([tok.encode(PROMPTS[0])], [SamplingParams(**seeded)])[0].output_ids


def test_score_and_classify_equal_offline(service, reference):
    ref_lm, ref_cls, tok = reference
    with JambaClient(service, application="lm") as c:
        got = c.score(PROMPTS + [[1, 7, 300, 12]])
    want = ref_lm.score([tok.encode(p) for p in PROMPTS] + [[1, 7, 300, 12]])
    for g, w in zip(got, want):
        assert g.token_logprobs[0] is None
        assert g.token_logprobs[1:] == pytest.approx(w[1:], abs=1e-4)
        assert g.sum_logprob == pytest.approx(sum(w[1:]), abs=1e-3)
    with JambaClient(service, application="cls") as c:
        got = c.classify(PROMPTS)
        info = c.model_info()
    for g, w in zip(got, ref_cls.classify([tok.encode(p) for p in PROMPTS])):
        assert g.logits == pytest.approx(w, abs=1e-4)
        assert g.label == info.labels[max(range(len(w)), key=w.__getitem__)]
    assert info.task == "classification" and info.labels == ["computers", "people", "politics", "science", "songs-poems"]


def test_model_info(service):
    with JambaClient(service, application="lm") as c:
        info = c.model_info()
    assert info.task == "causal-lm" and info.num_layers == 8
    assert [(s.start_layer, s.end_layer) for s in info.stages] == [(0, 3), (3, 8)]
    assert info.quantize == ""  # weights as stored (jamba serve --quantize would name the mode)
    # the paged KV cache and the prefix cache, at their defaults for 40 slots of this model's 4096 tokens
    assert (info.block_size, info.num_blocks, info.num_snapshots, info.prefix_cache) == (64, 40 * 64, 80, True)
    assert info.max_context == 4096


def test_prefix_cache_hits_are_reported_in_usage(service, reference):
    """A prompt sent again takes its full blocks from the prefix cache, says so in its usage, and
    gets the same tokens; one that shares nothing is computed in full."""
    ref, _, tok = reference
    prompt = tok.encode("A question asked twice, about the tides of a long grey sea, " * 9)
    assert len(prompt) > 130
    want = ref.generate([prompt], [SamplingParams(max_new_tokens=6, ignore_eos=True)])[0]
    with JambaClient(service, application="lm", timeout=120) as c:
        first = c.generate([prompt], max_new_tokens=6, ignore_eos=True)[0]
        again = c.generate([prompt], max_new_tokens=6, ignore_eos=True)[0]
        stream = c.generate_stream(prompt, max_new_tokens=6, ignore_eos=True)
        list(stream)
    assert first.output_ids == again.output_ids == stream.completion.output_ids == want.output_ids
    assert first.cached_tokens == 0 and first.prompt_tokens == len(prompt)
    hit = (len(prompt) - 1) // 64 * 64  # whole blocks short of the last token
    assert again.cached_tokens == hit and stream.completion.cached_tokens == hit


BAD = [  # (application, call, kwargs, code, message fragment)
    ("lm", "generate", dict(prompts=[""]), "INVALID_ARGUMENT", "prompts[0].text is empty"),
    ("lm", "generate", dict(prompts=[[1, 99999]]), "INVALID_ARGUMENT", "prompts[0].token_ids has ids out of range"),
    ("lm", "generate", dict(prompts=["hi"], temperature=-1.0), "INVALID_ARGUMENT", "params.temperature"),
    ("lm", "generate", dict(prompts=["hi"], top_p=1.5), "INVALID_ARGUMENT", "params.top_p"),
    ("lm", "generate", dict(prompts=["hi"], max_new_tokens=0), "INVALID_ARGUMENT", "params.max_new_tokens"),
    ("lm", "generate", dict(prompts=["hi"], max_new_tokens=100000), "INVALID_ARGUMENT", "max_new_tokens"),
    ("lm", "generate", dict(prompts=[[{"role": "wizard", "content": "x"}]]), "INVALID_ARGUMENT", "wizard"),
    ("lm", "generate", dict(prompts=[]), "INVALID_ARGUMENT", "prompts is empty"),
    ("lm", "classify", dict(inputs=["hi"]), "FAILED_PRECONDITION", "Classify is not available"),
    ("cls", "generate", dict(prompts=["hi"]), "FAILED_PRECONDITION", "Generate is not available"),
    ("cls", "score", dict(inputs=["hi"]), "FAILED_PRECONDITION", "Score is not available"),
    ("lm", "score", dict(inputs=[[1] * 5000]), "INVALID_ARGUMENT", "more than the context"),
]


@pytest.mark.parametrize("app,call,kwargs,code,fragment", BAD, ids=[f"{b[1]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_status_codes(service, app, call, kwargs, code, fragment):
    with JambaClient(service, application=app, timeout=30) as c:
        with pytest.raises(JambaError) as e:
            getattr(c, call)(**kwargs)
        assert e.value.code_name == code and fragment in e.value.details, str(e.value)
        if app == "lm":  # still serving
            assert c.generate(["still there"], max_new_tokens=2)[0].finish_reason == "length"


def test_stream_errors_and_unknown_application(service):
    with JambaClient(service, application="lm") as c:
        with pytest.raises(JambaError, match="INVALID_ARGUMENT: prompt.text is empty"):
            list(c.generate_stream("", max_new_tokens=3))
    with JambaClient(service, application="nope", retry=None) as c:
        with pytest.raises(JambaError) as e:
            c.generate(["hi"])
        assert e.value.code_name == "NOT_FOUND" and "nope" in e.value.details


def _wait_until_idle(app: str, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while True:
        s = _stats(app)
        idle = s["scheduler"]["slots_in_use"] == 0 and all(st["used_slots"] == 0 for st in s["stages"])
        if idle or time.time() > deadline:
            return s
        time.sleep(0.2)


def test_cancelled_stream_frees_slots(service):
    # The 60 s deadline is a backstop: under heavy load Ray Serve has been seen to lose a cancel
    # between its proxy and the replica; the scheduler then still drops the request at its deadline.
    with JambaClient(service, application="lm", timeout=60) as c:
        for _ in range(3):
            stream = c.generate_stream("cancel me", max_new_tokens=2000, ignore_eos=True)
            next(iter(stream))
            stream.close()
    s = _wait_until_idle("lm")
    assert s["scheduler"]["slots_in_use"] == 0 and s["scheduler"]["waiting"] == 0
    assert [st["used_slots"] for st in s["stages"]] == [0, 0]


def test_deadline_exceeded_frees_slots(service):
    with JambaClient(service, application="lm") as c:
        with pytest.raises(JambaError) as e:
            c.generate(["too slow"], max_new_tokens=3000, ignore_eos=True, timeout=1.0)
        assert e.value.code_name == "DEADLINE_EXCEEDED"
    s = _wait_until_idle("lm")
    assert s["scheduler"]["slots_in_use"] == 0 and [st["used_slots"] for st in s["stages"]] == [0, 0]


def test_64_concurrent_streams(service, reference):
    """64 concurrent streams of mixed lengths: no errors, each equal to its solo offline run."""
    import asyncio

    ref_lm, _, tok = reference
    prompts = [f"{PROMPTS[i % 4]} {i}" + " and more" * (i % 7) for i in range(64)]
    want = ref_lm.generate([tok.encode(p) for p in prompts], [SamplingParams(max_new_tokens=6 + i % 5) for i in range(64)])

    async def run():
        async with AsyncJambaClient(service, application="lm", timeout=120) as c:
            async def one(i):
                stream = c.generate_stream(prompts[i], max_new_tokens=6 + i % 5)
                ids = [t async for d in stream for t in d.token_ids]
                return ids, stream.completion
            return await asyncio.gather(*[one(i) for i in range(64)])

    got = asyncio.run(run())
    for (ids, final), w in zip(got, want):
        assert ids == final.output_ids == w.output_ids


def test_client_cli_against_the_service(service, reference, tmp_path):
    ref_lm, _, tok = reference
    rows = [{"prompt": PROMPTS[0], "max_new_tokens": 5}, {"input_ids": [1, 2, 3], "max_new_tokens": 4}, "not json"]
    (tmp_path / "in.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "client", "generate", "--address", service,
                        "--application", "lm", "--input", str(tmp_path / "in.jsonl")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "in.jsonl:3:" in r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    want = ref_lm.generate([tok.encode(PROMPTS[0]), [1, 2, 3]], [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=4)])
    assert [o["output_ids"] for o in out[:2]] == [w.output_ids for w in want]
    assert out[2]["line"] == 3 and "malformed JSON" in out[2]["error"]


# ---- the hostile-input table (raw protos, so anything can be sent) -------------------------------------
def _gen(prompts=None, **params):
    from protos import jamba_pb2 as pb

    return pb.GenerateRequest(prompts=prompts if prompts is not None else [pb.Prompt(text="hi")],
                              params=pb.SamplingParams(**params))


def _hostile_table():
    from protos import jamba_pb2 as pb

    P, T, C, M = pb.Prompt, pb.TokenIds, pb.Chat, pb.ChatMessage
    inv, fp = "INVALID_ARGUMENT", "FAILED_PRECONDITION"
    nan, inf = float("nan"), float("inf")
    return [
        ("empty text", "Generate", _gen([P(text="")]), inv, "prompts[0].text is empty"),
        ("unset prompt", "Generate", _gen([P()]), inv, "prompts[0] is empty"),
        ("no prompts", "Generate", _gen([]), inv, "prompts is empty"),
        ("empty token ids", "Generate", _gen([P(token_ids=T(ids=[]))]), inv, "prompts[0].token_ids is empty"),
        ("negative token id", "Generate", _gen([P(token_ids=T(ids=[1, -5]))]), inv, "out of range"),
        ("token id too big", "Generate", _gen([P(token_ids=T(ids=[1, 4096]))]), inv, "out of range [0, 4096)"),
        ("huge token id", "Generate", _gen([P(token_ids=T(ids=[2**62]))]), inv, "out of range"),
        ("prompt over context", "Score", pb.ScoreRequest(inputs=[P(token_ids=T(ids=[1] * 5000))]), inv, "more than the context"),
        ("max_new_tokens 0", "Generate", _gen(max_new_tokens=0), inv, "params.max_new_tokens"),
        ("max_new_tokens negative", "Generate", _gen(max_new_tokens=-3), inv, "params.max_new_tokens"),
        ("max_new_tokens absurd", "Generate", _gen(max_new_tokens=10**12), inv, "max_new_tokens"),
        ("temperature negative", "Generate", _gen(temperature=-0.1), inv, "params.temperature"),
        ("temperature NaN", "Generate", _gen(temperature=nan), inv, "params.temperature"),
        ("temperature inf", "Generate", _gen(temperature=inf), inv, "params.temperature"),
        ("top_p zero", "Generate", _gen(top_p=0.0), inv, "params.top_p"),
        ("top_p above one", "Generate", _gen(top_p=1.01), inv, "params.top_p"),
        ("top_p NaN", "Generate", _gen(top_p=nan), inv, "params.top_p"),
        ("top_k negative", "Generate", _gen(top_k=-1), inv, "params.top_k"),
        ("huge stop list", "Generate", _gen(stop=["x"] * 10_000), inv, "params.stop"),
        ("huge stop string", "Generate", _gen(stop=["x" * 100_000]), inv, "params.stop"),
        ("empty stop string", "Generate", _gen(stop=[""]), inv, "params.stop"),
        ("stop id out of range", "Generate", _gen(stop_token_ids=[9999]), inv, "params.stop_token_ids"),
        ("unknown chat role", "Generate", _gen([P(chat=C(messages=[M(role="wizard", content="x")]))]), inv, "wizard"),
        ("empty chat", "Generate", _gen([P(chat=C(messages=[]))]), inv, "prompts[0].chat is empty"),
        ("chat role empty", "Generate", _gen([P(chat=C(messages=[M(role="", content="x")]))]), inv, "prompts[0].chat"),
        ("10,000 prompts", "Generate", _gen([P(text="hi")] * 10_000), inv, "at most 256"),
        ("second prompt bad", "Generate", _gen([P(text="ok"), P(token_ids=T(ids=[5000]))]), inv, "prompts[1].token_ids"),
        ("classify on an LM", "Classify", pb.ClassifyRequest(inputs=[P(text="hi")]), fp, "Classify is not available"),
        ("empty classify", "Classify", pb.ClassifyRequest(inputs=[]), fp, "Classify is not available"),
        ("score with no inputs", "Score", pb.ScoreRequest(inputs=[]), inv, "inputs is empty"),
        ("stream with no prompt", "GenerateStream", pb.GenerateStreamRequest(), inv, "prompt is empty"),
        ("stream with bad top_p", "GenerateStream", pb.GenerateStreamRequest(prompt=P(text="x"), params=pb.SamplingParams(top_p=2.0)),
         inv, "params.top_p"),
    ]


def test_hostile_input_table(service, reference):
    """Every malformed or hostile request gets its status code and a message naming the field;
    afterwards the service is healthy and answers a normal request exactly as before."""
    from protos import jamba_pb2 as pb
    from protos import jamba_pb2_grpc as pb_grpc

    ref_lm, _, tok = reference
    table = _hostile_table()
    assert len(table) >= 30
    channel = grpc.insecure_channel(service, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.JambaServiceStub(channel)
    md = [("application", "lm")]
    failures = []
    try:
        for name, method, request, code, fragment in table:
            try:
                call = getattr(stub, method)
                result = call(request, metadata=md, timeout=60)
                if method == "GenerateStream":
                    list(result)
                failures.append(f"{name}: no error")
            except grpc.RpcError as e:
                if e.code().name != code or fragment not in (e.details() or ""):
                    failures.append(f"{name}: got {e.code().name}: {e.details()}")
        # transport-level abuse: a deadline of 1 ms, an unknown application, an oversized message
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_gen(max_new_tokens=50), metadata=md, timeout=0.001)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_gen(), metadata=[("application", "no-such-app")], timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_gen([pb.Prompt(text="x" * (20 << 20))]), metadata=md, timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the server's message size limit
        # still healthy, and a normal request gives exactly the offline answer
        out = stub.Generate(_gen([pb.Prompt(text=PROMPTS[0])], max_new_tokens=8), metadata=md, timeout=60)
        want = ref_lm.generate([tok.encode(PROMPTS[0])], [SamplingParams(max_new_tokens=8)])[0]
        assert list(out.completions[0].output_ids) == want.output_ids
    finally:
        channel.close()
    assert not failures, "\n".join(failures)


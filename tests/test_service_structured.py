"""Structured output and the logits processors through the gRPC API, end to end: Ray Serve's gRPC
proxy on a loopback port, a 2-stage pipeline, the client library and `jamba client`, against the
single-process engine. The engine's own checks (each processor against a reference, schemas that
always validate, replay) are tests/test_structured.py; here it is the wire: every field reaches
the engine as it was meant, the answers come back, and hostile values are refused naming the
field while the service stays up."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import jsonschema
import pytest

from client import JambaClient, JambaError
from stages.sequence import SamplingParams, Structure

from .harness import serve_apps
from .test_structured import SCHEMAS

PROMPTS = ["Your fortune:", "Q: What is a monad?\nA:"]


@pytest.fixture(scope="module")
def service(models):
    lm, _ = models
    apps = {"lm": {"model": str(lm), "stages": 2, "layer_split": "3,5", "cpus_per_stage": 0.25, "num_slots": 8,
                   "max_batch_tokens": 64}}
    with serve_apps(apps) as address:
        yield address


def _structured(schema: dict, max_new_tokens: int = 160, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, structure=Structure("json_schema", json.dumps(schema)), **kw)


def test_json_schema_outputs_validate_unary_and_streaming(service, reference):
    """Every schema, greedy and seeded-sampled, unary (a batch of prompts) and streamed: the output
    parses and validates and ends because the JSON is complete; the stream's text is the unary
    call's; greedy outputs are the single-process engine's tokens."""
    ref, _, tok = reference
    with JambaClient(service, application="lm", timeout=300) as c:
        for schema in SCHEMAS:
            want = ref.generate([tok.encode(p) for p in PROMPTS], [_structured(schema) for _ in PROMPTS])
            for temperature, seed in ((0.0, None), (1.0, 7)):
                kw = dict(json_schema=schema, max_new_tokens=160, temperature=temperature, seed=seed)
                unary = c.generate(PROMPTS, **kw)
                for u in unary:
                    assert u.finish_reason == "stop", u.text
                    jsonschema.validate(json.loads(u.text), schema)
                if temperature == 0:
                    assert [u.output_ids for u in unary] == [w.output_ids for w in want]
                stream = c.generate_stream(PROMPTS[0], **kw)
                deltas = list(stream)
                assert [t for d in deltas for t in d.token_ids] == stream.completion.output_ids == unary[0].output_ids
                assert "".join(d.text for d in deltas) == stream.completion.text == unary[0].text
                assert stream.completion.finish_reason == "stop"


def test_regex_grammar_and_json_object_reach_the_engine(service, reference):
    ref, _, tok = reference
    cases = [(dict(regex=r"(yes|no), because [a-z ]{3,20}\."), Structure("regex", r"(yes|no), because [a-z ]{3,20}\.")),
             (dict(grammar='start: "Answer: " %json {"type": "array", "items": {"type": "integer"}, "maxItems": 3}'),
              Structure("lark", 'start: "Answer: " %json {"type": "array", "items": {"type": "integer"}, "maxItems": 3}')),
             (dict(json_object=True), Structure("json_object"))]
    want = ref.generate([tok.encode(PROMPTS[0])] * 3, [SamplingParams(max_new_tokens=40, structure=s) for _, s in cases])
    with JambaClient(service, application="lm", timeout=120) as c:
        for (kw, _), w in zip(cases, want):
            [got] = c.generate([PROMPTS[0]], max_new_tokens=40, **kw)
            assert got.output_ids == w.output_ids and got.finish_reason == w.finish_reason
    assert want[0].text.startswith(("yes, because", "no, because")) and want[1].text.startswith("Answer: [")


def test_top_logprobs_and_processors_round_trip(service, reference):
    """top_logprobs, logit_bias, min_tokens and the three penalties give the single-process engine's
    tokens and alternatives, unary and streamed; each alternative carries its token's text."""
    ref, _, tok = reference
    prompt = tok.encode(PROMPTS[1])
    [plain] = ref.generate([prompt], [SamplingParams(max_new_tokens=8)])
    bias = {plain.output_ids[0]: -100.0, 42: 2.5}  # the greedy first token, banned in effect
    params = dict(max_new_tokens=8, top_logprobs=3, logprobs=True, logit_bias=bias, min_tokens=6,
                  repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25)
    [want] = ref.generate([prompt], [SamplingParams(**params)])
    assert want.output_ids[0] != plain.output_ids[0]
    with JambaClient(service, application="lm", timeout=120) as c:
        [got] = c.generate([PROMPTS[1]], **params)
        stream = c.generate_stream(PROMPTS[1], **params)
        deltas = list(stream)
    assert got.output_ids == want.output_ids == stream.completion.output_ids
    assert len(got.top_logprobs) == len(got.output_ids) and all(len(step) == 3 for step in got.top_logprobs)
    for step, ref_step in zip(got.top_logprobs, want.top_logprobs):
        assert [t.token_id for t in step] == [t for t, _ in ref_step]
        assert [t.logprob for t in step] == pytest.approx([lp for _, lp in ref_step], abs=1e-4)
        assert [t.token for t in step] == [tok.decode([t.token_id], skip_special_tokens=False) for t in step]
        assert [t.logprob for t in step] == sorted((t.logprob for t in step), reverse=True)
    assert [step for d in deltas for step in d.top_logprobs] == stream.completion.top_logprobs == got.top_logprobs
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def _hostile_table():
    from protos import jamba_pb2 as pb

    P, SP = pb.Prompt, pb.SamplingParams
    inv = "INVALID_ARGUMENT"

    def gen(**params):
        return pb.GenerateRequest(prompts=[P(text="hi")], params=SP(**params))

    too_large = json.dumps({"type": "object", "additionalProperties": False,  # ~940 KB: under the size cap
                            "properties": {f"p{i:06d}": {"type": "integer", "minimum": i} for i in range(19000)}})
    return [
        ("not JSON Schema", gen(json_schema='{"type": "frobnicate"}'), inv, "params.json_schema: Invalid type: frobnicate"),
        ("schema not JSON", gen(json_schema="{not json"), inv, "params.json_schema: the JSON schema is not JSON"),
        ("schema over 1 MiB", gen(json_schema='{"type": "object", "x": "' + "y" * (1 << 20) + '"}'), inv,
         "params.json_schema must be text of at most 1048576 characters"),
        ("1 MB schema", gen(json_schema=too_large), inv, "params.json_schema: schema too large"),
        ("schema nested 100 deep", gen(json_schema='{"properties": {"a": ' * 100 + "{}" + "}}" * 100), inv,
         "params.json_schema: the JSON schema is nested more than"),
        ("regex matching nothing", gen(regex="[^\\s\\S]"), inv, "params.regex: the grammar matches no text at all"),
        ("regex malformed", gen(regex="a["), inv, "params.regex"),
        ("empty regex", gen(regex=""), inv, "params.regex regex needs its text"),
        ("lark undefined rule", gen(grammar="start: nowhere"), inv, "params.grammar"),
        ("top_logprobs 1000", gen(top_logprobs=1000), inv, "params.top_logprobs must be an integer in [0, 20]"),
        ("top_logprobs negative", gen(top_logprobs=-1), inv, "params.top_logprobs"),
        ("logit_bias id out of range", gen(logit_bias={99999: 1.0}), inv, "params.logit_bias keys must be token ids in [0, 4096)"),
        ("logit_bias negative id", gen(logit_bias={-1: 1.0}), inv, "params.logit_bias keys"),
        ("logit_bias value 1000", gen(logit_bias={5: 1000.0}), inv, "params.logit_bias values must be numbers in [-100, 100]"),
        ("logit_bias NaN", gen(logit_bias={5: float("nan")}), inv, "params.logit_bias values"),
        ("logit_bias 2,000 entries", gen(logit_bias={i: 1.0 for i in range(2000)}), inv, "params.logit_bias must map at most"),
        ("min_tokens past max", gen(min_tokens=100, max_new_tokens=10), inv, "params.min_tokens"),
        ("repetition_penalty 0", gen(repetition_penalty=0.0), inv, "params.repetition_penalty must be in (0, 10]"),
        ("frequency_penalty 3", gen(frequency_penalty=3.0), inv, "params.frequency_penalty must be in [-2, 2]"),
        ("presence_penalty NaN", gen(presence_penalty=float("nan")), inv, "params.presence_penalty"),
        ("stream with a bad schema", pb.GenerateStreamRequest(prompt=P(text="x"), params=SP(json_schema="[1, 2]")),
         inv, "params.json_schema: a JSON schema is an object or a boolean"),
    ]


def test_hostile_structures_and_processors(service, reference):
    """Every hostile value gets INVALID_ARGUMENT naming the field; afterwards the service answers a
    structured request exactly as before."""
    from protos import jamba_pb2 as pb
    from protos import jamba_pb2_grpc as pb_grpc

    ref, _, tok = reference
    channel = grpc.insecure_channel(service, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.JambaServiceStub(channel)
    failures = []
    try:
        for name, request, code, fragment in _hostile_table():
            try:
                if isinstance(request, pb.GenerateStreamRequest):
                    list(stub.GenerateStream(request, metadata=[("application", "lm")], timeout=120))
                else:
                    stub.Generate(request, metadata=[("application", "lm")], timeout=120)
                failures.append(f"{name}: no error")
            except grpc.RpcError as e:
                if e.code().name != code or fragment not in (e.details() or ""):
                    failures.append(f"{name}: got {e.code().name}: {e.details()}")
    finally:
        channel.close()
    assert failures == []
    [want] = ref.generate([tok.encode(PROMPTS[0])], [_structured(SCHEMAS[0])])
    with JambaClient(service, application="lm", timeout=120) as c:
        [got] = c.generate([PROMPTS[0]], json_schema=SCHEMAS[0], max_new_tokens=160)
        assert got.output_ids == want.output_ids
        with pytest.raises(JambaError, match="INVALID_ARGUMENT: params.top_logprobs"):
            list(c.generate_stream("x", top_logprobs=21))


def test_client_cli_with_a_schema_against_the_service(service, tmp_path):
    """`jamba client generate --json-schema FILE`: every row's output validates; a row's own regex
    replaces the schema; top_logprobs come back in the rows."""
    schema = SCHEMAS[1]
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    rows = [{"prompt": p, "temperature": t, "seed": 3, "max_new_tokens": 160} for p in PROMPTS for t in (0.0, 1.0)]
    rows.append({"prompt": "Yes or no?", "regex": "(yes|no)"})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "client", "generate", "--address", service,
                        "--application", "lm", "--input", str(tmp_path / "in.jsonl"), "--json-schema",
                        str(tmp_path / "schema.json"), "--top-logprobs", "2", "--timeout", "300"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    for o in out[:-1]:
        assert o["finish_reason"] == "stop"
        jsonschema.validate(json.loads(o["text"]), schema)
        assert len(o["top_logprobs"]) == len(o["output_ids"]) and all(len(s) == 2 for s in o["top_logprobs"])
    assert out[-1]["text"] in ("yes", "no")

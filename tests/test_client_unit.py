"""The gRPC client without the real service: conversions, import isolation, and the transport
features (retries, deadlines, metadata, stream cancellation, TLS, the CLI's error handling)
against a tiny JambaService with canned answers, served on 127.0.0.1 by grpc itself.

The canned server only exists to trigger what the real service cannot easily be made to do on
demand (UNAVAILABLE twice then success, a handler that never answers, a handshake without a
client certificate); what the answers mean is tested end to end against the real service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from client import AsyncJambaClient, Completion, JambaClient, JambaError, RetryPolicy
from client.cli import main as cli_main
from client.client import channel_options
from client.messages import (completion_from_pb, delta_from_pb, model_info_from_pb, sampling_params,
                             score_result_from_pb, to_prompt, to_prompts)
from protos import jamba_pb2 as pb
from protos import jamba_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


# ---- conversions ------------------------------------------------------------------------------
def test_prompts_from_text_ids_and_chat():
    assert to_prompt("hello") == pb.Prompt(text="hello")
    assert to_prompt([1, 2, 3]) == pb.Prompt(token_ids=pb.TokenIds(ids=[1, 2, 3]))
    assert to_prompt((4, 5)).token_ids.ids == [4, 5]
    chat = to_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert [(m.role, m.content) for m in chat.chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    built = pb.Prompt(text="as is")
    assert to_prompt(built) is built


@pytest.mark.parametrize("bad, err, words", [
    ([], ValueError, "empty list"),
    ([1, "2"], TypeError, "a prompt is a str"),
    ([True, False], TypeError, "a prompt is a str"),  # bools are not token ids
    (3, TypeError, "a prompt is a str"),
    ([{"role": "user"}], TypeError, "message 0 content must be a string"),
    ([{"role": "user", "content": "x", "tool_calls": []}], ValueError, "tool_calls"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], TypeError, "content must be a string"),
])
def test_bad_prompts_name_the_problem(bad, err, words):
    with pytest.raises(err, match=words):
        to_prompt(bad)


def test_a_batch_must_be_a_list_of_prompts():
    assert [p.WhichOneof("input") for p in to_prompts(["a", [1, 2], [{"role": "user", "content": "x"}]])] == [
        "text", "token_ids", "chat"]
    for single in ("one prompt", [1, 2, 3], [{"role": "user", "content": "x"}], pb.Prompt(text="x")):
        with pytest.raises(TypeError, match="single prompt: wrap it in a list"):
            to_prompts(single)
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        to_prompts(["ok", 7])


def test_sampling_params_set_only_what_is_given():
    p = sampling_params()
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        assert not p.HasField(name), name  # unset: the server's defaults apply
    assert list(p.stop) == [] and list(p.stop_token_ids) == [] and p.logprobs is False

    p = sampling_params(max_new_tokens=8, temperature=1, top_k=40, top_p=0.9, seed=2**63 + 5, stop="\n",
                        stop_token_ids=[2, 3], logprobs=True)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (8, 1.0, 40, 0.9, 2**63 + 5)
    assert list(p.stop) == ["\n"] and list(p.stop_token_ids) == [2, 3] and p.logprobs
    assert p.HasField("temperature") and isinstance(p.temperature, float)
    assert list(sampling_params(stop=["a", "b"]).stop) == ["a", "b"]
    assert sampling_params(temperature=0.0).HasField("temperature")  # an explicit 0 is sent


@pytest.mark.parametrize("kwargs, err, words", [
    ({"max_new_tokens": "8"}, TypeError, "max_new_tokens must be an integer"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an integer"),
    ({"top_k": 1.5}, TypeError, "top_k must be an integer"),
    ({"temperature": "hot"}, TypeError, "temperature must be a number"),
    ({"seed": -1}, ValueError, "seed must be in"),
    ({"stop": [1]}, TypeError, "stop must be a string or a list of strings"),
    ({"stop_token_ids": ["x"]}, TypeError, "stop_token_ids must be a list of integers"),
    ({"logprobs": 1}, TypeError, "logprobs must be true or false"),
    ({"max_new_tokens": 2**70}, ValueError, "max_new_tokens"),
])
def test_bad_sampling_params_name_the_field(kwargs, err, words):
    with pytest.raises(err, match=words):
        sampling_params(**kwargs)
    with pytest.raises(TypeError):
        sampling_params(temprature=1.0)  # a misspelt name is not silently ignored


def test_sampling_params_carry_processors_and_structures():
    p = sampling_params(top_logprobs=3, logit_bias={5: -100, 7: 1.5}, min_tokens=2, repetition_penalty=1.2,
                        frequency_penalty=0.5, presence_penalty=-0.5)
    assert (p.top_logprobs, dict(p.logit_bias), p.min_tokens) == (3, {5: -100.0, 7: 1.5}, 2)
    assert p.HasField("repetition_penalty") and p.repetition_penalty == pytest.approx(1.2)
    assert (p.frequency_penalty, p.presence_penalty) == (0.5, -0.5) and p.WhichOneof("structure") is None
    assert not sampling_params().HasField("repetition_penalty")  # unset: the server's 1 (off)

    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "additionalProperties": False}
    p = sampling_params(json_schema=schema)
    assert p.WhichOneof("structure") == "json_schema" and json.loads(p.json_schema) == schema
    assert sampling_params(json_schema='{"type": "integer"}').json_schema == '{"type": "integer"}'  # JSON text as is
    assert sampling_params(json_object=True).WhichOneof("structure") == "json_object"
    assert sampling_params(json_object=False).WhichOneof("structure") is None
    assert sampling_params(regex="(yes|no)").regex == "(yes|no)"
    assert sampling_params(grammar='start: "a"+').WhichOneof("structure") == "grammar"


@pytest.mark.parametrize("kwargs, err, words", [
    ({"json_schema": {"type": "object"}, "regex": "a"}, ValueError, "at most one of json_schema, json_object"),
    ({"json_object": True, "grammar": "start: x"}, ValueError, "at most one of"),
    ({"json_schema": 42}, TypeError, "json_schema must be a JSON Schema"),
    ({"regex": ["a"]}, TypeError, "regex must be a string"),
    ({"json_object": "yes"}, TypeError, "json_object must be true or false"),
    ({"logit_bias": {"5": 1.0}}, TypeError, "logit_bias keys must be token ids"),
    ({"logit_bias": {5: "up"}}, TypeError, r"logit_bias\[5\] must be a number"),
    ({"logit_bias": [5]}, TypeError, "logit_bias must map token ids"),
    ({"top_logprobs": 2.5}, TypeError, "top_logprobs must be an integer"),
    ({"presence_penalty": "high"}, TypeError, "presence_penalty must be a number"),
    ({"logit_bias": {2**70: 1.0}}, ValueError, "logit_bias"),
])
def test_bad_processor_and_structure_params_name_the_field(kwargs, err, words):
    with pytest.raises(err, match=words):
        sampling_params(**kwargs)


def test_top_logprobs_from_protos():
    top = [pb.TopLogprobs(candidates=[pb.TopLogprob(token_id=5, logprob=-0.1, token="a"),
                                      pb.TopLogprob(token_id=9, logprob=-2.5, token="b")])]
    c = pb.Completion(output_ids=[5], text="a", finish_reason="length", top_logprobs=top)
    got = completion_from_pb(c, logprobs=False, top_logprobs=True).top_logprobs
    assert got == [[(5, -0.1, "a"), (9, -2.5, "b")]] and got[0][1].token == "b" and got[0][0].token_id == 5
    assert completion_from_pb(c, logprobs=False).top_logprobs is None  # not asked for
    d = delta_from_pb(pb.TokenDelta(token_ids=[5], text="a", top_logprobs=top), logprobs=False, top_logprobs=True)
    assert d.top_logprobs == got


def test_results_from_protos():
    c = pb.Completion(output_ids=[5, 6, 2], text="hi", finish_reason="stop", logprobs=[-0.1, -0.2, -0.3],
                      usage=pb.Usage(prompt_tokens=4, completion_tokens=3))
    assert completion_from_pb(c, logprobs=True) == Completion([5, 6, 2], "hi", "stop", [-0.1, -0.2, -0.3], 4, 3)
    assert completion_from_pb(c, logprobs=False).logprobs is None  # not asked for: None, not []
    assert completion_from_pb(pb.Completion(), logprobs=True).logprobs == []
    d = delta_from_pb(pb.TokenDelta(token_ids=[9], text="x", logprobs=[-1.5]), logprobs=True)
    assert (d.token_ids, d.text, d.logprobs) == ([9], "x", [-1.5])

    # The proto has one log-prob per token after the first; the result lines up with token_ids.
    s = score_result_from_pb(pb.ScoreResult(token_ids=[1, 7, 9], token_logprobs=[-2.0, -0.5], sum_logprob=-2.5))
    assert s.token_ids == [1, 7, 9] and s.token_logprobs == [None, -2.0, -0.5] and s.sum_logprob == -2.5
    assert score_result_from_pb(pb.ScoreResult(token_ids=[1])).token_logprobs == [None]

    info = model_info_from_pb(pb.ModelInfoResponse(
        model_name="demo", task="causal-lm", num_layers=8, stages=[pb.StageInfo(index=0, start_layer=0, end_layer=4),
                                                                    pb.StageInfo(index=1, start_layer=4, end_layer=8)]))
    assert info.stages == [(0, 0, 4), (1, 4, 8)] and info.stages[1].start_layer == 4
    d = info.to_dict()
    assert d["stages"][1] == {"index": 1, "start_layer": 4, "end_layer": 8} and d["model_name"] == "demo"
    json.dumps(d)
    assert info.quantize == "" and d["quantize"] == ""  # weights as stored
    assert model_info_from_pb(pb.ModelInfoResponse(model_name="m", quantize="int8-experts")).to_dict()["quantize"] == "int8-experts"


def test_jamba_error():
    e = JambaError(grpc.StatusCode.INVALID_ARGUMENT, "params.temperature must be >= 0")
    assert str(e) == "INVALID_ARGUMENT: params.temperature must be >= 0"
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and e.code_name == "INVALID_ARGUMENT"
    assert e.details == "params.temperature must be >= 0" and isinstance(e, Exception)
    assert JambaError("UNAVAILABLE", "down").code is grpc.StatusCode.UNAVAILABLE
    again = pickle.loads(pickle.dumps(e))
    assert (again.code, again.details) == (e.code, e.details)
    assert e.retry_after is None
    assert JambaError("RESOURCE_EXHAUSTED", "queue bound 8); retry after 1250 ms").retry_after == 1.25


def test_channel_options_carry_the_retry_policy():
    opts = dict(channel_options(RetryPolicy()))
    assert opts["grpc.enable_retries"] == 1 and opts["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    cfg = json.loads(opts["grpc.service_config"])["methodConfig"][0]
    assert cfg["name"] == [{"service": "jamba.v1.JambaService"}]
    assert cfg["retryPolicy"]["maxAttempts"] == 4 and cfg["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert dict(channel_options(None))["grpc.enable_retries"] == 0
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=9)
    with pytest.raises(ValueError, match="unknown status code"):
        RetryPolicy(retryable_codes=("UNAVAILIBLE",))


def test_tls_options_need_tls():
    with pytest.raises(ValueError, match="need tls=True"):
        JambaClient("127.0.0.1:1", root_certificates=b"pem")
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        JambaClient("127.0.0.1:1", tls=True, private_key=b"key")


def test_client_imports_need_only_grpc_and_protobuf():
    code = ("import client, client.cli; import sys; bad=[m for m in sys.modules if m.split('.')[0] in "
            "('torch','ray','numpy','stages','cluster')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---- a canned JambaService on 127.0.0.1 ------------------------------------------------------------
class CannedService(pb_grpc.JambaServiceServicer):
    """Answers with fixed values; its knobs make it fail or hang on purpose. Records what it saw."""

    def __init__(self) -> None:
        self.unavailable_first = 0  # Generate answers UNAVAILABLE this many times first
        self.hang = False  # Generate waits until the call is cancelled or expires
        self.endless = False  # GenerateStream never finishes
        self.skip_final = False  # GenerateStream ends without its final message
        self.slow_start = 0.0  # GenerateStream and ModelInfo wait this long (or until cancelled) before answering
        self.attempts = 0
        self.busy_first = 0  # Generate answers RESOURCE_EXHAUSTED (queue full, with a retry hint) this often
        self.stream_attempts = 0  # GenerateStream calls (it is refused as busy the same way)
        self.attempt_times: list[float] = []
        self.batches: list[int] = []  # prompts per Generate call that got an answer
        self.params: list[pb.SamplingParams] = []  # the SamplingParams of each Generate/GenerateStream call
        self.metadata: list[dict[str, str]] = []
        self.stream_ended = threading.Event()  # set when a GenerateStream call terminates
        self.stream_was_cancelled = False

    def Generate(self, request, context):
        self.attempts += 1
        self.attempt_times.append(time.monotonic())
        self.metadata.append(dict(context.invocation_metadata()))
        if self.busy_first > 0:
            self.busy_first -= 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "all 2 slots are busy and 4 requests are waiting (queue bound 4); retry after 150 ms")
        if self.unavailable_first > 0:
            self.unavailable_first -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "pipeline is restarting")
        while self.hang and context.is_active():
            time.sleep(0.01)
        for i, p in enumerate(request.prompts):
            bad = [t for t in p.token_ids.ids if t >= 100]
            if bad:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"prompts[{i}].token_ids has ids out of range [0, 100): {bad}")
        if request.params.HasField("temperature") and request.params.temperature < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "params.temperature must be >= 0")
        self.batches.append(len(request.prompts))
        self.params.append(request.params)
        n = request.params.max_new_tokens if request.params.HasField("max_new_tokens") else 2
        completions = [self._completion(p, n, request.params) for p in request.prompts]
        return pb.GenerateResponse(completions=completions)

    @staticmethod
    def _completion(prompt, n, params):
        ids = list(range(10, 10 + n))
        return pb.Completion(output_ids=ids, text="".join(f"<{i}>" for i in ids), finish_reason="length",
                             logprobs=[-0.5] * n if params.logprobs else [],
                             usage=pb.Usage(prompt_tokens=len(prompt.token_ids.ids) or 3, completion_tokens=n),
                             top_logprobs=[CannedService._top(i, params.top_logprobs) for i in ids])

    @staticmethod
    def _top(token: int, k: int) -> pb.TopLogprobs:
        """k candidates at a position: the token itself first, then the ones after it."""
        return pb.TopLogprobs(candidates=[pb.TopLogprob(token_id=token + j, logprob=-0.5 * (j + 1), token=f"<{token + j}>")
                                          for j in range(k)])

    def GenerateStream(self, request, context):
        self.stream_attempts += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.busy_first > 0:
            self.busy_first -= 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue bound 4); retry after 50 ms")

        def ended():  # grpc calls this when the call terminates, however it ends
            self.stream_was_cancelled = not self._finished
            self.stream_ended.set()
        self._finished = False
        self.params.append(request.params)
        context.add_callback(ended)
        self._wait(self.slow_start, context)
        n = request.params.max_new_tokens if request.params.HasField("max_new_tokens") else 2
        i = 0
        while self.endless or i < n:
            if not context.is_active():
                return
            lp = [-0.5] if request.params.logprobs else []
            top = [self._top(10 + i, request.params.top_logprobs)] if request.params.top_logprobs else []
            yield pb.GenerateStreamResponse(delta=pb.TokenDelta(token_ids=[10 + i], text=f"<{10 + i}>", logprobs=lp,
                                                                top_logprobs=top))
            i += 1
            time.sleep(0.01 if self.endless else 0)
        if not self.skip_final:
            yield pb.GenerateStreamResponse(final=self._completion(request.prompt, n, request.params))
        self._finished = True

    def Classify(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      "Classify is not available: application 'lm' serves a causal language model")

    def Score(self, request, context):
        out = []
        for p in request.inputs:
            ids = list(p.token_ids.ids) or [1, 2, 3]
            lps = [-1.0 * i for i in range(1, len(ids))]
            out.append(pb.ScoreResult(token_ids=ids, token_logprobs=lps, sum_logprob=sum(lps)))
        return pb.ScoreResponse(results=out)

    @staticmethod
    def _wait(seconds: float, context) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until and context.is_active():
            time.sleep(0.01)

    def ModelInfo(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        self._wait(self.slow_start, context)
        return pb.ModelInfoResponse(model_name="canned", task="causal-lm", num_layers=4, vocab_size=100,
                                    stages=[pb.StageInfo(index=0, start_layer=0, end_layer=4)], num_slots=8)


@contextlib.contextmanager
def serve(service: CannedService, credentials: grpc.ServerCredentials | None = None):
    """Serve `service` on 127.0.0.1 at a port the OS picks; yields "127.0.0.1:PORT"."""
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_JambaServiceServicer_to_server(service, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(5)


@pytest.fixture
def service():
    return CannedService()


@pytest.fixture
def address(service):
    with serve(service) as addr:
        yield addr


# ---- transport: retries, deadlines, metadata ------------------------------------------------------
def test_generate_round_trip(service, address):
    with JambaClient(address) as c:
        outs = c.generate(["a", [1, 2, 3, 4]], max_new_tokens=3, logprobs=True)
        assert [o.output_ids for o in outs] == [[10, 11, 12]] * 2
        assert outs[1].prompt_tokens == 4 and outs[1].completion_tokens == 3 and outs[1].logprobs == [-0.5] * 3
        assert c.chat([{"role": "user", "content": "hi"}]).logprobs is None
        scored = c.score([[5, 6, 7]])
        assert scored[0].token_logprobs == [None, -1.0, -2.0]
        assert c.model_info().stages == [(0, 0, 4)]
        with pytest.raises(JambaError) as e:
            c.generate(["x"], temperature=-1.0)
        assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT and str(e.value) == (
            "INVALID_ARGUMENT: params.temperature must be >= 0")


def test_unavailable_is_retried(service, address):
    service.unavailable_first = 2
    with JambaClient(address, retry=FAST_RETRY) as c:
        assert len(c.generate(["a"])) == 1
    assert service.attempts == 3


def test_retries_give_up_after_max_attempts(service, address):
    service.unavailable_first = 10
    with JambaClient(address, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)) as c:
        with pytest.raises(JambaError) as e:
            c.generate(["a"])
    assert e.value.code is grpc.StatusCode.UNAVAILABLE and "restarting" in e.value.details
    assert service.attempts == 3


def test_no_retries_without_a_policy(service, address):
    service.unavailable_first = 1
    with JambaClient(address, retry=None) as c, pytest.raises(JambaError, match="UNAVAILABLE"):
        c.generate(["a"])
    assert service.attempts == 1


def test_busy_server_is_waited_out_as_hinted(service, address):
    service.busy_first = 2
    with JambaClient(address, wait_when_busy=5) as c:
        assert len(c.generate(["a"])) == 1
    gaps = [b - a for a, b in zip(service.attempt_times, service.attempt_times[1:])]
    assert service.attempts == 3 and all(g >= 0.15 for g in gaps)  # paused as the server said


def test_busy_server_fails_without_wait_when_busy(service, address):
    service.busy_first = 5
    with JambaClient(address) as c, pytest.raises(JambaError) as e:
        c.generate(["a"])
    assert e.value.code_name == "RESOURCE_EXHAUSTED" and e.value.retry_after == 0.15 and service.attempts == 1
    with JambaClient(address, wait_when_busy=0.2) as c, pytest.raises(JambaError, match="RESOURCE_EXHAUSTED"):
        c.generate(["a"])  # the budget runs out after one pause
    assert service.attempts == 3
    with pytest.raises(ValueError, match="wait_when_busy"):
        JambaClient(address, wait_when_busy=-1)


def test_async_client_waits_out_a_busy_server(service, address):
    service.busy_first = 1

    async def run():
        async with AsyncJambaClient(address, wait_when_busy=5) as c:
            outs = await c.generate(["a"])
            service.busy_first = 2
            stream = c.generate_stream("x", max_new_tokens=3)
            ids = [t async for d in stream for t in d.token_ids]
            return outs, ids, stream.completion

    outs, ids, final = asyncio.run(run())
    assert len(outs) == 1 and ids == final.output_ids == [10, 11, 12]
    assert service.attempts == 2 and service.stream_attempts == 3


def test_stream_waits_out_a_busy_server_before_its_first_message(service, address):
    service.busy_first = 2
    with JambaClient(address, wait_when_busy=5) as c:
        stream = c.generate_stream("x", max_new_tokens=3)
        assert [t for d in stream for t in d.token_ids] == [10, 11, 12] == stream.completion.output_ids
    assert service.stream_attempts == 3
    service.busy_first = 1
    with JambaClient(address) as c, pytest.raises(JambaError, match="RESOURCE_EXHAUSTED") as e:
        list(c.generate_stream("x"))
    assert e.value.retry_after == 0.05


def test_deadlines(service, address):
    service.hang = True
    with JambaClient(address, timeout=0.2) as c:
        t0 = time.monotonic()
        with pytest.raises(JambaError) as e:
            c.generate(["a"])
        assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 2
    with JambaClient(address) as c:  # no default deadline; a per-call one
        with pytest.raises(JambaError, match="DEADLINE_EXCEEDED"):
            c.generate(["a"], timeout=0.2)


def test_application_and_metadata_reach_the_server(service, address):
    with JambaClient(address, application="jamba-lm", metadata={"X-Request-Id": "abc"}) as c:
        c.model_info()
        c.generate(["a"], metadata=[("x-trace", "t1")])
    first, second = service.metadata
    assert first["application"] == "jamba-lm" and first["x-request-id"] == "abc"
    assert second["application"] == "jamba-lm" and second["x-request-id"] == "abc" and second["x-trace"] == "t1"


# ---- streams ----------------------------------------------------------------------------------
def test_stream_yields_deltas_then_the_completion(service, address):
    with JambaClient(address) as c:
        stream = c.generate_stream([1, 2], max_new_tokens=3, logprobs=True)
        deltas = list(stream)
        assert [d.token_ids for d in deltas] == [[10], [11], [12]] and deltas[0].logprobs == [-0.5]
        assert stream.completion.output_ids == [10, 11, 12] and stream.completion.finish_reason == "length"
        assert "".join(d.text for d in deltas) == stream.completion.text
        assert c.generate_stream("x").result().output_ids == [10, 11]


def test_stream_without_final_message_is_an_error(service, address):
    service.skip_final = True
    with JambaClient(address) as c, pytest.raises(JambaError, match="INTERNAL: the stream ended without"):
        list(c.generate_stream("x"))


def test_breaking_out_of_a_stream_cancels_it(service, address):
    service.endless = True
    with JambaClient(address) as c:
        for n, _ in enumerate(c.generate_stream("x"), 1):
            if n == 3:
                break
        assert service.stream_ended.wait(2), "the server did not see the stream end"
        assert service.stream_was_cancelled

        service.stream_ended.clear()
        with c.generate_stream("x") as stream:
            next(stream)
        assert service.stream_ended.wait(2) and service.stream_was_cancelled
        with pytest.raises(JambaError, match="CANCELLED: the stream was closed"):
            stream.result()


def test_stream_deadline(service, address):
    service.endless = True
    with JambaClient(address) as c, pytest.raises(JambaError, match="DEADLINE_EXCEEDED"):
        for _ in c.generate_stream("x", timeout=0.2):
            pass


def test_stream_first_message_timeout(service, address):
    """A server that never starts the stream is given up on after first_message_timeout (the
    call is cancelled); once the first message came, the stream runs on past that time."""
    service.slow_start = 60
    with JambaClient(address) as c:
        t0 = time.monotonic()
        with pytest.raises(JambaError) as e:
            list(c.generate_stream("x", first_message_timeout=0.3))
        assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED and "first message within 0.3s" in e.value.details
        assert time.monotonic() - t0 < 10
        assert service.stream_ended.wait(5) and service.stream_was_cancelled
        service.slow_start = 0.1
        stream = c.generate_stream("x", first_message_timeout=0.5, max_new_tokens=40)
        time.sleep(0.8)  # past the first-message timeout, but the first message came in time
        assert len(list(stream)) == 40 and stream.completion.finish_reason == "length"


def test_async_stream_first_message_timeout(service, address):
    service.slow_start = 60

    async def run():
        async with AsyncJambaClient(address) as c:
            with pytest.raises(JambaError) as e:
                async for _ in c.generate_stream("x", first_message_timeout=0.3):
                    pass
            return e.value

    err = asyncio.run(run())
    assert err.code is grpc.StatusCode.DEADLINE_EXCEEDED and "first message" in err.details
    assert service.stream_ended.wait(5) and service.stream_was_cancelled


def test_async_client(service, address):
    service.unavailable_first = 1
    service.endless = True

    async def run():
        async with AsyncJambaClient(address, application="a", retry=FAST_RETRY) as c:
            outs = await c.generate([[1, 2]], max_new_tokens=2)
            assert outs[0].output_ids == [10, 11]
            assert (await c.model_info()).model_name == "canned"
            assert (await c.score(["abc"]))[0].token_logprobs[0] is None
            with pytest.raises(JambaError, match="FAILED_PRECONDITION"):
                await c.classify(["x"])
            async with c.generate_stream("x") as stream:
                n = 0
                async for _ in stream:
                    n += 1
                    if n == 3:
                        break
            assert await asyncio.to_thread(service.stream_ended.wait, 2)
        assert service.attempts == 2 and service.stream_was_cancelled

    asyncio.run(run())


# ---- TLS --------------------------------------------------------------------------------------
def test_tls(service, pki, tmp_path):
    creds = grpc.ssl_server_credentials([(pki["server_key"], pki["server_cert"])])
    with serve(service, creds) as addr:
        with JambaClient(addr, tls=True, root_certificates=pki["ca"]) as c:
            assert c.model_info().model_name == "canned"
        (tmp_path / "ca.pem").write_bytes(pki["ca"])
        with JambaClient(addr, tls=True, root_certificates=str(tmp_path / "ca.pem")) as c:  # a path works too
            assert c.model_info().model_name == "canned"
        with JambaClient(addr, retry=None) as c, pytest.raises(JambaError, match="UNAVAILABLE"):
            c.model_info()  # plaintext to a TLS port


def test_mutual_tls(service, pki, tmp_path):
    creds = grpc.ssl_server_credentials([(pki["server_key"], pki["server_cert"])], root_certificates=pki["ca"],
                                        require_client_auth=True)
    with serve(service, creds) as addr:
        with JambaClient(addr, tls=True, root_certificates=pki["ca"], private_key=pki["client_key"],
                         certificate_chain=pki["client_cert"], application="lm") as c:
            assert c.model_info().model_name == "canned"
        assert service.metadata[-1]["application"] == "lm"
        with JambaClient(addr, tls=True, root_certificates=pki["ca"], retry=None, timeout=5) as c:
            with pytest.raises(JambaError) as e:
                c.model_info()
            assert e.value.code is grpc.StatusCode.UNAVAILABLE

        # The CLI's certificate options.
        for key in ("ca", "client_cert", "client_key"):
            (tmp_path / f"{key}.pem").write_bytes(pki[key])
        out = tmp_path / "info.json"
        rc = cli_main(["info", "--address", addr, "--ca-cert", str(tmp_path / "ca.pem"), "--client-cert",
                       str(tmp_path / "client_cert.pem"), "--client-key", str(tmp_path / "client_key.pem"),
                       "--output", str(out)])
        assert rc == 0 and json.loads(out.read_text())["stages"] == [{"index": 0, "start_layer": 0, "end_layer": 4}]


# ---- the CLI ----------------------------------------------------------------------------------
def run_cli(tmp_path, command, address, lines, extra=()):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    rc = cli_main([command, "--address", address, "--input", str(inp), "--output", str(out), *extra])
    return rc, [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def test_cli_generate_rows_and_errors(service, address, tmp_path, capsys):
    lines = [
        {"prompt": "a", "max_new_tokens": 3, "id": 1},
        '{"prompt": "b", oops}',
        {"input_ids": [1, 2, 500], "max_new_tokens": 3},  # the server rejects it
        {"input_ids": [1, 2], "max_new_tokens": 3},
        {"text": "generate's output field"},
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "stop": "\n", "max_new_tokens": 2},
        {"prompt": "c", "temperature": "hot"},
    ]
    rc, rows = run_cli(tmp_path, "generate", address, lines)
    err = capsys.readouterr().err
    assert rc == 1
    assert len(rows) == len(lines)
    assert rows[0] == dict(lines[0], output_ids=[10, 11, 12], text="<10><11><12>", finish_reason="length")
    assert rows[1] == {"line": 2, "error": rows[1]["error"]} and rows[1]["error"].startswith("malformed JSON")
    assert rows[2]["line"] == 3 and rows[2]["error"].startswith("INVALID_ARGUMENT: prompts[0].token_ids")
    assert rows[3]["output_ids"] == [10, 11, 12]
    assert rows[4]["error"].startswith("generate takes its input as prompt")
    assert rows[5]["logprobs"] == [-0.5, -0.5] and rows[5]["output_ids"] == [10, 11]
    assert rows[6] == {"line": 7, "error": "temperature must be a number, got str"}
    assert f"{tmp_path / 'in.jsonl'}:2: malformed JSON" in err
    assert f"{tmp_path / 'in.jsonl'}:3: INVALID_ARGUMENT: prompts[0].token_ids" in err
    # Rows 1, 3 and 4 share their params: one call, rejected for row 3, then retried row by row.
    assert sorted(service.batches) == [1, 1, 1]


def test_cli_batches_rows_with_the_same_params(service, address, tmp_path):
    lines = [{"prompt": str(i), "max_new_tokens": 2} for i in range(5)] + [{"prompt": "x", "seed": 1}]
    rc, rows = run_cli(tmp_path, "generate", address, lines, ["--batch-size", "4"])
    assert rc == 0 and [r["prompt"] for r in rows] == [str(i) for i in range(5)] + ["x"]
    assert sorted(service.batches) == [1, 1, 4]


def test_cli_failed_rpc_prints_the_status(service, address, tmp_path, capsys):
    rc, rows = run_cli(tmp_path, "classify", address, [{"text": "a"}])
    assert rc == 2 and rows == []
    assert "jamba client: FAILED_PRECONDITION: Classify is not available" in capsys.readouterr().err


def test_cli_unreachable_server(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _ = run_cli(tmp_path, "score", f"127.0.0.1:{port}", [{"prompt": "a"}])
    assert rc == 2 and "jamba client: UNAVAILABLE: " in capsys.readouterr().err


def test_cli_has_a_default_deadline(service, address, tmp_path, capsys):
    """`jamba client` never hangs on a server that does not answer: --timeout (60 s unless
    given) bounds calls and a stream's first message."""
    from client.cli import DEFAULT_TIMEOUT, build_parser

    assert build_parser().parse_args(["info", "--address", address]).timeout == DEFAULT_TIMEOUT == 60
    service.slow_start = 60
    t0 = time.monotonic()
    assert cli_main(["info", "--address", address, "--timeout", "0.5"]) == 2
    assert "jamba client: DEADLINE_EXCEEDED" in capsys.readouterr().err and time.monotonic() - t0 < 10
    rc, rows = run_cli(tmp_path, "stream", address, [{"prompt": "a"}], ["--timeout", "0.5"])
    assert rc == 1 and "first message within 0.5s" in rows[0]["error"]


def test_cli_score_and_stream(service, address, tmp_path, capsys):
    rc, rows = run_cli(tmp_path, "score", address, [{"input_ids": [1, 2, 3]}, {"text": "abc", "id": "x"}])
    assert rc == 0
    assert rows[0] == {"input_ids": [1, 2, 3], "token_logprobs": [None, -1.0, -2.0], "sum_logprob": -3.0}
    assert rows[1]["id"] == "x" and rows[1]["token_logprobs"][0] is None

    capsys.readouterr()
    rc, rows = run_cli(tmp_path, "stream", address, [{"prompt": "a", "max_new_tokens": 3}, "[1]",
                                                     {"input_ids": [7, 1000]}])
    err = capsys.readouterr().err
    assert rc == 1 and "[1] <10><11><12>\n" in err and ":2: a row must be a JSON object" in err
    assert rows[0] == {"prompt": "a", "max_new_tokens": 3, "output_ids": [10, 11, 12], "text": "<10><11><12>",
                       "finish_reason": "length"}
    assert rows[1] == {"line": 2, "error": "a row must be a JSON object, not list"}
    assert rows[2]["output_ids"] == [10, 11]  # the canned stream does not check ids


def test_cli_sampling_options_and_row_overrides(service, address, tmp_path, capsys):
    """The sampling options reach every row's request; a row's own field overrides its option, and
    a row's structure replaces the command line's; top_logprobs come back in the output rows."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    lines = [{"prompt": "a", "max_new_tokens": 2}, {"prompt": "b", "max_new_tokens": 2, "regex": "[ab]+", "top_logprobs": 1},
             {"prompt": "c", "max_new_tokens": 1, "json_object": False}]
    options = ["--json-schema", str(tmp_path / "schema.json"), "--top-logprobs", "2", "--logit-bias", "5=-100",
               "--logit-bias", "7=1.5", "--min-tokens", "1", "--repetition-penalty", "1.1", "--frequency-penalty", "0.2",
               "--presence-penalty", "0.3"]
    rc, rows = run_cli(tmp_path, "generate", address, lines, options)
    assert rc == 0, capsys.readouterr().err
    calls = {p.WhichOneof("structure"): p for p in service.params}  # the rows' structures differ: one call each
    a, b, c = calls["json_schema"], calls["regex"], calls[None]
    assert json.loads(a.json_schema) == schema and a.top_logprobs == 2 and dict(a.logit_bias) == {5: -100.0, 7: 1.5}
    assert (a.min_tokens, a.frequency_penalty, a.presence_penalty) == (1, pytest.approx(0.2), pytest.approx(0.3))
    assert a.repetition_penalty == pytest.approx(1.1)
    assert b.WhichOneof("structure") == "regex" and b.top_logprobs == 1 and dict(b.logit_bias) == {5: -100.0, 7: 1.5}
    assert c.WhichOneof("structure") is None  # json_object false: this row is unconstrained
    assert rows[0]["top_logprobs"] == [[{"token_id": 10, "token": "<10>", "logprob": -0.5},
                                        {"token_id": 11, "token": "<11>", "logprob": -1.0}],
                                       [{"token_id": 11, "token": "<11>", "logprob": -0.5},
                                        {"token_id": 12, "token": "<12>", "logprob": -1.0}]]
    assert [len(step) for step in rows[1]["top_logprobs"]] == [1, 1]

    service.params.clear()
    rc, rows = run_cli(tmp_path, "stream", address, [{"prompt": "s", "max_new_tokens": 2}],
                       ["--regex", "(yes|no)", "--top-logprobs", "1"])
    assert rc == 0 and service.params[0].regex == "(yes|no)"
    assert rows[0]["top_logprobs"] == [[{"token_id": 10, "token": "<10>", "logprob": -0.5}],
                                       [{"token_id": 11, "token": "<11>", "logprob": -0.5}]]


def test_cli_bad_sampling_options(address, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n')
    base = ["generate", "--address", address, "--input", str(tmp_path / "in.jsonl")]
    with pytest.raises(SystemExit) as e:
        cli_main([*base, "--json-schema", "{not json"])
    assert e.value.code == 2 and "--json-schema: not JSON: it (and no file has that name)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*base, "--logit-bias", "five=-1"])
    assert "must be ID=BIAS" in capsys.readouterr().err
    assert cli_main([*base, "--regex", "a", "--json-object"]) == 2
    assert "the sampling options: at most one of json_schema, json_object, regex, grammar" in capsys.readouterr().err


def test_cli_rows_refuse_fields_that_look_like_parameters(service, address, tmp_path):
    """Another API's name for a field, or a near-miss, is an error naming it (never silently
    ignored); a field of the row's own (a note) is carried through."""
    lines = [{"prompt": "a", "max_tokens": 5}, {"prompt": "a", "temprature": 0.5},
             {"prompt": "a", "response_format": {"type": "json_object"}}, {"prompt": "a", "guided_json": {}},
             {"prompt": "a", "note": {"k": 1}, "max_new_tokens": 1}, {"prompt": "a", "regex": "a", "grammar": "start: x"},
             {"prompt": "a", "logit_bias": {"five": 1}}]
    rc, rows = run_cli(tmp_path, "generate", address, lines)
    assert rc == 1
    assert rows[0]["error"] == "unknown field max_tokens: write max_new_tokens (max_tokens is OpenAI's name)"
    assert rows[1]["error"] == "unknown field temprature: did you mean temperature?"
    assert rows[2]["error"].startswith("unknown field response_format: write json_schema: {schema} or json_object: true")
    assert rows[3]["error"].startswith("unknown field guided_json: write json_schema")
    assert rows[4]["note"] == {"k": 1} and rows[4]["output_ids"] == [10]
    assert rows[5]["error"].startswith("at most one of json_schema, json_object, regex, grammar")
    assert rows[6]["error"] == "logit_bias keys must be token ids, got 'five'"
    rc, rows = run_cli(tmp_path, "score", address, [{"text": "a", "max_tokens": 5}, {"text": "a", "max_new_tokens": 5}])
    assert rc == 1 and rows[0]["error"].startswith("unknown field max_tokens")
    assert rows[1]["token_logprobs"][0] is None  # generate's fields on a score row: the same file serves both

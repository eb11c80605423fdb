"""Structured output and the processors in rows (`jamba generate`, in one process and on a
2-stage pipeline; batch jobs on Ray Data), and OpenAI Batch API files run as batch jobs: outputs
validate against their schemas, rows agree with the single-process engine, OpenAI's output and
error files have OpenAI's shape, with bodies the openai client's own types accept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pyarrow.parquet as pq
import pytest

from cluster.cli.main import main
from stages.sequence import SamplingParams, Structure

from .test_batch import _job, _write_jsonl
from .test_structured import SCHEMAS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data copies its context
PROMPTS = ["Your fortune:", "Q: What is a monad?\nA:"]


def _schema_rows() -> list[dict]:
    """Every schema, greedy and seeded-sampled, some with top_logprobs, one with a schema as JSON text."""
    rows = [{"id": f"s{k}-t{t}-p{i}", "prompt": p, "json_schema": schema, "temperature": t, "seed": k + i,
             "max_new_tokens": 160} for k, schema in enumerate(SCHEMAS) for t in (0.0, 1.0) for i, p in enumerate(PROMPTS)]
    rows[0]["top_logprobs"] = 3
    rows[1]["json_schema"] = json.dumps(SCHEMAS[0])
    return rows


def _schema(row: dict) -> dict:
    return row["json_schema"] if isinstance(row["json_schema"], dict) else json.loads(row["json_schema"])


def _check_rows(rows: list[dict], out: list[dict]) -> None:
    for row, o in zip(rows, out):
        assert o["finish_reason"] == "stop", o
        jsonschema.validate(json.loads(o["text"]), _schema(row))
        assert o["json_schema"] == row["json_schema"] and o["id"] == row["id"]  # the input row is kept


def _greedy_reference(reference, rows: list[dict]) -> list[list[int]]:
    """The single-process engine's tokens for the greedy rows."""
    ref, _, tok = reference
    greedy = [r for r in rows if r["temperature"] == 0]
    return [w.output_ids for w in ref.generate(
        [tok.encode(r["prompt"]) for r in greedy],
        [SamplingParams(max_new_tokens=160, structure=Structure("json_schema", json.dumps(_schema(r)))) for r in greedy])]


def test_generate_rows_in_one_process(models, reference, tmp_path, capsys):
    """Schema rows validate, greedy ones are the engine's tokens; top_logprobs in the output row;
    bad rows name their field and the others still run."""
    lm, _ = models
    rows = _schema_rows()
    bad = [{"prompt": "x", "json_schema": {"type": "frobnicate"}}, {"prompt": "x", "regex": "[^\\s\\S]"},
           {"prompt": "x", "top_logprobs": 1000}, {"prompt": "x", "logit_bias": {"99999": 1}},
           {"prompt": "x", "max_tokens": 4}, {"prompt": "x", "response_format": {"type": "json_object"}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + bad))
    rc = main(["generate", "--model", str(lm), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")])
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rc == 1
    _check_rows(rows, out)
    assert [o["output_ids"] for r, o in zip(rows, out) if r["temperature"] == 0] == _greedy_reference(reference, rows)
    top = out[0]["top_logprobs"]
    assert len(top) == len(out[0]["output_ids"]) and all(len(step) == 3 for step in top)
    assert all(set(c) == {"token_id", "token", "logprob"} for step in top for c in step)
    assert [o.get("error") for o in out[len(rows):]] == [
        "json_schema: Invalid type: frobnicate", "regex: the grammar matches no text at all",
        "top_logprobs must be an integer in [0, 20] (got 1000)", "logit_bias keys must be token ids in [0, 4096) (got 99999)",
        "unknown field max_tokens: write max_new_tokens (max_tokens is OpenAI's name)",
        "unknown field response_format: write json_schema: {schema} or json_object: true (response_format is "
        "OpenAI's wrapper)"]
    assert f"{tmp_path / 'in.jsonl'}:{len(rows) + 1}: json_schema: Invalid type" in capsys.readouterr().err


def test_generate_rows_on_a_pipeline(ray_cluster, models, reference, tmp_path):
    """`jamba generate --stages 2`: the same rows validate, and every output is the one process's."""
    lm, _ = models
    rows = _schema_rows()
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--model", str(lm), "--input",
                        str(tmp_path / "in.jsonl"), "--stages", "2", "--address", ray_cluster, "--cpus-per-stage", "0.5"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.loads(line) for line in r.stdout.splitlines()]
    _check_rows(rows, out)
    assert [o["output_ids"] for r, o in zip(rows, out) if r["temperature"] == 0] == _greedy_reference(reference, rows)


def test_batch_job_with_schemas(ray_cluster, models, tmp_path):
    """A batch job's generate rows: the outputs validate; the new fields and top_logprobs land in
    their Parquet columns."""
    lm, _ = models
    rows = _schema_rows()
    rows[2].update(logit_bias={"42": -5}, min_tokens=2, repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1)
    path = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    summary = _job("generate", lm, [path], out, batch_size=4)
    assert summary["rows"] == summary["rows_ok"] == len(rows)
    got = {r["id"]: r for r in pq.read_table(out / "data").to_pylist()}
    for row in rows:
        g = got[row["id"]]
        assert g["finish_reason"] == "stop"
        jsonschema.validate(json.loads(g["text"]), _schema(row))
        assert json.loads(g["json_schema"]) == _schema(row) and g["extra"] is None
    first = got[rows[0]["id"]]
    assert len(first["top_logprobs"]) == len(first["output_ids"]) and len(first["top_logprobs"][0]) == 3
    assert set(first["top_logprobs"][0][0]) == {"token_id", "token", "logprob"}
    third = got[rows[2]["id"]]
    assert json.loads(third["logit_bias"]) == {"42": -5} and third["min_tokens"] == 2
    assert third["repetition_penalty"] == pytest.approx(1.1) and third["top_logprobs"] is None


# ---- OpenAI Batch API files ---------------------------------------------------------------------
FORTUNE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["luck", "numbers"],
                  "properties": {"luck": {"enum": ["good", "bad"]},
                                 "numbers": {"type": "array", "minItems": 1, "maxItems": 3,
                                             "items": {"type": "integer", "minimum": 1, "maximum": 9}}}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}


def _requests() -> list[dict]:
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Tell me a fortune."}],
            "max_tokens": 12, "temperature": 0}

    def line(custom_id, url, body):
        return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}

    return [
        line("chat-1", "/v1/chat/completions", chat),
        line("chat-logprobs", "/v1/chat/completions", {**chat, "logprobs": True, "n": 2, "temperature": 0.8, "seed": 3}),
        line("cmpl-1", "/v1/completions", {"model": "m", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0,
                                           "logprobs": 0, "echo": True}),
        line("cmpl-2", "/v1/completions", {"model": "m", "prompt": PROMPTS, "max_tokens": 4, "seed": 1, "n": 2}),
        line("chat-schema", "/v1/chat/completions", {**chat, "max_tokens": 120, "response_format": {
            "type": "json_schema", "json_schema": {"name": "fortune", "schema": FORTUNE_SCHEMA}}}),
        line("chat-tool", "/v1/chat/completions", {**chat, "max_tokens": 120, "tools": [WEATHER_TOOL],
                                                   "tool_choice": "required"}),
        line("bad-field", "/v1/chat/completions", {**chat, "frobnicate": 1}),
        line("too-long", "/v1/chat/completions", {**chat, "max_tokens": 100000}),
        line("streamed", "/v1/completions", {"model": "m", "prompt": "x", "stream": True}),
    ]


def test_openai_batch_file(ray_cluster, models, reference, tmp_path):
    """A file written for OpenAI's Batch API runs unchanged: output.jsonl holds the answered
    requests (bodies the openai client's types accept, greedy ones the engine's text) and
    errors.jsonl the refused ones, each a 400 with OpenAI's error body naming the field."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    lm, _ = models
    ref, _, tok = reference
    requests = _requests()
    path = _write_jsonl(tmp_path / "batch.jsonl", requests)
    out = tmp_path / "out"
    summary = _job("generate", lm, [path], out, batch_size=3)
    assert (summary["format"], summary["rows"], summary["rows_failed"]) == ("openai", 9, 3)
    answered = [json.loads(line) for line in (out / "output.jsonl").read_text().splitlines()]
    failed = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [a["custom_id"] for a in answered] == ["chat-1", "chat-logprobs", "cmpl-1", "cmpl-2", "chat-schema",
                                                  "chat-tool"]  # input order
    for a in answered:
        assert set(a) == {"id", "custom_id", "response", "error"} and a["error"] is None and a["id"].startswith("batch_req_")
        assert a["response"]["status_code"] == 200 and a["response"]["request_id"].startswith("req_")
    bodies = {a["custom_id"]: a["response"]["body"] for a in answered}
    for cid in ("chat-1", "chat-logprobs", "chat-schema", "chat-tool"):
        ChatCompletion.model_validate(bodies[cid])
    # Structured output and tool calling, as the HTTP API does them.
    jsonschema.validate(json.loads(bodies["chat-schema"]["choices"][0]["message"]["content"]), FORTUNE_SCHEMA)
    [tool_choice] = bodies["chat-tool"]["choices"]
    assert tool_choice["finish_reason"] == "tool_calls"
    for call in tool_choice["message"]["tool_calls"]:
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])
    Completion.model_validate(bodies["cmpl-2"])
    # cmpl-1 echoes its prompt, scored: the first token has no log-probability (null, as OpenAI
    # answers), which the openai client's type does not admit; the rest of the body is checked.
    echoed = json.loads(json.dumps(bodies["cmpl-1"]))
    echoed["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
    Completion.model_validate(echoed)
    [want] = ref.generate([tok.encode_chat(requests[0]["body"]["messages"])], [SamplingParams(max_new_tokens=12)])
    assert bodies["chat-1"]["choices"][0]["message"]["content"] == want.text
    assert bodies["chat-1"]["model"] == lm.name and bodies["chat-1"]["usage"]["completion_tokens"] == len(want.output_ids)
    assert len(bodies["chat-logprobs"]["choices"]) == 2 and bodies["chat-logprobs"]["choices"][1]["logprobs"]["content"]
    [echo] = bodies["cmpl-1"]["choices"]
    assert echo["text"].startswith(PROMPTS[0]) and echo["logprobs"]["token_logprobs"][0] is None  # the prompt, scored
    assert len(bodies["cmpl-2"]["choices"]) == 4
    assert [f["custom_id"] for f in failed] == ["bad-field", "too-long", "streamed"]
    params = [f["response"]["body"]["error"]["param"] for f in failed]
    assert params == ["frobnicate", "max_tokens", "stream"]
    assert all(f["response"]["status_code"] == 400 and f["error"] is None for f in failed)
    assert all(f["response"]["body"]["error"]["type"] == "invalid_request_error" for f in failed)

    # Run again: nothing is left to do, and the files are written again from the committed parts.
    again = _job("generate", lm, [path], out, batch_size=3)
    assert again["this_run"]["rows"] == 0 and again["rows"] == 9
    assert [json.loads(line)["custom_id"] for line in (out / "output.jsonl").read_text().splitlines()] == \
        ["chat-1", "chat-logprobs", "cmpl-1", "cmpl-2", "chat-schema", "chat-tool"]


def test_openai_batch_files_are_checked_before_the_job(models, tmp_path):
    lm, _ = models
    requests = _requests()[:2]
    dup = _write_jsonl(tmp_path / "dup.jsonl", [requests[0], requests[1], {**requests[1], "method": "GET"},
                                                 {**requests[0], "url": "/v1/embeddings"}, requests[0]])
    with pytest.raises(ValueError) as e:
        _job("generate", lm, [dup], tmp_path / "out")
    lines = str(e.value).splitlines()
    assert lines[0] == "3 line(s) are not OpenAI batch requests:"
    assert lines[1] == f"{dup}:3: method must be POST, not 'GET'"
    assert lines[2] == f"{dup}:4: url must be one of /v1/chat/completions, /v1/completions, not '/v1/embeddings'"
    assert lines[3] == f"{dup}:5: custom_id 'chat-1' again (first at {dup}:1): custom_ids must be unique"
    rows = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match="--format openai|not OpenAI batch requests"):
        _job("generate", lm, [rows], tmp_path / "out", input_format="openai")
    with pytest.raises(ValueError, match="run them as two jobs"):
        _job("generate", lm, [tmp_path / "rows.jsonl", _write_jsonl(tmp_path / "ok.jsonl", requests)], tmp_path / "out")
    with pytest.raises(ValueError, match="jamba batch generate"):
        _job("score", lm, [tmp_path / "ok.jsonl"], tmp_path / "out")

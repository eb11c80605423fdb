"""OpenAI Batch API files as batch jobs: a file written for OpenAI's Batch API runs here unchanged
(`jamba batch generate --input requests.jsonl --output out/`; the format is recognised by its
lines' keys, or named with `--format openai`).

Input: JSON Lines, one request a line, as OpenAI takes them:

    {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

`url` is /v1/chat/completions or /v1/completions, and `body` is what the HTTP API takes there
(its `model` names whatever it likes: the job's model answers, and the responses name it). As
OpenAI checks a file before its batch runs, the job checks every line before it starts: a JSON
object with exactly those four keys, method POST, a url served here, and no custom_id twice.
A file that fails is refused, its problems listed (`FILE:LINE: ...`).

Output, written when the job completes (OpenAI's output and error files):

    OUT/output.jsonl  {"id": "batch_req_...", "custom_id": "request-1", "response": {"status_code": 200,
                       "request_id": "req_...", "body": <the completion, as the HTTP API answers it>}, "error": null}
    OUT/errors.jsonl  the requests that failed, only if some did: a bad request is answered as OpenAI
                      does, {"response": {"status_code": 400, "request_id", "body": {"error": {"message",
                      "type", "param", "code"}}}, "error": null}; one the engine failed has "response":
                      null and "error": {"code": "server_error", "message": ...}

Lines are in input order (OpenAI's may not be: match them by custom_id). Underneath, the job
commits Parquet parts as it does for rows (data/ holds each request's custom_id, status code and
output line), so a killed job resumes and every request is answered exactly once; output.jsonl
and errors.jsonl are assembled from the parts at the end.

Requests are checked, turned into the engine's requests and answered by the HTTP API's own code
(cluster/serve/openai_requests.py, openai_protocol.py): the same fields (structured output, tools,
top_logprobs, penalties, ...), the same 400s naming the field, the same response objects. What
the HTTP API refuses, a batch refuses too (with a 400 line); `stream` is refused, as there is no
one to stream to.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from cluster.runtime.engine import SyncEngine
from cluster.runtime.intake import Intake, IntakeError
from cluster.serve.openai_protocol import APIError, ChatRequest, CompletionRequest, bad, validation_error
from cluster.serve.openai_requests import Prepared, echoes, prepare_chat, prepare_completions
from cluster.serve.tool_calls import ToolCallFormat
from stages.sequence import GenerationResult

from .commit import ERRORS_DIR, write_atomic

ENDPOINTS = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}
ENVELOPE = ("custom_id", "method", "url", "body")
MAX_PROBLEMS = 20  # listed when a file is refused


# ---- the input file, checked before the job ------------------------------------------------------
def is_request(line: str) -> bool:
    """Whether a JSON Lines line is an OpenAI batch request (its keys say so)."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and "custom_id" in row and "body" in row


def first_line(fs: pafs.FileSystem, path: str) -> str | None:
    """The first non-blank line of a JSON Lines file (reading little of a big one)."""
    with fs.open_input_stream(path, compression="detect") as f:
        for line in _lines(f, chunk_bytes=64 << 10):
            return line
    return None


def check_files(fs: pafs.FileSystem, paths: list[str]) -> int:
    """Every line of every file is a request OpenAI would take into a batch, and no custom_id
    comes twice; returns the number of requests, or raises ValueError listing the problems."""
    problems: list[str] = []
    seen: dict[str, str] = {}  # custom_id -> where it first came
    n = 0
    for path in paths:
        with fs.open_input_stream(path, compression="detect") as f:
            for lineno, line in enumerate(_lines(f, keep_blank=True), 1):
                if not line.strip():
                    continue
                n += 1
                where = f"{path}:{lineno}"
                problem = _envelope_problem(line)
                if problem is None:
                    cid = json.loads(line)["custom_id"]
                    if cid in seen:
                        problem = f"custom_id {cid!r} again (first at {seen[cid]}): custom_ids must be unique"
                    seen.setdefault(cid, where)
                if problem is not None:
                    problems.append(f"{where}: {problem}")
    if problems:
        more = f"\n... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise ValueError(f"{len(problems)} line(s) are not OpenAI batch requests:\n"
                         + "\n".join(problems[:MAX_PROBLEMS]) + more)
    return n


def _envelope_problem(line: str) -> str | None:
    try:
        row = json.loads(line)
    except ValueError as e:
        return f"malformed JSON: {e}"
    if not isinstance(row, dict):
        return f"a request is a JSON object, not {type(row).__name__}"
    missing = [k for k in ENVELOPE if k not in row]
    extra = sorted(set(row) - set(ENVELOPE))
    if missing or extra:
        return (f"missing {', '.join(missing)}" if missing else "") + ("; " if missing and extra else "") + \
               (f"unknown field(s) {', '.join(extra)}" if extra else "") + f" (a request has {', '.join(ENVELOPE)})"
    if not isinstance(row["custom_id"], str) or not row["custom_id"]:
        return "custom_id must be a non-empty string"
    if row["method"] != "POST":
        return f"method must be POST, not {row['method']!r}"
    if row["url"] not in ENDPOINTS:
        return f"url must be one of {', '.join(ENDPOINTS)}, not {row['url']!r}"
    if not isinstance(row["body"], dict):
        return "body must be a JSON object (the request)"
    return None


def _lines(f, keep_blank: bool = False, chunk_bytes: int = 1 << 20):
    """The lines of a binary stream, decoded (bad bytes kept as surrogates, for the row to report)."""
    rest = b""
    while True:
        data = f.read(chunk_bytes)
        if not data:
            break
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            text = line.rstrip(b"\r").decode("utf-8", "surrogateescape")
            if keep_blank or text.strip():
                yield text
    if rest.strip() or (keep_blank and rest):
        yield rest.rstrip(b"\r").decode("utf-8", "surrogateescape")


# ---- requests through the engine -----------------------------------------------------------------
@dataclass
class Line:
    """One request line, checked (cluster/serve/openai_requests.py), or its 400."""

    custom_id: str
    prepared: Prepared | None = None
    error: APIError | None = None


def run_chunk(runner: SyncEngine, chunk: list[tuple[int, str]], model: str) -> tuple[list[dict[str, Any]], int]:
    """Answer each (line number, line) of a chunk: one result row per line ({"id", "custom_id",
    "status_code", "output"}: the output line as JSON text), and the tokens processed. Every
    line's engine requests run together."""
    token_text = _token_text(runner.tokenizer)
    lines = [_prepare(json.loads(line), runner.intake, runner.max_seq_len, model, token_text) for _, line in chunk]
    requests = [r for x in lines if x.prepared for r in (*x.prepared.echo_scores, *(j for _, j in x.prepared.jobs))]
    answers = iter(runner.run(requests) if requests else [])
    rows, tokens = [], 0
    for x in lines:
        if x.error is not None:
            rows.append(_row(x.custom_id, x.error.status, x.error.body()))
            continue
        p = x.prepared
        scores = [next(answers) for _ in p.echo_scores]
        finals: list[GenerationResult] = [next(answers) for _ in p.jobs]
        if p.echo:
            p.builder.echoes = echoes(p, scores, runner.tokenizer, token_text)
        rows.append(_row(x.custom_id, 200, p.builder.response(finals)))
        tokens += sum(len(ids) for _, ids in p.prompts) + sum(len(f.output_ids) for f in finals)
    return rows, tokens


def _prepare(line: dict, intake: Intake, max_seq_len: int, model: str, token_text) -> Line:
    out = Line(line["custom_id"])
    try:
        request_model = ENDPOINTS[line["url"]]
        try:
            req = request_model.model_validate(line["body"])
        except ValidationError as e:
            raise validation_error(e) from None
        if req.stream:
            raise bad("stream", "stream is not supported in a batch (there is no one to stream to)")
        if request_model is ChatRequest:
            out.prepared = prepare_chat(req, intake, max_seq_len, model, token_text,
                                        lambda: ToolCallFormat.of(intake.tokenizer))
        else:
            out.prepared = prepare_completions(req, intake, model, token_text)
    except IntakeError as e:
        out.error = APIError(400, str(e), param=e.field)
    except APIError as e:
        out.error = e
    return out


def _token_text(tokenizer):
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else str(token_id)
    return text


def _row(custom_id: str, status: int, body: dict) -> dict[str, Any]:
    return {"id": custom_id, "custom_id": custom_id, "status_code": status,
            "output": json.dumps(output_line(custom_id, status, body), ensure_ascii=False)}


def output_line(custom_id: str, status: int, body: dict) -> dict[str, Any]:
    """A line of OpenAI's output (200) or error (4xx) file: the request's response."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}, "error": None}


def failed_line(custom_id: str | None, message: str) -> dict[str, Any]:
    """A line of OpenAI's error file for a request that got no response (the engine failed it)."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": "server_error", "message": message}}


# ---- the job's input and output files -----------------------------------------------------------
OUTPUT_FILE, ERROR_FILE = "output.jsonl", "errors.jsonl"


def find_requests(fs: pafs.FileSystem, groups: dict[str, list[str]], fmt: str, task: str) -> dict[str, list[str]]:
    """The input groups (inputs.resolve_inputs) with OpenAI batch files under "openai": every file
    with --format openai, and with auto the JSON Lines files whose first line is a request. Those
    are checked whole (check_files). A job reads requests or rows, not both."""
    if fmt == "auto" and "jsonl" in groups:
        requests = [p for p in groups["jsonl"] if (line := first_line(fs, p)) is not None and is_request(line)]
        rows = [p for p in groups["jsonl"] if p not in requests]
        groups = {k: v for k, v in {**groups, "jsonl": rows, "openai": requests}.items() if v}
    if "openai" not in groups:
        return groups
    if len(groups) > 1:
        others = [p for kind, paths in groups.items() if kind != "openai" for p in paths]
        raise ValueError(f"{groups['openai'][0]} holds OpenAI batch requests and {others[0]} does not: run them as "
                         "two jobs")
    if task != "generate":
        raise ValueError(f"OpenAI batch requests are completions: run them with `jamba batch generate`, not {task}")
    check_files(fs, groups["openai"])
    return groups


def forget_files(fs: pafs.FileSystem, root: str) -> None:
    """Remove the output and error files of an earlier run: they are written again at the end."""
    for name in (OUTPUT_FILE, ERROR_FILE):
        path = posixpath.join(root, name)
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def write_files(fs: pafs.FileSystem, root: str, parts: list[str]) -> tuple[int, int]:
    """OUT/output.jsonl (the 200s) and OUT/errors.jsonl (the rest, if any), in input order, from
    the committed parts (commit.committed); returns (answered, failed)."""
    ok, failed = [], []
    for path in parts:
        t = pq.read_table(path, filesystem=fs).to_pydict()
        where = list(zip(t["source_file"], t["source_row"]))
        if f"/{ERRORS_DIR}/" in path:  # the engine failed these: no response
            for at, error, raw in zip(where, t["error"], t["input"]):
                failed.append((at, json.dumps(failed_line(_custom_id(raw), error), ensure_ascii=False)))
        else:
            for at, status, line in zip(where, t["status_code"], t["output"]):
                (ok if status == 200 else failed).append((at, line))
    for name, lines in ((OUTPUT_FILE, ok), (ERROR_FILE, failed)):
        if lines or name == OUTPUT_FILE:
            text = "".join(line + "\n" for _, line in sorted(lines))
            write_atomic(fs, posixpath.join(root, name), text.encode("utf-8", "surrogateescape"))
    return len(ok), len(failed)


def _custom_id(raw: str) -> str | None:
    try:
        return json.loads(raw).get("custom_id")
    except (ValueError, AttributeError):
        return None

"""`jamba client`: the JSON Lines commands of `jamba generate|score|classify`, run by a server.

    jamba client generate --address HOST:PORT [--input rows.jsonl] [--output out.jsonl]
    jamba client stream   --address HOST:PORT [--input rows.jsonl] [--output out.jsonl]
    jamba client score    --address HOST:PORT [--input rows.jsonl] [--output out.jsonl]
    jamba client classify --address HOST:PORT [--input rows.jsonl] [--output out.jsonl]
    jamba client info     --address HOST:PORT [--output info.json]
    common options: [--application NAME] [--timeout S]
                    [--tls] [--ca-cert F] [--client-cert F --client-key F] [--tls-server-name NAME]
    generate and stream: [--json-schema FILE|JSON | --json-object | --regex RE | --grammar FILE|TEXT]
                    [--top-logprobs N] [--logit-bias ID=BIAS ...] [--min-tokens N]
                    [--repetition-penalty R] [--frequency-penalty F] [--presence-penalty P]

Rows and output rows follow the offline contracts (README, client/rows.py): a row names its
input with one of `prompt`, `input_ids` or `messages` (`text` too for score and classify) and,
for generate and stream, may carry sampling fields, which override the sampling options; the
output row is the input row plus the results (`top_logprobs` too when asked for). Input
defaults to stdin, output to stdout. Any certificate option implies --tls.

How rows become RPCs: `generate` groups the rows of a chunk that have identical sampling
parameters into Generate calls of up to --batch-size prompts (rows that differ only in, say,
`seed` each get their own call), and keeps up to --concurrency calls in flight; `score` and
`classify` batch the same way. `stream` runs one GenerateStream per row, in order, echoing the
text to stderr as it arrives and writing the finished row (with output_ids) to --output.

Deadlines: --timeout (default 60 s) bounds each call and the wait for a stream's first
message, so a server that is still starting, or whose application cannot be placed, fails the
command (DEADLINE_EXCEEDED) instead of hanging it; `stream --stream-timeout` bounds whole streams.

Errors: a malformed row is reported on stderr as `FILE:LINE: what is wrong` and its output row
is `{"line": N, "error": "..."}`; so is a row the server rejects (INVALID_ARGUMENT: a token id
out of range, a prompt longer than the context, ... -- a rejected batch is retried row by row to
find the culprit) or one that runs past --timeout (DEADLINE_EXCEEDED). The other rows are
still processed and the exit status is 1. A server whose queue is full (RESOURCE_EXHAUSTED) is
waited out for up to --wait-when-busy seconds. Any other failed RPC (UNAVAILABLE after retries,
FAILED_PRECONDITION, RESOURCE_EXHAUSTED past that wait, ...) concerns the server, not the row: it is printed
as `jamba client: CODE: message` and the command stops with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import grpc

from protos import jamba_pb2 as pb

from .client import JambaClient
from .messages import JambaError, sampling_params, to_chat
from .rows import STRUCTURE_FIELDS, RowError, parse_line, row_input, row_sampling, top_logprobs_field

# Nothing from cluster/ or stages/ (no torch, no Ray): this runs where only the client is installed.

log = logging.getLogger("jamba.client")

CHUNK_ROWS = 256  # rows read, run and written together; bounds memory on huge inputs
DEFAULT_TIMEOUT = 60.0  # seconds: a call to a server that never answers must not hang the command
ROW_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DEADLINE_EXCEEDED}
SPLIT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}  # worth retrying row by row


# ---- the parser -------------------------------------------------------------------------------
def add_client_parser(subparsers) -> argparse.ArgumentParser:
    """Add `client` (with generate|stream|classify|score|info below it) to a parser's subparsers."""
    help_ = "run rows against a jamba gRPC server (same JSON Lines as generate/score/classify)"
    p = subparsers.add_parser("client", help=help_, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_commands(p.add_subparsers(dest="client_command", required=True, metavar="COMMAND"))
    return p


def build_parser() -> argparse.ArgumentParser:
    """The same commands as a standalone program (`python -m client.cli generate ...`)."""
    p = argparse.ArgumentParser(prog="jamba client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_commands(p.add_subparsers(dest="client_command", required=True, metavar="COMMAND"))
    return p


def _add_commands(sub) -> None:
    for name, helptext in (
        ("generate", "complete prompts; adds output_ids, text, finish_reason"),
        ("stream", "complete prompts one at a time, echoing text to stderr as it is generated"),
        ("score", "log-likelihood of each row's tokens; adds token_logprobs, sum_logprob"),
        ("classify", "sequence classification; adds logits, probs, label"),
    ):
        s = sub.add_parser(name, help=helptext, description=helptext)
        _add_connection_args(s)
        s.add_argument("--input", default="-", help="JSON Lines file (default: stdin)")
        s.add_argument("--output", default="-", help="JSON Lines output file (default: stdout)")
        if name in ("generate", "stream"):
            _add_sampling_args(s)
        if name != "stream":
            s.add_argument("--batch-size", type=_positive_int, default=32, help="rows per RPC (default 32)")
            s.add_argument("--concurrency", type=_positive_int, default=4, help="RPCs in flight (default 4)")
            s.set_defaults(func=run_rows, task=name)
        else:
            s.add_argument("--stream-timeout", type=_timeout, default=0, metavar="SECONDS",
                           help="deadline of a whole stream (default 0: none, once the first message came)")
            s.set_defaults(func=run_stream, task=name)
    s = sub.add_parser("info", help="print the served model's ModelInfo as JSON", description="print ModelInfo as JSON")
    _add_connection_args(s)
    s.add_argument("--output", default="-", help="output file (default: stdout)")
    s.set_defaults(func=run_info, task="info")


def _add_connection_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--address", required=True, help="server HOST:PORT (Ray Serve's gRPC port)")
    s.add_argument("--application", help="Serve application to call (the `application` metadata key)")
    s.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"deadline of each call, and of a stream's first message (default {DEFAULT_TIMEOUT:g}; "
                        "0: none). A server that is still starting, or cannot place its application, is given up on "
                        "after it")
    s.add_argument("--wait-when-busy", type=float, default=300.0, metavar="SECONDS",
                   help="how long an RPC refused with RESOURCE_EXHAUSTED (queue full) is retried, pausing as the "
                        "server hints (default 300; 0: fail at once)")
    g = s.add_argument_group("TLS", "any certificate option implies --tls")
    g.add_argument("--tls", action="store_true", help="connect with TLS (default: plaintext)")
    g.add_argument("--ca-cert", help="PEM file of the CA that signed the server's certificate (default: system's)")
    g.add_argument("--client-cert", help="PEM certificate chain for mutual TLS (with --client-key)")
    g.add_argument("--client-key", help="PEM private key for mutual TLS (with --client-cert)")
    g.add_argument("--tls-server-name", help="name to check the server's certificate against (default: the host)")


def _add_sampling_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group(
        "sampling defaults", "for every row; a row's own field overrides its option (a row's json_schema, "
        "json_object, regex or grammar replaces the structure options)")
    g.add_argument("--json-schema", metavar="FILE|JSON", type=_json_schema,
                   help="constrain each output to JSON that validates against this JSON Schema (a file, or the "
                        "schema itself); the output ends (finish_reason stop) when the JSON is complete")
    g.add_argument("--json-object", action="store_true", help="constrain each output to a JSON object")
    g.add_argument("--regex", help="constrain each output to match this regular expression, whole")
    g.add_argument("--grammar", metavar="FILE|TEXT", type=_file_or_text,
                   help="constrain each output to this Lark grammar (llguidance's dialect; a file, or the text)")
    g.add_argument("--top-logprobs", type=int, metavar="N",
                   help="add each output token's N most likely alternatives (0-20) to the row, as top_logprobs")
    g.add_argument("--logit-bias", action="append", type=_logit_bias, metavar="ID=BIAS",
                   help="add BIAS (-100 to 100) to token ID's logit at every step; repeatable")
    g.add_argument("--min-tokens", type=int, metavar="N", help="no EOS or stop token before N output tokens")
    g.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="divide the positive logits of tokens already seen (prompt and output) by R, multiply the "
                        "negative ones (transformers'; 1 = off)")
    g.add_argument("--frequency-penalty", type=float, metavar="F",
                   help="subtract F x the token's count in the output from its logit (OpenAI's; -2 to 2)")
    g.add_argument("--presence-penalty", type=float, metavar="P",
                   help="subtract P from the logit of each token already in the output (OpenAI's; -2 to 2)")


def _json_schema(value: str) -> Any:
    """A JSON Schema from a file, or given inline."""
    path = Path(value)
    text = path.read_text(encoding="utf-8") if path.is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"the file {value}" if path.is_file() else "it (and no file has that name)"
        raise argparse.ArgumentTypeError(f"not JSON: {where}: {e.msg} at line {e.lineno} column {e.colno}") from None


def _file_or_text(value: str) -> str:
    path = Path(value)
    return path.read_text(encoding="utf-8") if path.is_file() else value


def _logit_bias(value: str) -> tuple[int, float]:
    token, sep, bias = value.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be ID=BIAS, e.g. 50256=-100, not {value!r}") from None


def sampling_defaults(args) -> dict[str, Any]:
    """The sampling options given on the command line, as sampling_params() kwargs."""
    given = {"json_schema": args.json_schema, "json_object": args.json_object or None, "regex": args.regex,
             "grammar": args.grammar, "top_logprobs": args.top_logprobs, "min_tokens": args.min_tokens,
             "logit_bias": dict(args.logit_bias) if args.logit_bias else None,
             "repetition_penalty": args.repetition_penalty, "frequency_penalty": args.frequency_penalty,
             "presence_penalty": args.presence_penalty}
    defaults = {k: v for k, v in given.items() if v is not None}
    try:
        sampling_params(**defaults)  # e.g. two structures: a setup error, before any row
    except (TypeError, ValueError) as e:
        raise ValueError(f"the sampling options: {e}") from None
    return defaults


def _timeout(s: str) -> float | None:
    t = float(s)
    if t < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {s}")
    return t or None


def _positive_int(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # setup problems: one line, as `jamba` does
        print(f"jamba client: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ---- commands ---------------------------------------------------------------------------------
def connect(args) -> JambaClient:
    certs = (args.ca_cert, args.client_cert, args.client_key, args.tls_server_name)
    if (args.client_cert is None) != (args.client_key is None):
        raise ValueError("--client-cert and --client-key go together")
    return JambaClient(args.address, application=args.application, timeout=args.timeout,
                       wait_when_busy=args.wait_when_busy, tls=args.tls or any(c is not None for c in certs),
                       root_certificates=args.ca_cert, certificate_chain=args.client_cert,
                       private_key=args.client_key, tls_server_name=args.tls_server_name)


def _fatal(e: JambaError) -> int:
    print(f"jamba client: {e}", file=sys.stderr)
    return 2


def run_info(args) -> int:
    with connect(args) as client:
        try:
            info = client.model_info()
        except JambaError as e:
            return _fatal(e)
    with _open_output(args.output) as out:
        out.write(json.dumps(info.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return 0


@dataclass
class Job:
    """A parsed row, ready to send."""

    lineno: int
    row: dict[str, Any]
    prompt: pb.Prompt
    params: dict[str, Any]  # sampling_params() kwargs (empty for score/classify)

    def key(self) -> bytes:
        """Rows whose keys are equal can share one Generate call."""
        return sampling_params(**self.params).SerializeToString(deterministic=True)


def run_rows(args) -> int:
    name = _check_input(args.input)
    t0, n_rows, n_errors = time.perf_counter(), 0, 0
    with connect(args) as client, _open_output(args.output) as out, \
            ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        defaults = sampling_defaults(args) if args.task == "generate" else {}
        for chunk in chunks(read_lines(args.input), CHUNK_ROWS):
            try:
                results = _run_chunk(client, pool, args.task, chunk, args.batch_size, defaults)
            except JambaError as e:
                pool.shutdown(wait=False, cancel_futures=True)  # don't start the chunk's other batches
                return _fatal(e)
            for lineno, res, error in results:
                n_errors += _write(out, name, lineno, res, error)
            out.flush()
            n_rows += len(chunk)
    log.info("%s: %d rows, %d failed in %.2fs", args.task, n_rows, n_errors, time.perf_counter() - t0)
    return 1 if n_errors else 0


def _run_chunk(client: JambaClient, pool: ThreadPoolExecutor, task: str, chunk: list[tuple[int, str]],
               batch_size: int, defaults: dict[str, Any]) -> list[tuple[int, dict[str, Any], str | None]]:
    """One (lineno, output row, error) per line of the chunk, in input order."""
    done: dict[int, tuple[dict[str, Any], str | None]] = {}
    groups: dict[bytes, list[Job]] = {}
    for lineno, line in chunk:
        try:
            job = parse_row(lineno, line, task, defaults)
            groups.setdefault(job.key(), []).append(job)
        except RowError as e:
            done[lineno] = ({"line": lineno, "error": str(e)}, str(e))
    batches = [jobs[i:i + batch_size] for jobs in groups.values() for i in range(0, len(jobs), batch_size)]
    for results in pool.map(lambda b: _run_batch(client, task, b), batches):
        done.update(results)
    return [(lineno, *done[lineno]) for lineno, _ in chunk]


def _run_batch(client: JambaClient, task: str, jobs: list[Job]) -> dict[int, tuple[dict[str, Any], str | None]]:
    """Run one RPC for `jobs` (which share their params). A rejected batch is retried row by row,
    so that only the rows the server objects to get errors; fatal errors propagate."""
    prompts = [j.prompt for j in jobs]
    try:
        if task == "generate":
            outs = [generation_row(j.row, c) for j, c in zip(jobs, client.generate(prompts, **jobs[0].params))]
        elif task == "score":
            outs = [score_row(j.row, r) for j, r in zip(jobs, client.score(prompts))]
        else:
            outs = [classify_row(j.row, r) for j, r in zip(jobs, client.classify(prompts))]
    except JambaError as e:
        if e.code not in ROW_CODES:
            raise
        if e.code in SPLIT_CODES and len(jobs) > 1:
            results: dict[int, tuple[dict[str, Any], str | None]] = {}
            for j in jobs:
                results.update(_run_batch(client, task, [j]))
            return results
        return {j.lineno: ({"line": j.lineno, "error": str(e)}, str(e)) for j in jobs}
    if len(outs) != len(jobs):
        raise JambaError(grpc.StatusCode.INTERNAL, f"sent {len(jobs)} inputs, got {len(outs)} results")
    return {j.lineno: (o, None) for j, o in zip(jobs, outs)}


def run_stream(args) -> int:
    name = _check_input(args.input)
    n_rows = n_errors = 0
    defaults = sampling_defaults(args)
    with connect(args) as client, _open_output(args.output) as out:
        for lineno, line in read_lines(args.input):
            n_rows += 1
            try:
                job = parse_row(lineno, line, "generate", defaults)
            except RowError as e:
                n_errors += _write(out, name, lineno, {"line": lineno, "error": str(e)}, str(e))
                continue
            print(f"[{lineno}] ", end="", file=sys.stderr, flush=True)
            try:
                with client.generate_stream(job.prompt, timeout=args.stream_timeout or 0,
                                            first_message_timeout=args.timeout, **job.params) as stream:
                    for delta in stream:
                        print(delta.text, end="", file=sys.stderr, flush=True)
            except JambaError as e:
                print(file=sys.stderr)
                if e.code not in ROW_CODES:
                    return _fatal(e)
                n_errors += _write(out, name, lineno, {"line": lineno, "error": str(e)}, str(e))
                continue
            print(file=sys.stderr)
            n_errors += _write(out, name, lineno, generation_row(job.row, stream.completion), None)
            out.flush()
    log.info("stream: %d rows, %d failed", n_rows, n_errors)
    return 1 if n_errors else 0


# ---- rows ---------------------------------------------------------------------------------------
def parse_row(lineno: int, line: str, task: str, defaults: dict[str, Any] | None = None) -> Job:
    """Check a line's shape (client/rows.py) and build its prompt and params: the row's sampling
    fields over `defaults` (the command line's). What needs the model (token ids in range, the chat
    template, fitting the context, a schema that compiles) is checked by the server."""
    row = parse_line(line)
    field, value = row_input(row, task)
    if field in ("prompt", "text"):
        prompt = pb.Prompt(text=value)
    elif field == "input_ids":
        try:
            prompt = pb.Prompt(token_ids=pb.TokenIds(ids=value))
        except ValueError as e:  # an id beyond int64
            raise RowError(f"input_ids: {e}") from None
    else:
        try:
            prompt = pb.Prompt(chat=to_chat(value))
        except (TypeError, ValueError) as e:
            raise RowError(f"messages: {e}") from None
    params: dict[str, Any] = {}
    if task == "generate":
        own = row_sampling(row)
        if any(k in own for k in STRUCTURE_FIELDS):  # the row's structure replaces the command line's
            defaults = {k: v for k, v in (defaults or {}).items() if k not in STRUCTURE_FIELDS}
        params = {**(defaults or {}), **own}
        try:
            sampling_params(**params)
        except (TypeError, ValueError) as e:
            raise RowError(str(e)) from None
    return Job(lineno, row, prompt, params)


def generation_row(row: dict[str, Any], c) -> dict[str, Any]:
    out = dict(row, output_ids=c.output_ids, text=c.text, finish_reason=c.finish_reason)
    if c.logprobs is not None:
        out["logprobs"] = c.logprobs
    if c.top_logprobs is not None:
        out["top_logprobs"] = top_logprobs_field(c.top_logprobs)
    return out


def score_row(row: dict[str, Any], r) -> dict[str, Any]:
    return dict(row, token_logprobs=r.token_logprobs, sum_logprob=r.sum_logprob)


def classify_row(row: dict[str, Any], r) -> dict[str, Any]:
    return dict(row, logits=r.logits, probs=r.probs, label=r.label)


# ---- files --------------------------------------------------------------------------------------
def _check_input(path: str) -> str:
    """The name errors are reported under; a missing file is a setup error, as for `jamba`."""
    if path == "-":
        return "<stdin>"
    if not Path(path).is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    return path


@contextmanager
def _open_output(path: str) -> Iterator[TextIO]:
    """stdout for '-', else the file; only a file we opened is closed."""
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(path, "w", encoding="utf-8") as f:
        yield f


def _write(out, name: str, lineno: int, res: dict[str, Any], error: str | None) -> int:
    """Write an output row; report an error row on stderr. Returns 1 for an error row."""
    if error is not None:
        print(f"{name}:{lineno}: {error}", file=sys.stderr)
    out.write(json.dumps(res, ensure_ascii=False) + "\n")
    return 0 if error is None else 1


def read_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-blank line of a JSON Lines file ('-' = stdin); bytes that
    are not UTF-8 survive as surrogates, so the row reports them instead of the read failing."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="surrogateescape")
    try:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, line
    finally:
        if f is not sys.stdin:
            f.close()


def chunks(it, n: int):
    """Lists of up to n items from an iterator."""
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


if __name__ == "__main__":
    sys.exit(main())

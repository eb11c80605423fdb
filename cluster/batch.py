"""`jamba batch`: offline score / classify / generate over large inputs, on Ray Data.

    jamba batch score    --model DIR --input PATH --output DIR [--stages P] [--pipelines N] [--address ADDR]
    jamba batch classify --model DIR --input 'rows/*.parquet' --output out/
    python -m cluster.batch generate --model DIR --input s3://bucket/prompts/ --output s3://bucket/completions/
    ray job submit --working-dir . -- python -m cluster.batch score --model /models/jamba --input ... --output ...

Input: JSON Lines or Parquet (by extension, or --format), given as a file, a directory (read
recursively; names starting with '.' or '_' are skipped) or a glob (`*`, `?`, `[...]`, `**`), on
the local disk or any filesystem pyarrow opens by URI (s3://, gs://, hdfs://, ...). --input may be
repeated. Rows follow the JSON Lines contracts of `jamba score|classify|generate` (cluster/rows.py):
one of prompt/text/input_ids/messages, optional sampling fields for generate, and an optional `id`.

Output directory:

    OUT/data/part-<key>.parquet     result rows (id, source_file, source_row, the inputs, the result fields)
    OUT/errors/part-<key>.parquet   bad rows: id, source_file, source_row, error (the reason), input (the raw row)
    OUT/_SUMMARY.json               written last, only when the job completed: counts, time, throughput
    OUT/_RUN                        the id of the run that owns the directory now (a fence, see below)

`id` is the row's own `id` (as a string) when it has one; otherwise `FILE:ROW`. Every row also
carries `source_file` and `source_row` (1-based; for JSON Lines the line number, blank lines
counted, as `jamba score` reports errors): that pair is the row's stable identity, and what
resume and exactly-once are keyed on, so rows need no `id` and duplicate ids do no harm.
Parquet columns have one type per task in every part (`messages` and fields outside the contract
are kept as JSON text, the latter in one `extra` column), so `pyarrow.parquet.read_table(OUT/data)`
and `ray.data.read_parquet(OUT/data)` read the whole result.

How it runs: Ray Data reads the input (a file-based datasource that tags each row with its file
and row number and drops rows already committed) and fans batches out with `map_batches` over an
actor pool of --pipelines actors. Each pool actor asks for no CPU itself and drives one pipeline
(cluster/pipeline.py): --stages stage actors in their own placement group, which hold the CPUs.
The pool actor runs each batch (cluster/cli.py's `run_chunk`, the same parsing and validation as
`jamba score`) and commits it itself; only a one-row summary per batch goes back to the driver
(and to a 0-CPU progress actor, from which the driver logs rows/s, tokens/s and the ETA every
--progress-interval seconds). If the pipeline refuses a request that the row checks let through,
the batch is rerun row by row and only that row goes to errors/; if the pipeline itself fails, the
job fails, and a rerun resumes it.

Exactly once, and resume:
- A batch's result is committed as one part file per directory, named by a hash of the
  (source_file, source_row) pairs it covers: the errors part (if any) first, then the data part,
  which is written even when empty and is the commit point. Each file is written under a hidden
  temporary name ('.' prefix, which every Parquet reader skips) and renamed into place (on object
  stores, where an object appears only once its upload completes, it is written in place).
  So a reader never sees a partial file, and a batch that Ray Data retries rewrites the same names.
- On start, the job deletes temporary files and any errors part without its data part (a commit
  cut short), removes the old _SUMMARY.json, writes a new run id to _RUN, then reads the
  (source_file, source_row) pairs of the committed parts and filters those rows out of the input.
  A rerun with the same arguments therefore runs only the rows not yet committed.
- Pool actors check _RUN before each commit, so the actors of a killed run that have not yet
  been reaped do not commit into a rerun. As a last guard, the job checks at the end that no row
  is committed twice (rewriting a part without such rows if one ever is) and that every input row
  is committed, then writes _SUMMARY.json.
- Rows are made durable by the rename (and an fsync on local disks); killing the job at any point
  loses at most the batches in flight.
- One job at a time per output directory. On a cluster of several nodes the output directory
  (and the model directory) must be shared storage: every pool actor writes its own parts.

CPUs: stage actors take `--cpus-per-stage` CPUs each; the job leaves `--reserve-cpus` CPUs (default
0.5 on clusters of up to 4 CPUs, 1 above) to Ray Data's read tasks, and tells Ray Data to stay
within them, so reading never waits on the pipelines and the job cannot starve itself. The rule:
    pipelines * stages * cpus_per_stage <= cluster CPUs - reserve
with cpus_per_stage defaulting to min(threads_per_stage, (cluster CPUs - reserve) / (pipelines * stages)).
The job refuses to start when the rule cannot hold.

A job with bad rows completes (exit status 0); the count is in the log and in _SUMMARY.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("jamba.batch")

TASKS = ("score", "classify", "generate")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
DATA_DIR, ERRORS_DIR, SUMMARY, RUN_FILE = "data", "errors", "_SUMMARY.json", "_RUN"
OBJECT_STORES = ("s3", "gcs", "abfs")  # an object appears whole, once its upload completes


@dataclass
class BatchConfig:
    task: str
    model: str
    inputs: list[str]
    output: str
    input_format: str = "auto"  # auto (by extension) | jsonl | parquet
    pipelines: int = 1
    stages: int = 1
    layer_split: str | None = None
    threads_per_stage: int = 1
    cpus_per_stage: float | None = None  # default: the CPU rule (module docstring)
    gpus_per_stage: float = 0
    reserve_cpus: float | None = None
    placement_strategy: str = "PACK"
    num_slots: int = 32
    max_batch_tokens: int = 2048
    max_seq_len: int | None = None
    block_size: int = 64
    num_blocks: int | None = None
    num_snapshots: int | None = None
    prefix_cache: bool = True
    dtype: str | None = None
    quantize: str | None = None  # int8-experts | int8 | int8-with-mamba (stages/quant.py)
    batch_size: int = 256  # rows per batch, and per committed part
    calls_per_actor: int = 2  # batches in flight per pipeline, so it never drains between batches
    progress_interval: float = 10.0
    count: bool = True  # count the remaining rows first (one extra read of the input), for the ETA
    extra: dict = field(default_factory=dict)


# ---- resources ---------------------------------------------------------------------------------
def plan_cpus(cluster_cpus: float, pipelines: int, stages: int, threads_per_stage: int = 1,
              cpus_per_stage: float | None = None, reserve_cpus: float | None = None) -> tuple[float, float]:
    """(cpus_per_stage, reserve): the stage actors' CPUs leave `reserve` CPUs to Ray Data."""
    if pipelines < 1 or stages < 1:
        raise ValueError("--pipelines and --stages must be at least 1")
    reserve = reserve_cpus if reserve_cpus is not None else (0.5 if cluster_cpus <= 4 else 1.0)
    if reserve <= 0:
        raise ValueError("--reserve-cpus must be > 0: Ray Data's read tasks need CPUs")
    avail = cluster_cpus - reserve
    n = pipelines * stages
    if cpus_per_stage is None:
        cpus_per_stage = math.floor(min(threads_per_stage, avail / n) * 100) / 100
    if cpus_per_stage <= 0 or n * cpus_per_stage > avail + 1e-9:
        raise ValueError(
            f"{pipelines} pipeline(s) of {stages} stage(s) at {cpus_per_stage} CPU each need "
            f"{n * max(cpus_per_stage, 0):g} CPUs, but the cluster has {cluster_cpus:g} and {reserve:g} are kept for "
            "Ray Data's reads: use fewer pipelines or stages, or a smaller --cpus-per-stage / --reserve-cpus")
    return cpus_per_stage, reserve


# ---- filesystems and input paths ---------------------------------------------------------------
def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem) or fs.type_name == "local"


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex over '/'-separated paths: * and ? stay within a component, ** spans them."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _kind_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for comp in COMPRESSION_SUFFIXES:
        if name.endswith(comp):
            name = name[: -len(comp)]
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def resolve_inputs(inputs: list[str], fmt: str = "auto") -> tuple[pafs.FileSystem, dict[str, list[str]]]:
    """Expand files, directories and globs to {"jsonl": [...], "parquet": [...]}, sorted, on one filesystem."""
    if fmt not in ("auto", "jsonl", "parquet"):
        raise ValueError(f"--format must be auto, jsonl or parquet, not {fmt!r}")
    fs0, found = None, {"jsonl": [], "parquet": []}
    for spec in inputs:
        fs, path = filesystem(spec)
        if fs0 is None:
            fs0 = fs
        elif fs.type_name != fs0.type_name:
            raise ValueError("all --input paths must be on one filesystem")
        files: list[str] = []
        if any(ch in path for ch in "*?["):
            parts = path.split("/")
            k = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
            base = "/".join(parts[:k]) or ("/" if path.startswith("/") else "")
            rx = _glob_regex(path)
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and rx.match(i.path)
                     and not _hidden(posixpath.relpath(i.path, base) if base else i.path)]
            if not files:
                raise FileNotFoundError(f"no input files match {spec}")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"input {spec} does not exist")
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                files = [i.path for i in infos if i.type == pafs.FileType.File
                         and not _hidden(posixpath.relpath(i.path, path))]
                files = [f for f in files if _kind_of(f, fmt)]
                if not files:
                    raise FileNotFoundError(f"no .jsonl/.json/.ndjson/.parquet files under {spec}")
            else:
                files = [path]
        for f in files:
            kind = _kind_of(f, fmt)
            if kind is None:
                raise ValueError(f"cannot tell the format of {f} from its name: pass --format jsonl or --format parquet")
            if f not in found[kind]:
                found[kind].append(f)
    return fs0, {k: sorted(v) for k, v in found.items() if v}


# ---- reading: rows tagged with (file, row), committed rows dropped -----------------------------
ROW_SCHEMA = pa.schema([("_file", pa.string()), ("_row", pa.int64()), ("_line", pa.binary())])


def _json_default(x):
    if isinstance(x, (bytes, bytearray)):
        return x.decode("utf-8", "replace")
    return str(x)


def _jsonl_rows(f, chunk_bytes: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
    lineno, rest = 0, b""
    while True:
        data = f.read(chunk_bytes)
        if not data:
            break
        data = rest + bytes(data)
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            lineno += 1
            if line.strip():
                yield lineno, line.rstrip(b"\r")
    if rest.strip():
        yield lineno + 1, rest.rstrip(b"\r")


def _parquet_rows(f, batch_rows: int) -> Iterator[tuple[int, bytes]]:
    n = 0
    for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
        for row in rb.to_pylist():
            n += 1
            row = {k: v for k, v in row.items() if v is not None}  # a null is an absent field
            yield n, json.dumps(row, ensure_ascii=False, default=_json_default).encode("utf-8")


_done_cache: dict = {}


def _done_for(ref, path: str):
    if ref is None:
        return None
    import ray

    key = ref.hex()
    if key not in _done_cache:
        _done_cache.clear()
        _done_cache[key] = ray.get(ref)
    arr = _done_cache[key].get(path)
    return None if arr is None else set(arr.tolist())


def _make_datasource(paths: list[str], kind: str, fs: pafs.FileSystem, done_ref, block_rows: int):
    from ray.data.datasource import FileBasedDatasource

    class JambaRowsDatasource(FileBasedDatasource):
        def __init__(self):
            super().__init__(paths, filesystem=fs)
            self._kind, self._done_ref, self._block_rows = kind, done_ref, block_rows

        def _open_input_source(self, filesystem, path, **open_args):
            if self._kind == "parquet":  # Parquet needs random access
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str):
            done = _done_for(self._done_ref, path)
            rows = _parquet_rows(f, self._block_rows) if self._kind == "parquet" else _jsonl_rows(f)
            nums, lines = [], []
            for n, line in rows:
                if done and n in done:
                    continue
                nums.append(n)
                lines.append(line)
                if len(nums) >= self._block_rows:
                    yield _rows_table(path, nums, lines)
                    nums, lines = [], []
            if nums:
                yield _rows_table(path, nums, lines)

        def get_name(self) -> str:
            return f"JambaRows({self._kind})"

    return JambaRowsDatasource()


def _rows_table(path: str, nums: list[int], lines: list[bytes]) -> pa.Table:
    return pa.Table.from_arrays([pa.array([path] * len(nums), pa.string()), pa.array(nums, pa.int64()),
                                 pa.array(lines, pa.binary())], schema=ROW_SCHEMA)


# ---- output tables -----------------------------------------------------------------------------
_BASE = [("id", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
         ("prompt", pa.string()), ("text", pa.string()), ("input_ids", pa.list_(pa.int64())), ("messages", pa.string())]
_SAMPLING = [("max_new_tokens", pa.int64()), ("temperature", pa.float64()), ("top_k", pa.int64()), ("top_p", pa.float64()),
             ("seed", pa.int64()), ("stop", pa.list_(pa.string())), ("stop_token_ids", pa.list_(pa.int64()))]
_RESULTS = {
    "score": [("token_logprobs", pa.list_(pa.float64())), ("sum_logprob", pa.float64())],
    "classify": [("logits", pa.list_(pa.float64())), ("probs", pa.list_(pa.float64())), ("label", pa.string())],
    "generate": [("output_ids", pa.list_(pa.int64())), ("finish_reason", pa.string()), ("logprobs", pa.list_(pa.float64()))],
}
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
                          ("error", pa.string()), ("input", pa.string())])


def output_schema(task: str) -> pa.Schema:
    return pa.schema(_BASE + (_SAMPLING if task == "generate" else []) + _RESULTS[task] + [("extra", pa.string())])


def _row_id(row: Any, file: str, n: int) -> str:
    v = row.get("id") if isinstance(row, dict) else None
    if v is None:
        return f"{file}:{n}"
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=_json_default)


def _utf8(s: str | None) -> str | None:
    """Arrow strings are UTF-8: a lone surrogate (JSON allows "\\ud800") becomes "?"."""
    if s is None:
        return None
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _cell(name: str, v: Any):
    if v is None:
        return None
    if isinstance(v, str):
        v = _utf8(v)
    if name == "messages":
        return _utf8(json.dumps(v, ensure_ascii=False, default=_json_default))
    if name == "stop" and isinstance(v, str):
        return [v]
    if name in ("temperature", "top_p") and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if name == "logprobs" and not isinstance(v, list):
        return None  # the input flag; the column holds the sampled tokens' log-probs
    return v


def output_table(task: str, rows: list[dict], srcs: list[tuple[str, int]]) -> pa.Table:
    schema = output_schema(task)
    names = set(schema.names)
    cols: dict[str, list] = {n: [] for n in schema.names}
    for row, (file, n) in zip(rows, srcs):
        cols["id"].append(_utf8(_row_id(row, file, n)))
        cols["source_file"].append(file)
        cols["source_row"].append(n)
        for name in schema.names[3:-1]:
            cols[name].append(_cell(name, row.get(name)))
        extra = {k: v for k, v in row.items() if k not in names}
        cols["extra"].append(_utf8(json.dumps(extra, ensure_ascii=False, default=_json_default)) if extra else None)
    return pa.Table.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema)


def error_table(errors: list[tuple[str, str, int, str, str]]) -> pa.Table:
    errors = [tuple(_utf8(x) if isinstance(x, str) else x for x in e) for e in errors]
    cols = list(zip(*errors)) if errors else [[] for _ in ERROR_SCHEMA]
    return pa.Table.from_arrays([pa.array(list(c), f.type) for c, f in zip(cols, ERROR_SCHEMA)], schema=ERROR_SCHEMA)


# ---- atomic writes -----------------------------------------------------------------------------
def write_atomic(fs: pafs.FileSystem, path: str, data: pa.Table | bytes) -> None:
    """`path` appears whole or not at all."""
    d, name = posixpath.split(path)
    if _is_local(fs):
        tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    pq.write_table(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    if fs.type_name in OBJECT_STORES:
        tmp = path
    else:
        tmp = posixpath.join(d, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    with fs.open_output_stream(tmp) as s:
        if isinstance(data, bytes):
            s.write(data)
        else:
            pq.write_table(data, s)
    if tmp != path:
        fs.move(tmp, path)


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as s:
            return s.read()
    except (FileNotFoundError, OSError):
        return None


def part_key(srcs: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for file, n in sorted(srcs):
        h.update(f"{file}\0{n}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


# ---- the pool actor: one pipeline, one batch -> one committed part -----------------------------
class BatchWorker:
    """Ray Data's map_batches UDF. Drives one pipeline; commits each batch as a part file."""

    def __init__(self, task: str, pipeline: dict, output: str, run_id: str, sink=None) -> None:
        from .pipeline import PipelineConfig, SyncPipeline

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.task, self.run_id, self.sink = task, run_id, sink
        self.fs, self.root = filesystem(output)
        self.pipe = SyncPipeline(PipelineConfig(**pipeline))
        self.lock = threading.Lock()
        self.ready_at = time.time()
        self.recoveries_reported = 0  # stage failures the pipeline recovered from, reported so far

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .cli import run_chunk

        t0 = time.perf_counter()
        files = batch.column("_file").to_pylist()
        nums = batch.column("_row").to_pylist()
        lines = [b.decode("utf-8", "surrogateescape") for b in batch.column("_line").to_pylist()]
        srcs = list(zip(files, nums))
        chunk = list(enumerate(lines))
        try:
            results, tokens = run_chunk(self.pipe, self.task, chunk)
        except Exception:
            sched = self.pipe.pipe.scheduler
            if sched.error is not None or sched.closed:
                raise  # the pipeline itself failed: fail the job (a rerun resumes)
            # A request the checks let through was refused: find it, row by row.
            results, tokens = [], 0
            for item in chunk:
                try:
                    res, n = run_chunk(self.pipe, self.task, [item])
                    results += res
                    tokens += n
                except Exception as e:
                    if sched.error is not None or sched.closed:
                        raise
                    results.append({"line": item[0], "error": f"{type(e).__name__}: {e}"})
        ok_rows, ok_srcs, errors = [], [], []
        for k, res in enumerate(results):
            if set(res) == {"line", "error"}:
                try:
                    row = json.loads(lines[k])
                except ValueError:
                    row = None
                errors.append((_row_id(row, *srcs[k]), files[k], nums[k], res["error"],
                               lines[k].encode("utf-8", "surrogateescape").decode("utf-8", "replace")))
            else:
                ok_rows.append(res)
                ok_srcs.append(srcs[k])
        key = part_key(srcs)
        committed = self._commit(key, output_table(self.task, ok_rows, ok_srcs), error_table(errors) if errors else None)
        done_at = time.time()
        with self.lock:  # stage failures the pipeline recovered from since the last report
            recoveries = len(self.pipe.pipe.scheduler.recoveries)
            new_recoveries, self.recoveries_reported = recoveries - self.recoveries_reported, recoveries
        if committed and self.sink is not None:
            self.sink.add.remote(len(srcs), len(errors), tokens, self.ready_at, done_at, new_recoveries)
        return pa.table({"part": [key], "rows": [len(srcs) if committed else 0], "failed": [len(errors) if committed else 0],
                         "tokens": [tokens], "seconds": [time.perf_counter() - t0], "committed": [committed],
                         "ready_at": [self.ready_at], "done_at": [done_at], "recoveries": [new_recoveries]})

    def _commit(self, key: str, data: pa.Table, errors: pa.Table | None) -> bool:
        name = f"part-{key}.parquet"
        with self.lock:
            if (_read_bytes(self.fs, posixpath.join(self.root, RUN_FILE)) or b"").decode() != self.run_id:
                logging.getLogger(__name__).warning("output %s now belongs to another run: part %s not committed", self.root, key)
                return False
            if errors is not None:
                write_atomic(self.fs, posixpath.join(self.root, ERRORS_DIR, name), errors)
            write_atomic(self.fs, posixpath.join(self.root, DATA_DIR, name), data)  # the commit point
        return True

    def __del__(self) -> None:  # Ray Data drops the pool gracefully at the end: free the stages
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            self.pipe = None
            try:
                pipe.close()
            except Exception:
                pass


# ---- the committed state of an output directory ------------------------------------------------
def _list(fs: pafs.FileSystem, d: str) -> list[pafs.FileInfo]:
    return [i for i in fs.get_file_info(pafs.FileSelector(d, allow_not_found=True)) if i.type == pafs.FileType.File]


def recover(fs: pafs.FileSystem, root: str) -> dict:
    """Undo what a killed run left half done: temporary files, errors parts whose data part never
    landed, and a summary that no longer describes the directory."""
    removed = {"temporary": 0, "orphan_errors": 0}
    for d in (root, posixpath.join(root, DATA_DIR), posixpath.join(root, ERRORS_DIR)):
        for i in _list(fs, d):
            if i.base_name.startswith(".") and i.base_name.endswith(".tmp"):
                fs.delete_file(i.path)
                removed["temporary"] += 1
    data = {i.base_name for i in _list(fs, posixpath.join(root, DATA_DIR))}
    for i in _list(fs, posixpath.join(root, ERRORS_DIR)):
        if i.base_name.startswith("part-") and i.base_name not in data:
            fs.delete_file(i.path)
            removed["orphan_errors"] += 1
    if fs.get_file_info(posixpath.join(root, SUMMARY)).type == pafs.FileType.File:
        fs.delete_file(posixpath.join(root, SUMMARY))
    return removed


def committed(fs: pafs.FileSystem, root: str) -> tuple[list[str], pa.Table]:
    """Committed parts (data, then errors, sorted) and their rows: source_file, source_row, part (index)."""
    data = {i.base_name for i in _list(fs, posixpath.join(root, DATA_DIR)) if i.base_name.startswith("part-")}
    paths = [posixpath.join(root, DATA_DIR, n) for n in sorted(data)]
    paths += [posixpath.join(root, ERRORS_DIR, i.base_name) for i in sorted(_list(fs, posixpath.join(root, ERRORS_DIR)),
                                                                               key=lambda i: i.base_name)
              if i.base_name in data]

    def read(k_path):
        k, path = k_path
        t = pq.read_table(path, columns=["source_file", "source_row"], filesystem=fs)
        return t.append_column("part", pa.array(np.full(t.num_rows, k, dtype=np.int64)))

    schema = pa.schema([("source_file", pa.string()), ("source_row", pa.int64()), ("part", pa.int64())])
    with ThreadPoolExecutor(8) as ex:
        tables = list(ex.map(read, enumerate(paths)))
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    return paths, table


def done_index(table: pa.Table) -> dict[str, np.ndarray]:
    """{source_file: sorted source rows} of committed rows."""
    if table.num_rows == 0:
        return {}
    enc = table.column("source_file").combine_chunks().dictionary_encode()
    idx = enc.indices.to_numpy(zero_copy_only=False)
    rows = table.column("source_row").to_numpy()
    order = np.lexsort((rows, idx))
    counts = np.bincount(idx, minlength=len(enc.dictionary))
    out, start = {}, 0
    for name, c in zip(enc.dictionary.to_pylist(), counts):
        out[name] = np.unique(rows[order[start : start + c]])
        start += c
    return out


def remove_duplicates(fs: pafs.FileSystem, paths: list[str], table: pa.Table) -> int:
    """Keep each (source_file, source_row) in its first part only; rewrite the others. Returns rows dropped."""
    if table.num_rows == 0:
        return 0
    seen: dict[tuple[str, int], int] = {}
    drop: dict[int, set] = {}
    for f, n, p in zip(table.column("source_file").to_pylist(), table.column("source_row").to_pylist(),
                       table.column("part").to_pylist()):
        if (f, n) in seen:
            drop.setdefault(p, set()).add((f, n))
        else:
            seen[(f, n)] = p
    for p, keys in drop.items():
        t = pq.read_table(paths[p], filesystem=fs)
        keep = [(f, n) not in keys for f, n in zip(t.column("source_file").to_pylist(), t.column("source_row").to_pylist())]
        log.warning("%s holds %d row(s) committed in another part too: rewriting it without them", paths[p], len(keys))
        write_atomic(fs, paths[p], t.filter(pa.array(keep)))
    return sum(len(k) for k in drop.values())


# ---- the job -----------------------------------------------------------------------------------
def _fmt_eta(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressSink:
    """Counts committed batches. As a 0-CPU actor it is where pool actors report each commit, so
    the driver can log progress while Ray Data holds the per-batch summaries back in blocks."""

    def __init__(self) -> None:
        self.rows = self.failed = self.tokens = self.parts = self.recoveries = 0
        self.ready_at: float | None = None  # when the first pipeline was ready (wall clock)
        self.done_at: float | None = None  # the last commit

    def add(self, rows: int, failed: int, tokens: int, ready_at: float | None, done_at: float | None,
            recoveries: int = 0) -> None:
        if ready_at is not None:
            self.ready_at = ready_at if self.ready_at is None else min(self.ready_at, ready_at)
        if done_at is not None:
            self.done_at = done_at if self.done_at is None else max(self.done_at, done_at)
        self.rows += rows
        self.failed += failed
        self.tokens += tokens
        self.parts += 1
        self.recoveries += recoveries

    def snapshot(self) -> "ProgressSink":
        return self


def progress_line(task: str, total: int | None, p: ProgressSink, wall0: float) -> str:
    # rates since the first pipeline was ready, so that start-up does not skew the ETA
    if p.ready_at is None:
        return f"{task}: starting the pipelines ({time.time() - wall0:.0f}s)"
    dt = max(time.time() - p.ready_at, 1e-9)
    rps, tps = p.rows / dt, p.tokens / dt
    s = f"{task}: {p.rows}"
    tail = ""
    if total:
        s += f"/{total} rows ({p.rows / total:.0%})"
        eta = (total - p.rows) / rps if rps > 0 else float("inf")
        tail = f", ETA {_fmt_eta(eta)}" if math.isfinite(eta) else ""
    else:
        s += " rows"
    return s + f", {p.failed} failed, {rps:.1f} rows/s, {tps:.0f} tokens/s" + tail


@contextlib.contextmanager
def _reporting(task: str, total: int | None, interval: float, sink, wall0: float):
    """Log progress every `interval` seconds from the sink actor, in a thread, while the job runs."""
    import ray

    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            try:
                log.info("%s", progress_line(task, total, ray.get(sink.snapshot.remote(), timeout=30), wall0))
            except Exception as e:  # progress is best effort
                log.debug("progress: %s", e)

    t = threading.Thread(target=loop, name="batch-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)


def preflight(cfg: BatchConfig) -> tuple[str, pafs.FileSystem, dict[str, list[str]]]:
    """Check what can be checked before touching Ray: the task, the model, the inputs."""
    from stages.config import JambaConfig

    from .cli import _check_head

    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {cfg.task!r}")
    if cfg.batch_size < 1 or cfg.calls_per_actor < 1:
        raise ValueError("--batch-size and --calls-per-actor must be at least 1")
    from stages.quant import check_mode

    check_mode(cfg.quantize)
    mfs, mpath = filesystem(cfg.model)
    if not _is_local(mfs):
        raise ValueError("--model must be a directory that every node can read (a local or shared path)")
    if not os.path.isfile(os.path.join(mpath, "config.json")):
        raise FileNotFoundError(f"{cfg.model} is not a model directory (no config.json)")
    _check_head(cfg.task, JambaConfig.from_file(mpath), mpath)
    in_fs, groups = resolve_inputs(cfg.inputs, cfg.input_format)
    return mpath, in_fs, groups


def run_job(cfg: BatchConfig) -> dict:
    """Run (or resume) a batch job on the connected Ray cluster; returns the summary."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.time()
    t0 = time.perf_counter()
    mpath, in_fs, groups = preflight(cfg)

    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    cps, reserve = plan_cpus(cluster_cpus, cfg.pipelines, cfg.stages, cfg.threads_per_stage, cfg.cpus_per_stage,
                             cfg.reserve_cpus)
    stage_cpus = cps * cfg.pipelines * cfg.stages

    fs, root = filesystem(cfg.output)
    if fs.type_name == in_fs.type_name:  # an output directory inside an input directory is not input
        groups = {k: [f for f in v if not f.startswith(root.rstrip("/") + "/")] for k, v in groups.items()}
        groups = {k: v for k, v in groups.items() if v}
        if not groups:
            raise FileNotFoundError("the only input files are inside the output directory")
    for d in (root, posixpath.join(root, DATA_DIR), posixpath.join(root, ERRORS_DIR)):
        fs.create_dir(d, recursive=True)
    removed = recover(fs, root)
    if any(removed.values()):
        log.info("cleaned up after an interrupted run: %d temporary file(s), %d uncommitted errors part(s)",
                 removed["temporary"], removed["orphan_errors"])
    run_id = uuid.uuid4().hex
    write_atomic(fs, posixpath.join(root, RUN_FILE), run_id.encode())  # fence off a killed run's actors
    _, before = committed(fs, root)
    done = done_index(before)
    already = sum(len(v) for v in done.values())
    if already:
        log.info("resuming: %d row(s) already committed in %s", already, cfg.output)

    with _ray_data_settings(cpu_limit=cluster_cpus - stage_cpus, progress_bars=log.isEnabledFor(logging.DEBUG)):
        read_cpus = min(1.0, reserve / 4)
        done_ref = ray.put(done) if done else None
        datasets = [ray.data.read_datasource(_make_datasource(paths, kind, in_fs, done_ref, cfg.batch_size), num_cpus=read_cpus)
                    for kind, paths in groups.items()]
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        remaining = ds.count() if cfg.count else None
        nfiles = sum(len(v) for v in groups.values())
        log.info("%s: %d input file(s), %s row(s) to run on %d pipeline(s) of %d stage(s), %g CPU per stage "
                 "(%g of %g cluster CPUs, %g kept for Ray Data)", cfg.task, nfiles,
                 "?" if remaining is None else remaining, cfg.pipelines, cfg.stages, cps, stage_cpus, cluster_cpus, reserve)

        progress = ProgressSink()  # what Ray Data hands back: the authoritative counts
        wall0, t_run = time.time(), time.perf_counter()
        lost = 0
        if remaining != 0:
            pipeline = dict(model_dir=mpath, num_stages=cfg.stages, layer_split=cfg.layer_split, num_slots=cfg.num_slots,
                            max_seq_len=cfg.max_seq_len, max_batch_tokens=cfg.max_batch_tokens,
                            max_queue=max(1024, cfg.batch_size * cfg.calls_per_actor), threads_per_stage=cfg.threads_per_stage,
                            cpus_per_stage=cps, gpus_per_stage=cfg.gpus_per_stage, placement_strategy=cfg.placement_strategy,
                            dtype=cfg.dtype, quantize=cfg.quantize, block_size=cfg.block_size,
                            num_blocks=cfg.num_blocks, num_snapshots=cfg.num_snapshots, prefix_cache=cfg.prefix_cache)
            sink = ray.remote(num_cpus=0)(ProgressSink).remote()
            out = ds.map_batches(
                BatchWorker, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=0,
                compute=ActorPoolStrategy(size=cfg.pipelines, max_tasks_in_flight_per_actor=cfg.calls_per_actor,
                                          max_concurrent_calls_per_actor=cfg.calls_per_actor,
                                          enable_true_multi_threading=cfg.calls_per_actor > 1),
                fn_constructor_kwargs=dict(task=cfg.task, pipeline=pipeline, output=cfg.output, run_id=run_id, sink=sink),
            )
            with _reporting(cfg.task, remaining, cfg.progress_interval, sink, wall0):
                for b in out.iter_batches(batch_size=None, batch_format="pyarrow"):
                    cols = ("rows", "failed", "tokens", "committed", "ready_at", "done_at", "recoveries")
                    for rows, failed, tokens, ok, ready_at, done_at, rec in zip(*(b.column(c).to_pylist() for c in cols)):
                        progress.add(rows, failed, tokens, ready_at, done_at, rec)
                        lost += not ok
            ray.kill(sink)
            if lost:
                raise RuntimeError(f"{lost} batch(es) were not committed: another run took over {cfg.output}")

        # ---- finish: exactly once, then the summary ----
        paths, after = committed(fs, root)
        dups = remove_duplicates(fs, paths, after)
        if dups:
            paths, after = committed(fs, root)
        total = after.num_rows
        if remaining is not None and total != already + remaining:
            raise RuntimeError(f"{cfg.output} holds {total} row(s), expected {already + remaining}: rerun the job to finish it")
        n_err = sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in paths if f"/{ERRORS_DIR}/" in p)
        secs = time.perf_counter() - t0
        run_secs = time.perf_counter() - t_run
        # steady state: from the first pipeline being ready to the last commit (no startup, no count pass)
        steady = (progress.done_at - progress.ready_at) if progress.ready_at and progress.done_at else 0.0
        summary = {
            "task": cfg.task, "model": cfg.model, "input": cfg.inputs, "output": cfg.output, "complete": True,
            "rows": total, "rows_ok": total - n_err, "rows_failed": n_err,
            "parts": sum(1 for p in paths if f"/{DATA_DIR}/" in p),
            "this_run": {
                "rows": progress.rows, "failed": progress.failed, "tokens": progress.tokens, "skipped_committed": already,
                "seconds": round(secs, 3), "processing_seconds": round(run_secs, 3),
                "rows_per_s": round(progress.rows / run_secs, 3) if run_secs > 0 else 0.0,
                "tokens_per_s": round(progress.tokens / run_secs, 3) if run_secs > 0 else 0.0,
                "startup_seconds": round(progress.ready_at - wall0, 3) if progress.ready_at else 0.0,
                "steady_seconds": round(steady, 3),
                "steady_rows_per_s": round(progress.rows / steady, 3) if steady > 0 else 0.0,
                "steady_tokens_per_s": round(progress.tokens / steady, 3) if steady > 0 else 0.0,
                "duplicates_removed": dups, "cleaned_up": removed,
                "stage_recoveries": progress.recoveries,  # stage failures the pipelines recovered from
            },
            "pipelines": cfg.pipelines, "stages": cfg.stages, "cpus_per_stage": cps, "reserve_cpus": reserve,
            "batch_size": cfg.batch_size, "run_id": run_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(fs, posixpath.join(root, SUMMARY), (json.dumps(summary, indent=2) + "\n").encode())
        if progress.recoveries:
            log.warning("the pipelines recovered from %d stage failure(s) during the run; no row was lost",
                        progress.recoveries)
        log.info("%s done: %d row(s) this run (%d failed, %d already committed), %d tokens in %.1fs: %.1f rows/s, "
                 "%.0f tokens/s; %s holds %d row(s), %d in errors/", cfg.task, progress.rows, progress.failed, already,
                 progress.tokens, secs, summary["this_run"]["rows_per_s"], summary["this_run"]["tokens_per_s"],
                 cfg.output, total, n_err)
        return summary


@contextlib.contextmanager
def _ray_data_settings(cpu_limit: float, progress_bars: bool):
    """Ray Data stays within the CPUs the stages leave (the CPU rule); restored afterwards."""
    from ray.data import DataContext
    from ray.data._internal.execution.interfaces import ExecutionResources

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits)
    ctx.enable_progress_bars, ctx.print_on_execution_start = progress_bars, False
    ctx.execution_options.resource_limits = ExecutionResources.for_limits(cpu=cpu_limit)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits = saved


# ---- command line ------------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=TASKS, help="score: token_logprobs, sum_logprob; classify: logits, probs, label; "
                   "generate: output_ids, text, finish_reason")
    p.add_argument("--model", help="checkpoint directory, readable on every node; default: the demo model "
                   "(models/, copied to $JAMBA_HOME in fp32 on first use)")
    p.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="JSON Lines or Parquet: a file, a directory or a glob, local or a URI (s3://...); repeatable")
    p.add_argument("--output", required=True, help="output directory (local or a URI); rerun with the same one to resume")
    p.add_argument("--format", dest="input_format", default="auto", choices=["auto", "jsonl", "parquet"],
                   help="input format (default: by file extension)")
    p.add_argument("--pipelines", type=int, default=1, help="pipelines (Ray Data pool actors), each its own stages")
    p.add_argument("--stages", type=int, default=1, help="stages per pipeline")
    p.add_argument("--layer-split", help="layers per stage ('9,9,...') or boundaries; default: balanced")
    p.add_argument("--threads-per-stage", type=int, default=1, help="torch threads of each stage actor")
    p.add_argument("--cpus-per-stage", type=float, default=None,
                   help="Ray CPUs per stage (default: min(threads, (cluster CPUs - reserve) / (pipelines x stages)))")
    p.add_argument("--reserve-cpus", type=float, default=None,
                   help="CPUs kept for Ray Data's reads (default 0.5 up to 4 cluster CPUs, else 1)")
    p.add_argument("--gpus-per-stage", type=float, default=0, help="GPUs per stage actor (1 on GPU nodes)")
    p.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    p.add_argument("--num-slots", type=int, default=32, help="sequences in flight per pipeline")
    p.add_argument("--max-batch-tokens", type=int, default=2048,
                   help="token budget of one microbatch; longer prompts go through in chunks")
    from .cli import add_cache_args

    add_cache_args(p)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: as stored)")
    from .cli import add_quantize_arg

    add_quantize_arg(p)
    p.add_argument("--batch-size", type=int, default=256, help="rows per batch, and per committed part file")
    p.add_argument("--calls-per-actor", type=int, default=2, help="batches in flight per pipeline")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, or start a local one)")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--no-count", dest="count", action="store_false",
                   help="do not count the input rows first (saves one read of the input; no ETA)")
    p.set_defaults(func=run_batch)


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """`jamba batch ...` (for cluster/cli.py's subparsers)."""
    helptext = "score, classify or generate over large JSON Lines / Parquet inputs on Ray Data; resumable"
    b = subparsers.add_parser("batch", help=helptext, description=__doc__.split("\n\n")[0] + "\n\n" + helptext,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(b)
    return b


def config_from_args(args) -> BatchConfig:
    keys = set(BatchConfig.__dataclass_fields__) - {"extra"}
    kw = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    kw["inputs"] = args.input
    kw["num_blocks"], kw["num_snapshots"] = args.kv_blocks, args.prefix_snapshots
    return BatchConfig(**kw)


def run_batch(args) -> int:
    import ray

    from .ray_log import ray_output_to_log
    from .resources import resolve_split

    if args.model is None:
        from stages.demo import ensure_demo_model

        args.model = str(ensure_demo_model("classification" if args.task == "classify" else "lm"))
        log.info("no --model given: using the demo model at %s", args.model)
    cfg = config_from_args(args)
    mpath, _, _ = preflight(cfg)  # a wrong path fails here, before a cluster is started or joined
    resolve_split(mpath, cfg.stages, cfg.layer_split)  # and so does an impossible split
    with ray_output_to_log(f"batch-{cfg.task}", getattr(args, "verbose", False)):
        own = not ray.is_initialized()
        if own:
            if args.address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=args.address, log_to_driver=False)
            else:  # a cluster of this machine alone, on loopback
                ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        try:
            run_job(cfg)
        finally:
            if own:
                ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see cluster/pipeline.py
    p = argparse.ArgumentParser(prog="python -m cluster.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and Ray Data's progress bars")
    _add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"jamba batch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the module under its real name, so Ray pickles its classes by reference, not by value.
    from cluster.batch import main as _main

    sys.exit(_main())

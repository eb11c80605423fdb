"""A batch job's input: files, directories and globs on any filesystem pyarrow opens, read as
rows tagged with their (file, row number), the rows already committed left out.

Globs: `*`, `?`, `[...]` within a path component, `**` across them, with the semantics of
Python's glob.translate (fsspec's copy of it, as Ray Data's own file listing uses fsspec); the
files are listed with pyarrow's filesystems, which is what the job reads and writes with.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from fsspec.utils import glob_translate
from ray.data.datasource import FileBasedDatasource

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")


# ---- filesystems and input paths ---------------------------------------------------------------
def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem) or fs.type_name == "local"


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
    """Expand files, directories and globs to {"jsonl": [...], "parquet": [...]}, sorted, on one
    filesystem; with fmt "openai" (OpenAI batch files, which are JSON Lines) every file is "openai"."""
    if fmt not in ("auto", "jsonl", "parquet", "openai"):
        raise ValueError(f"--format must be auto, jsonl, parquet or openai, not {fmt!r}")
    fs0, found = None, {"jsonl": [], "parquet": [], "openai": []}
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
            rx = re.compile(glob_translate(path))
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


def json_default(x):
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
            yield n, json.dumps(row, ensure_ascii=False, default=json_default).encode("utf-8")


_done_cache: dict = {}  # the done index of the job this process reads for: {ref: {file: rows}}


def _done_for(ref, path: str) -> set[int] | None:
    """The committed rows of `path`, from the job's done index (fetched once per process, not once
    per file: read tasks of one job share their worker processes)."""
    if ref is None:
        return None
    key = ref.hex()
    if key not in _done_cache:
        _done_cache.clear()
        _done_cache[key] = ray.get(ref)
    arr = _done_cache[key].get(path)
    return None if arr is None else set(arr.tolist())


class JambaRowsDatasource(FileBasedDatasource):
    """Ray Data reads the files with this: blocks of (_file, _row, _line), committed rows skipped."""

    def __init__(self, paths: list[str], kind: str, fs: pafs.FileSystem, done_ref, block_rows: int) -> None:
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
                yield rows_table(path, nums, lines)
                nums, lines = [], []
        if nums:
            yield rows_table(path, nums, lines)

    def get_name(self) -> str:
        return f"JambaRows({self._kind})"


def rows_table(path: str, nums: list[int], lines: list[bytes]) -> pa.Table:
    return pa.Table.from_arrays([pa.array([path] * len(nums), pa.string()), pa.array(nums, pa.int64()),
                                 pa.array(lines, pa.binary())], schema=ROW_SCHEMA)

"""Exactly once: how a batch is committed to the output directory, and what the directory holds.

A batch's result is committed as one part file per directory, named by a hash of the
(source_file, source_row) pairs it covers: the errors part (if any) first, then the data part,
which is written even when empty and is the commit point. Each file is written under a hidden
temporary name ('.' prefix, which every Parquet reader skips) and renamed into place (on object
stores, where an object appears only once its upload completes, it is written in place). So a
reader never sees a partial file, and a batch that Ray Data retries rewrites the same names.
`recover` undoes what a killed run left half done; `committed` and `done_index` say which rows are
in; `remove_duplicates` is the last guard.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .inputs import is_local

log = logging.getLogger("jamba.batch")

DATA_DIR, ERRORS_DIR, SUMMARY, RUN_FILE = "data", "errors", "_SUMMARY.json", "_RUN"
OBJECT_STORES = ("s3", "gcs", "abfs")  # an object appears whole, once its upload completes


# ---- atomic writes -----------------------------------------------------------------------------
def write_atomic(fs: pafs.FileSystem, path: str, data: pa.Table | bytes) -> None:
    """`path` appears whole or not at all."""
    d, name = posixpath.split(path)
    if is_local(fs):
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


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
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

"""The pool actor of a batch job: Ray Data's map_batches UDF. Each one drives one engine (a
pipeline of stages in a placement group of its own) and commits every batch it runs as a part
file, checking first that its run still owns the output directory (the _RUN fence)."""

from __future__ import annotations

import json
import logging
import posixpath
import threading
import time

import pyarrow as pa

from cluster.runtime.config import PipelineConfig
from cluster.runtime.pipeline import SyncPipeline

from . import openai_batch
from .commit import DATA_DIR, ERRORS_DIR, RUN_FILE, part_key, read_bytes, write_atomic
from .inputs import filesystem
from .outputs import error_table, output_table, row_id
from .rows import run_chunk


class BatchWorker:
    """Ray Data's map_batches UDF. Drives one pipeline; commits each batch as a part file."""

    def __init__(self, task: str, engine: PipelineConfig, output: str, run_id: str, sink=None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.task, self.run_id, self.sink = task, run_id, sink  # task "openai": OpenAI batch requests
        self.model_name = posixpath.basename(engine.model_dir.rstrip("/"))  # what OpenAI responses name
        self.fs, self.root = filesystem(output)
        self.pipe = SyncPipeline(engine)
        self.lock = threading.Lock()
        self.ready_at = time.time()
        self.recoveries_reported = 0  # stage failures the pipeline recovered from, reported so far

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        files = batch.column("_file").to_pylist()
        nums = batch.column("_row").to_pylist()
        lines = [b.decode("utf-8", "surrogateescape") for b in batch.column("_line").to_pylist()]
        srcs = list(zip(files, nums))
        chunk = list(enumerate(lines))
        try:
            results, tokens = self._run(chunk)
        except Exception:
            sched = self.pipe.engine.scheduler
            if sched.error is not None or sched.closed:
                raise  # the pipeline itself failed: fail the job (a rerun resumes)
            # A request the checks let through was refused: find it, row by row.
            results, tokens = [], 0
            for item in chunk:
                try:
                    res, n = self._run([item])
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
                errors.append((row_id(row, *srcs[k]), files[k], nums[k], res["error"],
                               lines[k].encode("utf-8", "surrogateescape").decode("utf-8", "replace")))
            else:
                ok_rows.append(res)
                ok_srcs.append(srcs[k])
        key = part_key(srcs)
        committed = self._commit(key, output_table(self.task, ok_rows, ok_srcs), error_table(errors) if errors else None)
        done_at = time.time()
        with self.lock:  # stage failures the pipeline recovered from since the last report
            recoveries = len(self.pipe.engine.scheduler.recoveries)
            new_recoveries, self.recoveries_reported = recoveries - self.recoveries_reported, recoveries
        if committed and self.sink is not None:
            self.sink.add.remote(len(srcs), len(errors), tokens, self.ready_at, done_at, new_recoveries)
        return pa.table({"part": [key], "rows": [len(srcs) if committed else 0], "failed": [len(errors) if committed else 0],
                         "tokens": [tokens], "seconds": [time.perf_counter() - t0], "committed": [committed],
                         "ready_at": [self.ready_at], "done_at": [done_at], "recoveries": [new_recoveries]})

    def _run(self, chunk: list[tuple[int, str]]) -> tuple[list[dict], int]:
        if self.task == "openai":
            return openai_batch.run_chunk(self.pipe, chunk, self.model_name)
        return run_chunk(self.pipe, self.task, chunk)

    def _commit(self, key: str, data: pa.Table, errors: pa.Table | None) -> bool:
        name = f"part-{key}.parquet"
        with self.lock:
            if (read_bytes(self.fs, posixpath.join(self.root, RUN_FILE)) or b"").decode() != self.run_id:
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

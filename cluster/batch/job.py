"""A batch job: its configuration, the CPU rule, and run_job, which runs (or resumes) it on the
connected Ray cluster. The package's docstring (__init__.py) says how a job runs, what it writes
and why every row is committed exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import posixpath
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, DataContext
from ray.data._internal.execution.interfaces import ExecutionResources

from cluster.runtime.config import PipelineConfig
from stages.config import JambaConfig, check_quant_mode

from .commit import (DATA_DIR, ERRORS_DIR, RUN_FILE, SUMMARY, committed, done_index, recover, remove_duplicates,
                     write_atomic)
from . import openai_batch
from .inputs import JambaRowsDatasource, filesystem, is_local, resolve_inputs
from .progress import ProgressSink, reporting
from .rows import TASKS, check_task
from .worker import BatchWorker

log = logging.getLogger("jamba.batch")


@dataclass
class BatchConfig:
    task: str  # score | classify | generate
    inputs: list[str]  # files, directories or globs, local or URIs
    output: str  # the output directory; a rerun with the same one resumes
    engine: PipelineConfig  # each pipeline's (cpus_per_stage None: the CPU rule below)
    input_format: str = "auto"  # auto (by extension; OpenAI batch files by their lines) | jsonl | parquet | openai
    pipelines: int = 1  # Ray Data pool actors, each driving a pipeline of its own
    reserve_cpus: float | None = None  # CPUs kept for Ray Data's reads (default: 0.5 up to 4 cluster CPUs, else 1)
    batch_size: int = 256  # rows per batch, and per committed part
    calls_per_actor: int = 2  # batches in flight per pipeline, so it never drains between batches
    progress_interval: float = 10.0
    count: bool = True  # count the remaining rows first (one extra read of the input), for the ETA


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


def preflight(cfg: BatchConfig) -> tuple[str, pafs.FileSystem, dict[str, list[str]]]:
    """Check what can be checked before touching Ray: the task, the model, the inputs."""
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {cfg.task!r}")
    if cfg.batch_size < 1 or cfg.calls_per_actor < 1:
        raise ValueError("--batch-size and --calls-per-actor must be at least 1")
    check_quant_mode(cfg.engine.quantize)
    mfs, mpath = filesystem(cfg.engine.model_dir)
    if not is_local(mfs):
        raise ValueError("--model must be a directory that every node can read (a local or shared path)")
    if not os.path.isfile(os.path.join(mpath, "config.json")):
        raise FileNotFoundError(f"{cfg.engine.model_dir} is not a model directory (no config.json)")
    check_task(cfg.task, JambaConfig.from_file(mpath), mpath)
    in_fs, groups = resolve_inputs(cfg.inputs, cfg.input_format)
    groups = openai_batch.find_requests(in_fs, groups, cfg.input_format, cfg.task)
    return mpath, in_fs, groups


def run_job(cfg: BatchConfig) -> dict:
    """Run (or resume) a batch job on the connected Ray cluster; returns the summary."""
    started = time.time()
    t0 = time.perf_counter()
    mpath, in_fs, groups = preflight(cfg)
    openai = "openai" in groups  # OpenAI batch requests (openai_batch.py), not rows

    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    stages = cfg.engine.num_stages
    cps, reserve = plan_cpus(cluster_cpus, cfg.pipelines, stages, cfg.engine.threads_per_stage,
                             cfg.engine.cpus_per_stage, cfg.reserve_cpus)
    stage_cpus = cps * cfg.pipelines * stages

    fs, root = filesystem(cfg.output)
    if fs.type_name == in_fs.type_name:  # an output directory inside an input directory is not input
        groups = {k: [f for f in v if not f.startswith(root.rstrip("/") + "/")] for k, v in groups.items()}
        groups = {k: v for k, v in groups.items() if v}
        if not groups:
            raise FileNotFoundError("the only input files are inside the output directory")
    for d in (root, posixpath.join(root, DATA_DIR), posixpath.join(root, ERRORS_DIR)):
        fs.create_dir(d, recursive=True)
    removed = recover(fs, root)
    if openai:
        openai_batch.forget_files(fs, root)
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
        datasets = [ray.data.read_datasource(JambaRowsDatasource(paths, kind, in_fs, done_ref, cfg.batch_size),
                                              num_cpus=read_cpus)
                    for kind, paths in groups.items()]
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        remaining = ds.count() if cfg.count else None
        nfiles = sum(len(v) for v in groups.values())
        log.info("%s: %d input file(s), %s row(s) to run on %d pipeline(s) of %d stage(s), %g CPU per stage "
                 "(%g of %g cluster CPUs, %g kept for Ray Data)", cfg.task, nfiles,
                 "?" if remaining is None else remaining, cfg.pipelines, stages, cps, stage_cpus, cluster_cpus, reserve)

        progress = ProgressSink()  # what Ray Data hands back: the authoritative counts
        wall0, t_run = time.time(), time.perf_counter()
        lost = 0
        if remaining != 0:
            engine = dataclasses.replace(cfg.engine, model_dir=mpath, cpus_per_stage=cps,
                                         max_queue=max(cfg.engine.max_queue, cfg.batch_size * cfg.calls_per_actor))
            sink = ray.remote(num_cpus=0)(ProgressSink).remote()
            out = ds.map_batches(
                BatchWorker, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=0,
                compute=ActorPoolStrategy(size=cfg.pipelines, max_tasks_in_flight_per_actor=cfg.calls_per_actor,
                                          max_concurrent_calls_per_actor=cfg.calls_per_actor,
                                          enable_true_multi_threading=cfg.calls_per_actor > 1),
                fn_constructor_kwargs=dict(task="openai" if openai else cfg.task, engine=engine, output=cfg.output,
                                           run_id=run_id, sink=sink),
            )
            with reporting(cfg.task, remaining, cfg.progress_interval, sink, wall0):
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
        files = {}
        if openai:  # OpenAI's output and error files; a request answered with a 400 failed too
            _, n_err = openai_batch.write_files(fs, root, paths)
            files = {"format": "openai", "output_file": posixpath.join(cfg.output, openai_batch.OUTPUT_FILE),
                     "error_file": posixpath.join(cfg.output, openai_batch.ERROR_FILE) if n_err else None}
        secs = time.perf_counter() - t0
        run_secs = time.perf_counter() - t_run
        # steady state: from the first pipeline being ready to the last commit (no startup, no count pass)
        steady = (progress.done_at - progress.ready_at) if progress.ready_at and progress.done_at else 0.0
        summary = {
            "task": cfg.task, "model": cfg.engine.model_dir, "input": cfg.inputs, "output": cfg.output, "complete": True,
            "rows": total, "rows_ok": total - n_err, "rows_failed": n_err, **files,
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
            "pipelines": cfg.pipelines, "stages": stages, "cpus_per_stage": cps, "reserve_cpus": reserve,
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
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits)
    ctx.enable_progress_bars, ctx.print_on_execution_start = progress_bars, False
    ctx.execution_options.resource_limits = ExecutionResources.for_limits(cpu=cpu_limit)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits = saved

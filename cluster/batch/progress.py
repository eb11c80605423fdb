"""A batch job's progress line: rows, failures, rows/s, tokens/s and the ETA, logged every few
seconds from the commits the pool actors report to a 0-CPU actor.

Why not Ray Data's progress bars: they count rows through operators, not tokens or failed rows,
and redraw a terminal bar, which a log file or a Kubernetes pod's output shows as noise; they
stay available with -v. Rates are taken from when the first pipeline was ready, so that start-up
(placing and loading the stages) does not skew the ETA.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time

log = logging.getLogger("jamba.batch")


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
def reporting(task: str, total: int | None, interval: float, sink, wall0: float):
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

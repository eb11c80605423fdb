"""One Serve replica's engine, and what the front ends need of it: the small interface the gRPC
API (grpc_api.py) and the OpenAI API (openai_api.py) are written against.

    replica.engine()        the engine (cluster/runtime/engine.py), or NotReadyError saying why
                            there is none yet (UNAVAILABLE over gRPC, 503 over HTTP)
    replica.name, .config   the application's name and the checkpoint's config
    replica.metrics         the Prometheus metrics both APIs count into
    replica.options         the service's own settings (stream interval, HTTP request timeout)

Start-up: a replica is up in seconds and places and loads its stages in the background. Until
they serve it answers every call UNAVAILABLE (HTTP 503), saying what it waits for ("waiting for
resources: 2 stage bundle(s) of 1 CPU, PACK", "loading layers: 1 of 2 stage(s) up"), and Serve's
router (routing.py) sends calls to ready replicas while there are any. Without this, a call made
while the application deploys waits in Serve's proxy until a replica is up, and for ever if the
stages cannot be placed. (start_in_background=False restores that: see app.py:build_app.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import ray
from ray.serve import metrics  # ray.util.metrics, tagged with the application, deployment and replica

from cluster.runtime.config import PipelineConfig, plan_pipeline
from cluster.runtime.pipeline import Pipeline

log = logging.getLogger("ray.serve")


class NotReadyError(Exception):
    """The replica's pipeline does not serve yet (its stages are being placed or loaded), or it
    failed to start: UNAVAILABLE over gRPC, 503 with Retry-After over HTTP."""

    retry_after = 5.0  # seconds


@dataclass(frozen=True)
class ReplicaOptions:
    """The service's own settings (the engine's are a PipelineConfig)."""

    name: str
    # Place and load the stages after the replica is up, answering UNAVAILABLE meanwhile (False:
    # the replica is up only once its pipeline serves; app.py:build_app says when that is needed).
    start_in_background: bool = True
    # At most one stream message per interval: tokens produced meanwhile go out together. Each
    # message costs Serve's proxy and replica CPU, so with many streams on few cores an interval
    # longer than a stream's time per token trades smoothness for throughput (BENCHMARKS.md:
    # 250 ms); 0 sends every token at once.
    stream_interval_ms: float = 0.0
    # Serve's HTTP request timeout, also the scheduler's deadline for HTTP requests: a request
    # the proxy gives up on frees its slots at the same moment.
    request_timeout_s: float | None = None


@dataclass
class Startup:
    """Where the replica's pipeline start is (Pipeline.start's progress)."""

    phase: str = "starting"  # then placing, loading, connecting; at last ready or failed
    detail: str = "starting the pipeline"
    since: float = field(default_factory=time.monotonic)
    error: str | None = None

    def update(self, phase: str, detail: str) -> None:
        if phase != self.phase:
            log.info("pipeline start: %s", detail)
        self.phase, self.detail = phase, detail

    def state(self) -> dict:
        return {"phase": self.phase, "detail": self.detail, "seconds": round(time.monotonic() - self.since, 1),
                "error": self.error}


@dataclass
class Metrics:
    requests: metrics.Counter
    tokens_in: metrics.Counter
    tokens_out: metrics.Counter
    ttft: metrics.Histogram
    itl: metrics.Histogram
    queue_depth: metrics.Gauge
    slots_in_use: metrics.Gauge
    stage_busy: metrics.Gauge
    pipeline_up: metrics.Gauge
    recoveries: metrics.Gauge
    prefix_queries: metrics.Counter
    prefix_hits: metrics.Counter

    @classmethod
    def create(cls) -> "Metrics":
        ms = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
        return cls(
            metrics.Counter("jamba_requests_total", "RPCs by method and status", tag_keys=("method", "code")),
            metrics.Counter("jamba_tokens_in_total", "prompt tokens received"),
            metrics.Counter("jamba_tokens_out_total", "tokens generated"),
            metrics.Histogram("jamba_time_to_first_token_seconds", "time to first token", boundaries=ms),
            metrics.Histogram("jamba_inter_token_latency_seconds", "time between streamed tokens", boundaries=ms),
            metrics.Gauge("jamba_queue_depth", "requests waiting for a slot"),
            metrics.Gauge("jamba_slots_in_use", "sequence slots in use"),
            metrics.Gauge("jamba_stage_busy_seconds", "seconds each stage spent computing", tag_keys=("stage",)),
            metrics.Gauge("jamba_pipeline_up", "1 while the replica's pipeline serves (or is recovering); 0 while it starts, and once it failed"),
            metrics.Gauge("jamba_stage_recoveries", "stage failures this replica's pipeline recovered from"),
            # hit rate = rate(hits) / rate(queries), as vLLM's prefix_cache_{queries,hits} counters
            metrics.Counter("jamba_prefix_cache_queries_total", "prompt tokens looked up in the prefix cache"),
            metrics.Counter("jamba_prefix_cache_hits_total", "prompt tokens found in the prefix cache (not computed)"),
        )


class Replica:
    def __init__(self, cfg: PipelineConfig, options: ReplicaOptions) -> None:
        """Checks what can fail at once (a bad configuration: Serve reports the application
        DEPLOY_FAILED with its message, before anything is placed). `start` starts the pipeline."""
        self.cfg, self.options, self.name = cfg, options, options.name
        self.plan = plan_pipeline(cfg)
        self.config = self.plan.config
        self.pipe: Pipeline | None = None  # set once the pipeline serves
        self.metrics = Metrics.create()
        self.metrics.pipeline_up.set(0)
        self.startup = Startup()
        self._tasks: list[asyncio.Task] = []

    async def start(self, reraise: bool = False) -> None:
        """Place and load the stages; with `reraise`, a failure raises (else the replica answers
        with it, and check_health fails so that Serve replaces the replica)."""
        try:
            pipe = await Pipeline.start(self.cfg, progress=self.startup.update, plan=self.plan)
        except Exception as e:
            self.startup.update("failed", f"the pipeline failed to start: {type(e).__name__}: {e}")
            self.startup.error = f"{type(e).__name__}: {e}"
            log.exception("JambaService %s: the pipeline failed to start; Serve replaces this replica", self.name)
            if reraise:
                raise
            return
        self.pipe = pipe
        self.startup.update("ready", f"serving, {len(pipe.splits)} stage(s) {pipe.splits}")
        self.metrics.pipeline_up.set(1)
        self._tasks.append(asyncio.get_running_loop().create_task(self._report_stats()))
        log.info("JambaService %s ready: %d stage(s) %s, started in %.1fs", self.name, len(pipe.splits), pipe.splits,
                 time.monotonic() - self.startup.since)

    def start_in_background(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self.start()))

    def engine(self) -> Pipeline:
        """The engine, or NotReadyError saying why there is none yet."""
        if self.pipe is not None:
            return self.pipe
        st = self.startup
        if st.error is not None:
            raise NotReadyError(f"application {self.name!r} is unavailable: its pipeline failed to start "
                                f"({st.error}); Serve replaces the replica")
        raise NotReadyError(f"application {self.name!r} is starting: {st.detail} "
                            f"({time.monotonic() - st.since:.0f}s so far); retry later")

    @property
    def ready(self) -> bool:
        return self.pipe is not None

    def deadline(self) -> float | None:
        """The scheduler's deadline for an HTTP request: a little before Serve's own request
        timeout, so that the client gets the API's 504 rather than the proxy's plain 408 (and
        the slots are freed either way)."""
        t = self.options.request_timeout_s
        return time.time() + max(0.1, 0.95 * t - 0.2) if t else None

    # ---- health and statistics ------------------------------------------------------------------
    async def check_health(self) -> None:
        """Raises when the replica should be replaced. A pipeline that is bringing a stage back is
        healthy (reloading a large stage can outlast Serve's health-check timeout; the scheduler's
        recover timeout bounds it), one that gave up is not; so is a starting one."""
        if self.startup.error is not None:
            raise RuntimeError(f"the pipeline failed to start: {self.startup.error}")
        if self.pipe is None:
            return  # starting: healthy, and answering UNAVAILABLE meanwhile
        sched = self.pipe.scheduler
        if sched.error is not None:
            self.metrics.pipeline_up.set(0)
            raise RuntimeError(f"pipeline failed: {sched.error}")
        if sched.recovering:
            return
        recoveries = len(sched.recoveries)
        try:
            await asyncio.wait_for(self.pipe.stage_stats(), timeout=20)
        except ray.exceptions.ActorUnavailableError:
            pass  # a stage that died while idle is restarting; the next microbatch waits for it
        except (ray.exceptions.RayActorError, asyncio.TimeoutError):
            # A stage that went silent while we asked: the data plane declares it lost, and its
            # actor, killed for good, fails the call; the replica is healthy if it is being or was
            # replaced meanwhile.
            if not (sched.recovering or len(sched.recoveries) > recoveries):
                raise

    async def stats(self) -> dict:
        pipe = self.engine()
        dp = pipe.dataplane
        return {"scheduler": pipe.scheduler.stats(), "stages": await pipe.stage_stats(),
                # each recovery: its cause, when it was detected and recovered (time.time()), its reload
                "recoveries": [dict(r) for r in pipe.scheduler.recoveries],
                # where the data plane listens (each stage's inbox, on its node's address; the answer
                # socket, on the replica's), and the strangers turned away at the answer socket
                "dataplane": {"inboxes": dp.inboxes, "answers": dp.answer_address, "rejected": dp.rejected}}

    async def _report_stats(self) -> None:
        counted = {"prompt_tokens": 0, "cached_tokens": 0}
        m = self.metrics
        while True:
            s = self.pipe.scheduler.stats()
            for key, counter in (("prompt_tokens", m.prefix_queries), ("cached_tokens", m.prefix_hits)):
                if s["cache"][key] > counted[key]:
                    counter.inc(s["cache"][key] - counted[key])
                counted[key] = s["cache"][key]
            m.queue_depth.set(s["waiting"])
            m.slots_in_use.set(s["slots_in_use"])
            m.recoveries.set(s["recoveries"])
            m.pipeline_up.set(0 if self.pipe.scheduler.error else 1)
            try:
                for i, info in enumerate(await self.pipe.stage_stats()):
                    m.stage_busy.set(info["busy_seconds"], tags={"stage": str(i)})
            except Exception:  # a dead stage shows in check_health
                pass
            await asyncio.sleep(5)

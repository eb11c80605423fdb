"""The service: a Ray Serve deployment whose replica owns one pipeline, served over gRPC and HTTP.

This module translates between the protos (protos/jamba.proto) and the scheduler's own types;
the scheduler knows nothing of gRPC. The same replica serves the OpenAI-compatible HTTP API
(cluster/openai_api.py, through Serve's HTTP proxy) on the same pipeline. Each replica places its
stages in a placement group of its own, so R replicas are R independent pipelines (data
parallel) that Serve load-balances and can autoscale.

Start-up: a replica is up in seconds and places and loads its stages in the background. Until
they serve it answers every call UNAVAILABLE (HTTP 503), saying what it waits for ("waiting for
resources: 2 stage bundle(s) of 1 CPU, PACK", "loading layers: 1 of 2 stage(s) up"), and Serve's
router (cluster/routing.py) sends calls to ready replicas while there are any. Without this, a
call made while the application deploys waits in Serve's proxy until a replica is up, and for
ever if the stages cannot be placed. (start_in_background=False restores that: see build_app.)

Status codes: INVALID_ARGUMENT (the message names the field), RESOURCE_EXHAUSTED (queue full; the
message ends with "retry after N ms"), FAILED_PRECONDITION (the loaded head cannot serve the RPC),
UNAVAILABLE (the pipeline is starting; or a stage died and could not be brought back, and the
replica then fails Serve's health check, and Serve replaces it with a fresh one).
A cancelled or expired call is cancelled in the replica, which aborts the request and frees its
slots on every stage.

    jamba serve --model DIR --stages P --grpc-port N --http-port M [--replicas R]
    serve run serve_config.yaml         # the same application from a Serve config
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import ray
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve import metrics  # ray.util.metrics, tagged with the application, deployment and replica

from protos import jamba_pb2 as pb
from stages.sequence import SamplingParams
from stages.tokenizer import ChatTemplateError

from .pipeline import FinishEvent, NotReadyError, Pipeline, PipelineConfig, TokenEvent, plan_pipeline
from .resources import REPLICA_CPUS
from .routing import router_config
from .scheduler import DeadlineExceededError, QueueFullError, SchedulerClosedError

log = logging.getLogger("ray.serve")

SERVICER = "protos.jamba_pb2_grpc.add_JambaServiceServicer_to_server"
MAX_BATCH = 256  # prompts in one Generate/Classify/Score call
DEFAULT_MAX_NEW_TOKENS = 16


class RequestError(Exception):
    """A problem with the request, reported with a gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass
class Startup:
    """Where the replica's pipeline start is. A replica answers every call meanwhile, with the
    phase it is in (Pipeline.start's progress), instead of Serve's proxy holding the call."""

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


# ---- protos -> scheduler types ----------------------------------------------------------------
def prompt_ids(prompt: pb.Prompt, field: str, tokenizer, vocab_size: int) -> list[int]:
    kind = prompt.WhichOneof("input")
    if kind is None:
        raise invalid(f"{field} is empty: set text, token_ids or chat")
    if kind == "text":
        if not prompt.text:
            raise invalid(f"{field}.text is empty")
        if tokenizer is None:
            raise invalid(f"{field}.text needs a tokenizer and the model has none; send token_ids")
        ids = tokenizer.encode(prompt.text)
    elif kind == "token_ids":
        ids = list(prompt.token_ids.ids)
        if not ids:
            raise invalid(f"{field}.token_ids is empty")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise invalid(f"{field}.token_ids has ids out of range [0, {vocab_size}): {bad[:5]}")
    else:
        if tokenizer is None:
            raise invalid(f"{field}.chat needs a tokenizer and the model has none; send token_ids")
        messages = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
        if not messages:
            raise invalid(f"{field}.chat has no messages")
        try:
            ids = tokenizer.encode_chat(messages)
        except ChatTemplateError as e:
            raise invalid(f"{field}.chat: the chat template failed: {e}") from None
        except ValueError as e:
            raise invalid(f"{field}.chat: {e}") from None
    return ids


def sampling_params(p: pb.SamplingParams, vocab_size: int) -> SamplingParams:
    params = SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
        temperature=p.temperature if p.HasField("temperature") else 0.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), logprobs=p.logprobs, ignore_eos=p.ignore_eos,
    )
    try:
        params.validate(vocab_size)
    except ValueError as e:
        raise invalid(f"params.{e}") from None
    return params


def completion(ev: FinishEvent) -> pb.Completion:
    return pb.Completion(
        output_ids=ev.output_ids, text=ev.text or "", finish_reason=ev.finish_reason, logprobs=ev.logprobs or [],
        usage=pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=len(ev.output_ids), cached_tokens=ev.cached_tokens),
    )


def classification(logits: list[float], id2label: dict[int, str]) -> pb.Classification:
    m = max(logits)
    exp = [math.exp(x - m) for x in logits]
    probs = [e / sum(exp) for e in exp]
    best = max(range(len(probs)), key=probs.__getitem__)
    return pb.Classification(logits=logits, probs=probs, label=id2label.get(best, str(best)))


def _deadline(ctx: RayServegRPCContext) -> float | None:
    """The client's deadline (time.time() seconds) from the `jamba-deadline` metadata the client
    library sends: Serve's proxy does not pass gRPC's own deadline on to the replica."""
    value = dict(ctx.invocation_metadata()).get("jamba-deadline")
    try:
        return float(value) if value else None
    except ValueError:
        raise invalid(f"metadata jamba-deadline must be a unix time in seconds, not {value!r}") from None


# ---- metrics -------------------------------------------------------------------------------------
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


# ---- the deployment ------------------------------------------------------------------------------
@serve.deployment(name="JambaService", max_ongoing_requests=4096, ray_actor_options={"num_cpus": REPLICA_CPUS})
@serve.ingress()  # HTTP: the app __serve_build_asgi_app__ builds
class JambaService:
    async def __init__(self, model: str, stages: int = 1, layer_split: str | None = None, num_slots: int = 32,
                       max_batch_tokens: int = 512, max_queue: int = 1024, threads_per_stage: int = 1,
                       gpus_per_stage: float = 0, cpus_per_stage: float | None = None, max_seq_len: int | None = None,
                       name: str | None = None, start_in_background: bool = True, max_restarts: int = 3,
                       recover_timeout_s: float = 120.0, stream_interval_ms: float = 0.0,
                       request_timeout_s: float | None = None, quantize: str | None = None, block_size: int = 64,
                       num_blocks: int | None = None, prefix_cache: bool = True,
                       num_snapshots: int | None = None, placement_strategy: str = "PACK",
                       placement_timeout_s: float | None = None) -> None:
        cfg = PipelineConfig(
            model, num_stages=stages, layer_split=layer_split, num_slots=num_slots, max_batch_tokens=max_batch_tokens,
            max_queue=max_queue, threads_per_stage=threads_per_stage, gpus_per_stage=gpus_per_stage,
            cpus_per_stage=cpus_per_stage, max_seq_len=max_seq_len, use_current_placement_group=not start_in_background,
            max_restarts=max_restarts, recover_timeout_s=recover_timeout_s, quantize=quantize,
            block_size=block_size, num_blocks=num_blocks, prefix_cache=prefix_cache, num_snapshots=num_snapshots,
            placement_strategy=placement_strategy, placement_timeout_s=placement_timeout_s,
        )
        self.quantize = quantize
        self.name = name or model.rstrip("/").split("/")[-1]
        # A configuration that cannot work fails here, in the constructor: Serve reports the
        # application DEPLOY_FAILED with this message, before anything is placed.
        plan = plan_pipeline(cfg)
        self.config = plan.config
        self.pipe: Pipeline | None = None  # set once the pipeline serves
        self.tokenizer = None
        # At most one stream message per interval: tokens produced meanwhile go out together.
        # Each message costs Serve's proxy and replica CPU, so with many streams on few cores an
        # interval longer than a stream's time per token trades smoothness for throughput
        # (BENCHMARKS.md: 250 ms); 0 sends every token at once.
        self.stream_interval = max(0.0, stream_interval_ms) / 1000
        # Serve's HTTP request timeout, also the scheduler's deadline for HTTP requests: a
        # request the proxy gives up on frees its slots at the same moment.
        self.request_timeout_s = request_timeout_s
        self.metrics = Metrics.create()
        self.metrics.pipeline_up.set(0)
        self.startup = Startup()
        if start_in_background:
            # The replica answers at once (UNAVAILABLE, with the phase, while its stages are placed
            # and loaded; cluster/routing.py sends calls elsewhere when another replica is ready).
            # Its stages get a placement group of their own, which Ray removes with the replica.
            self._start_task = asyncio.get_running_loop().create_task(self._start(cfg, plan))
        else:
            # Serve placed the stages' bundles with the replica, and the replica counts as up only
            # once its pipeline serves (what KubeRay waits for before it moves traffic to a new cluster).
            await self._start(cfg, plan, reraise=True)

    async def _start(self, cfg: PipelineConfig, plan, reraise: bool = False) -> None:
        try:
            pipe = await Pipeline.start(cfg, progress=self.startup.update, plan=plan)
        except Exception as e:
            self.startup.update("failed", f"the pipeline failed to start: {type(e).__name__}: {e}")
            self.startup.error = f"{type(e).__name__}: {e}"
            log.exception("JambaService %s: the pipeline failed to start; Serve replaces this replica", self.name)
            if reraise:
                raise
            return
        self.pipe, self.tokenizer = pipe, pipe.tokenizer
        self.startup.update("ready", f"serving, {len(pipe.splits)} stage(s) {pipe.splits}")
        self.metrics.pipeline_up.set(1)
        self._stats_task = asyncio.get_running_loop().create_task(self._report_stats())
        log.info("JambaService %s ready: %d stage(s) %s, started in %.1fs", self.name, len(pipe.splits), pipe.splits,
                 time.monotonic() - self.startup.since)

    def serving(self) -> Pipeline:
        """The pipeline, or NotReadyError saying why there is none yet."""
        if self.pipe is not None:
            return self.pipe
        st = self.startup
        if st.error is not None:
            raise NotReadyError(f"application {self.name!r} is unavailable: its pipeline failed to start "
                                f"({st.error}); Serve replaces the replica")
        raise NotReadyError(f"application {self.name!r} is starting: {st.detail} "
                            f"({time.monotonic() - st.since:.0f}s so far); retry later")

    def startup_state(self) -> dict:
        """This replica's start (through a Serve handle, for `jamba serve`; not part of the gRPC API)."""
        return dict(self.startup.state(), replica=serve.get_replica_context().replica_id.unique_id)

    def record_routing_stats(self) -> dict:
        """Serve polls this; cluster/routing.py sends calls to replicas whose pipeline is ready."""
        return {"pipeline": "ready" if self.pipe is not None else self.startup.phase}

    def __serve_build_asgi_app__(self):
        """The OpenAI-compatible HTTP API on this replica's pipeline (cluster/openai_api.py)."""
        from .openai_api import build_app as build_openai_app

        return build_openai_app(self)

    async def _report_stats(self) -> None:
        counted = {"prompt_tokens": 0, "cached_tokens": 0}
        while True:
            s = self.pipe.scheduler.stats()
            for key, counter in (("prompt_tokens", self.metrics.prefix_queries), ("cached_tokens", self.metrics.prefix_hits)):
                if s["cache"][key] > counted[key]:
                    counter.inc(s["cache"][key] - counted[key])
                counted[key] = s["cache"][key]
            self.metrics.queue_depth.set(s["waiting"])
            self.metrics.slots_in_use.set(s["slots_in_use"])
            self.metrics.recoveries.set(s["recoveries"])
            self.metrics.pipeline_up.set(0 if self.pipe.scheduler.error else 1)
            try:
                for i, info in enumerate(await self.pipe.stage_stats()):
                    self.metrics.stage_busy.set(info["busy_seconds"], tags={"stage": str(i)})
            except Exception:  # a dead stage shows in check_health
                pass
            await asyncio.sleep(5)

    async def check_health(self) -> None:
        """Serve calls this; raising marks the replica unhealthy so Serve replaces it. A pipeline
        that is bringing a stage back is healthy (reloading a large stage can outlast Serve's
        health-check timeout; the scheduler's recover timeout bounds it), one that gave up is not."""
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
        try:
            await asyncio.wait_for(self.pipe.stage_stats(), timeout=20)
        except ray.exceptions.ActorUnavailableError:
            pass  # a stage that died while idle is restarting; the next microbatch waits for it

    async def stats(self) -> dict:
        """Scheduler and stage counters (through a Serve handle; not part of the gRPC API)."""
        pipe = self.serving()
        return {"scheduler": pipe.scheduler.stats(), "stages": await pipe.stage_stats()}

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def is_classifier(self) -> bool:
        return self.config.is_classifier

    def _need(self, classifier: bool, rpc: str) -> None:
        if self.is_classifier != classifier:
            have = "a sequence classifier" if self.is_classifier else "a causal language model"
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{rpc} is not available: application {self.name!r} serves {have}")

    def _prompts(self, prompts, field: str, single: bool = False) -> list[list[int]]:
        if not prompts:
            raise invalid(f"{field} is empty")
        if len(prompts) > MAX_BATCH:
            raise invalid(f"{field} has {len(prompts)} entries; at most {MAX_BATCH} per call")
        names = [field] if single else [f"{field}[{i}]" for i in range(len(prompts))]
        out = [prompt_ids(p, n, self.tokenizer, self.config.vocab_size) for p, n in zip(prompts, names)]
        limit = self.pipe.scheduler.max_seq_len
        for i, ids in enumerate(out):
            if len(ids) > limit:
                raise invalid(f"{field}[{i}] has {len(ids)} tokens, more than the context of {limit}")
        return out

    def _check_room(self, ids: list[list[int]], params: SamplingParams, field: str) -> None:
        limit = self.pipe.scheduler.max_seq_len
        for i, p in enumerate(ids):
            if len(p) + params.max_new_tokens > limit:
                raise invalid(f"params.max_new_tokens: {field}[{i}] has {len(p)} tokens and max_new_tokens is "
                              f"{params.max_new_tokens}, more than the context of {limit}")

    def _fail(self, method: str, ctx: RayServegRPCContext, e: Exception):
        """Report an error with its gRPC status code (Serve's proxy passes the context's code on)."""
        if isinstance(e, RequestError):
            code, msg = e.code, e.message
        elif isinstance(e, QueueFullError):
            code, msg = grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        elif isinstance(e, (SchedulerClosedError, NotReadyError)):
            code, msg = grpc.StatusCode.UNAVAILABLE, str(e)
        elif isinstance(e, DeadlineExceededError):
            code, msg = grpc.StatusCode.DEADLINE_EXCEEDED, str(e)
        elif isinstance(e, ValueError):  # the scheduler's own checks
            code, msg = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        else:
            raise e
        self.metrics.requests.inc(tags={"method": method, "code": code.name})
        ctx.set_code(code)
        ctx.set_details(msg)
        # A builtin exception: it crosses back to Serve's proxy by pickling, which then sends
        # the code and details set on the context.
        raise RuntimeError(msg) from None

    async def _guard(self, method: str, ctx: RayServegRPCContext, coro):
        try:
            result = await coro
        except (RequestError, NotReadyError, QueueFullError, SchedulerClosedError, DeadlineExceededError,
                ValueError) as e:
            self._fail(method, ctx, e)
        self.metrics.requests.inc(tags={"method": method, "code": "OK"})
        return result

    # ---- RPCs ----------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        async def body():
            self.serving()
            self._need(False, "Generate")
            ids = self._prompts(request.prompts, "prompts")
            params = sampling_params(request.params, self.config.vocab_size)
            self._check_room(ids, params, "prompts")
            self.metrics.tokens_in.inc(sum(map(len, ids)))
            deadline = _deadline(grpc_context)
            results = await asyncio.gather(*[self._generate_one(p, params, deadline) for p in ids])
            return pb.GenerateResponse(completions=[completion(r) for r in results])
        return await self._guard("Generate", grpc_context, body())

    async def _generate_one(self, ids: list[int], params: SamplingParams, deadline: float | None) -> FinishEvent:
        params = SamplingParams(**{k: getattr(params, k) for k in params.__dataclass_fields__})  # one per prompt
        async for ev in self.pipe.generate(ids, params, deadline):
            if isinstance(ev, FinishEvent):
                self.metrics.tokens_out.inc(len(ev.output_ids))
                return ev
        raise RuntimeError("generation ended without a final event")

    async def GenerateStream(self, request: pb.GenerateStreamRequest, grpc_context: RayServegRPCContext):
        t0 = time.perf_counter()
        try:
            self.serving()
            ids = self._prompts([request.prompt] if request.HasField("prompt") else [], "prompt", single=True)[0]
            self._need(False, "GenerateStream")
            params = sampling_params(request.params, self.config.vocab_size)
            self._check_room([ids], params, "prompt")
            # Chunks: every token that is ready goes out in one message, so a stream that falls
            # behind (many streams, a busy proxy) catches up instead of lagging one message per token.
            stream = self.pipe.generate_chunks(ids, params, _deadline(grpc_context))
            chunk = await stream.__anext__()  # admission errors (queue full) surface here, before any message
        except (RequestError, NotReadyError, QueueFullError, SchedulerClosedError, DeadlineExceededError,
                ValueError) as e:
            self._fail("GenerateStream", grpc_context, e)
        self.metrics.tokens_in.inc(len(ids))
        last = None
        try:
            while True:
                now = time.perf_counter()
                tokens = [ev for ev in chunk if isinstance(ev, TokenEvent)]
                if tokens:
                    if last is None:
                        self.metrics.ttft.observe(now - t0)
                    else:
                        for _ in tokens:  # the tokens of one message share the wait
                            self.metrics.itl.observe((now - last) / len(tokens))
                    last = now
                    yield pb.GenerateStreamResponse(delta=pb.TokenDelta(
                        token_ids=[ev.token_id for ev in tokens], text="".join(ev.text for ev in tokens),
                        logprobs=[ev.logprob for ev in tokens if ev.logprob is not None]))
                if isinstance(chunk[-1], FinishEvent):
                    self.metrics.tokens_out.inc(len(chunk[-1].output_ids))
                    self.metrics.requests.inc(tags={"method": "GenerateStream", "code": "OK"})
                    yield pb.GenerateStreamResponse(final=completion(chunk[-1]))
                    return
                if self.stream_interval and last is not None:
                    await asyncio.sleep(max(0.0, last + self.stream_interval - time.perf_counter()))
                chunk = await stream.__anext__()
        except (DeadlineExceededError, SchedulerClosedError) as e:  # mid-stream: the deadline, or the pipeline gave up
            self._fail("GenerateStream", grpc_context, e)
        finally:
            await stream.aclose()  # a cancelled call lands here: the request is aborted, slots freed

    async def Classify(self, request: pb.ClassifyRequest, grpc_context: RayServegRPCContext) -> pb.ClassifyResponse:
        async def body():
            self.serving()
            self._need(True, "Classify")
            ids = self._prompts(request.inputs, "inputs")
            self.metrics.tokens_in.inc(sum(map(len, ids)))
            logits = await asyncio.gather(*[self.pipe.classify(p, _deadline(grpc_context)) for p in ids])
            return pb.ClassifyResponse(results=[classification(lg, self.config.id2label) for lg in logits])
        return await self._guard("Classify", grpc_context, body())

    async def Score(self, request: pb.ScoreRequest, grpc_context: RayServegRPCContext) -> pb.ScoreResponse:
        async def body():
            self.serving()
            self._need(False, "Score")
            ids = self._prompts(request.inputs, "inputs")
            self.metrics.tokens_in.inc(sum(map(len, ids)))
            scores = await asyncio.gather(*[self.pipe.score(p, _deadline(grpc_context)) for p in ids])
            return pb.ScoreResponse(results=[
                pb.ScoreResult(token_ids=p, token_logprobs=s[1:], sum_logprob=math.fsum(s[1:])) for p, s in zip(ids, scores)
            ])
        return await self._guard("Score", grpc_context, body())

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context: RayServegRPCContext) -> pb.ModelInfoResponse:
        async def body():
            pipe = self.serving()
            c, sched = self.config, pipe.scheduler
            return pb.ModelInfoResponse(
                model_name=self.name, task="classification" if c.is_classifier else "causal-lm",
                num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                attn_layer_period=c.attn_layer_period, attn_layer_offset=c.attn_layer_offset,
                max_context=sched.max_seq_len,
                stages=[pb.StageInfo(index=i, start_layer=s, end_layer=e) for i, (s, e) in enumerate(pipe.splits)],
                labels=[c.id2label[i] for i in sorted(c.id2label)] if c.is_classifier else [],
                num_slots=sched.num_slots, quantize=self.quantize or "",
                block_size=sched.pages.block_size, num_blocks=sched.pages.num_blocks,
                num_snapshots=sched.pages.num_snapshots, prefix_cache=sched.pages.prefix_cache,
            )
        return await self._guard("ModelInfo", grpc_context, body())


# ---- building applications -------------------------------------------------------------------------
def build_app(args: dict[str, Any]):
    """Serve application builder (`import_path: cluster.service:build_app` in a Serve config).

    args: model (required), stages, layer_split, num_slots, max_batch_tokens, max_queue,
    threads_per_stage, gpus_per_stage, max_seq_len, name, stream_interval_ms (the least time
    between two messages of a stream; default 0), max_restarts (of each stage actor),
    recover_timeout_s, request_timeout_s (the HTTP proxy's request timeout, if one is set: HTTP
    requests are dropped just before it), replicas, placement_strategy, autoscaling_config (a Serve autoscaling
    config; replaces replicas), health_check_period_s and health_check_timeout_s (how soon Serve
    notices a replica whose pipeline is down, and replaces it; Serve's defaults 10 s and 30 s),
    quantize (int8-experts, int8 or int8-with-mamba; see stages/quant.py; default: none),
    block_size, num_blocks, prefix_cache (default true) and num_snapshots (the paged KV cache and the
    prefix cache; see cluster/pipeline.py:PipelineConfig).

    start_in_background (default true): the replica is up at once and places and loads its stages
    in the background, answering UNAVAILABLE (HTTP 503) with what it is waiting for until they
    serve; placement_timeout_s bounds that wait (default: none, as Serve itself would wait, for an
    autoscaler to add nodes). false: Serve places the replica and its stages together and the
    replica is up only once its pipeline serves, which is what a KubeRay RayService upgrade needs
    (it moves traffic to the new cluster once its applications are RUNNING); calls made meanwhile
    wait in Serve's proxy.
    """
    args = dict(args)
    if "model" not in args:
        raise ValueError("the Jamba application needs args.model (a checkpoint directory, or 'demo')")
    from stages.quant import check_mode

    args["quantize"] = check_mode(args.get("quantize") or None)  # a bad value fails here, not in a replica
    from .service_cli import resolve_model

    args.setdefault("name", resolve_model(args["model"])[0])
    args["model"] = resolve_model(args["model"])[1]
    replicas = args.pop("replicas", 1)
    strategy = args.pop("placement_strategy", "PACK")
    autoscaling = args.pop("autoscaling_config", None)
    stages = int(args.get("stages", 1))
    threads = int(args.get("threads_per_stage", 1))
    gpus = float(args.get("gpus_per_stage", 0))
    cpus = float(args.setdefault("cpus_per_stage", threads))
    stage_bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    options = dict(request_router_config=router_config())
    if args.setdefault("start_in_background", True):
        args["placement_strategy"] = strategy  # the replica places its stages itself
    else:  # Serve places the replica (bundle 0) and its stages together
        options.update(placement_group_bundles=[{"CPU": REPLICA_CPUS}] + [dict(stage_bundle) for _ in range(stages)],
                       placement_group_strategy=strategy)
    for key in ("health_check_period_s", "health_check_timeout_s"):
        if key in args:
            options[key] = float(args.pop(key))
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    return JambaService.options(**options).bind(**args)


def replica_starts(name: str, replicas: int) -> dict[str, dict]:
    """Where the replicas of a running application are in their start (JambaService.startup_state),
    by replica id. Serve's router picks the replica of each call, so a few calls per replica reach
    every one soon; a replica that does not answer is left out (the next round asks again)."""
    handle = serve.get_app_handle(name)
    responses = [handle.startup_state.remote() for _ in range(2 * replicas)]
    states = {}
    for r in responses:
        try:
            state = r.result(timeout_s=10)
        except Exception as e:  # a replica being replaced
            log.debug("startup_state of %r: %s", name, e)
            continue
        states[state["replica"]] = state
    return states


def wait_until_serving(name: str, replicas: int = 1, timeout: float = 600) -> None:
    """Block until `replicas` replicas of application `name` serve (after serve.run, which returns
    once they are up, not once their pipelines are); RuntimeError if a pipeline failed to start,
    TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    seen: dict[str, dict] = {}
    while True:
        seen.update(replica_starts(name, replicas))
        failed = [r["error"] for r in seen.values() if r["error"]]
        if failed:
            raise RuntimeError(f"application {name!r}: a replica's pipeline failed to start: {failed[0]}")
        if sum(r["phase"] == "ready" for r in seen.values()) >= replicas:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {name!r} was not serving after {timeout:g}s: "
                               + "; ".join(r["detail"] for r in seen.values()))
        time.sleep(0.2)


MAX_MESSAGE_BYTES = 16 << 20


def limit_message_size() -> None:
    """Serve's gRPC proxy accepts 2 GiB messages by default, an easy way to exhaust its memory;
    cap it (RESOURCE_EXHAUSTED beyond). Must run before Ray starts: the proxy reads the env."""
    import os

    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(MAX_MESSAGE_BYTES))


def grpc_options(port: int):
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER])


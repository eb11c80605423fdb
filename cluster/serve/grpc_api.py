"""The gRPC API (protos/jamba.proto) on a replica: protos in, the engine's requests through the
intake, the engine's results back as protos. The Serve deployment (deployment.py) hands each RPC
here; nothing here knows how the engine runs.

Status codes: INVALID_ARGUMENT (the message names the field), RESOURCE_EXHAUSTED (queue full; the
message ends with "retry after N ms"), FAILED_PRECONDITION (the loaded head cannot serve the RPC),
UNAVAILABLE (the pipeline is starting; or a stage died and could not be brought back, and the
replica then fails Serve's health check, and Serve replaces it with a fresh one),
DEADLINE_EXCEEDED (the client's deadline passed). A cancelled or expired call is cancelled in the
replica, which aborts the request and frees its slots on every stage.
"""

from __future__ import annotations

import asyncio
import math
import time

import grpc
from ray.serve.grpc_util import RayServegRPCContext

from cluster.runtime.engine import Engine
from cluster.runtime.intake import IntakeError
from cluster.runtime.scheduler import DeadlineExceededError, QueueFullError, SchedulerClosedError, TokenEvent
from protos import jamba_pb2 as pb
from stages.sequence import GenerationResult, SamplingParams, Structure, label_probs

from .replica import NotReadyError, Replica

MAX_BATCH = 256  # prompts in one Generate/Classify/Score call
DEFAULT_MAX_NEW_TOKENS = 16
SAMPLING = "params."  # the prefix of a sampling parameter's field name in messages

# What the engine may raise that is the caller's to hear, as a status code.
REFUSALS = (IntakeError, NotReadyError, QueueFullError, SchedulerClosedError, DeadlineExceededError)


class RequestError(Exception):
    """A problem with the request that has a status of its own."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def status(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, RequestError):
        return e.code, e.message
    if isinstance(e, IntakeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, (SchedulerClosedError, NotReadyError)):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(e)
    raise e


# ---- protos -> the engine's requests --------------------------------------------------------------
def prompt_ids(engine: Engine, prompt: pb.Prompt, field: str) -> list[int]:
    kind = prompt.WhichOneof("input")
    if kind is None:
        raise IntakeError(field, f"{field} is empty: set text, token_ids or chat")
    if kind == "text":
        return engine.intake.text(prompt.text, f"{field}.text")
    if kind == "token_ids":
        return engine.intake.token_ids(list(prompt.token_ids.ids), f"{field}.token_ids")
    messages = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
    return engine.intake.chat(messages, f"{field}.chat")


# The proto's structure oneof: its field names, and the Structure kind each one is.
STRUCTURE_KINDS = {"json_schema": "json_schema", "json_object": "json_object", "regex": "regex", "grammar": "lark"}


def sampling_params(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
        temperature=p.temperature if p.HasField("temperature") else 0.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), logprobs=p.logprobs, ignore_eos=p.ignore_eos,
        top_logprobs=p.top_logprobs, logit_bias=dict(p.logit_bias), min_tokens=p.min_tokens,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty, structure=structure(p),
    )


def structure(p: pb.SamplingParams) -> Structure | None:
    """The structure oneof as the engine's Structure; json_object false is no structure."""
    which = p.WhichOneof("structure")
    if which is None or (which == "json_object" and not p.json_object):
        return None
    return Structure(STRUCTURE_KINDS[which], "" if which == "json_object" else getattr(p, which))


def completion(r: GenerationResult, tokenizer) -> pb.Completion:
    return pb.Completion(
        output_ids=r.output_ids, text=r.text or "", finish_reason=r.finish_reason, logprobs=r.logprobs or [],
        usage=pb.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=len(r.output_ids), cached_tokens=r.cached_tokens),
        top_logprobs=[top_logprobs(step, tokenizer) for step in r.top_logprobs or []],
    )


def top_logprobs(step: list[tuple[int, float]], tokenizer) -> pb.TopLogprobs:
    """One output position's candidates, each with its token's text."""
    return pb.TopLogprobs(candidates=[
        pb.TopLogprob(token_id=t, logprob=lp, token=tokenizer.decode([t], skip_special_tokens=False) if tokenizer else "")
        for t, lp in step])


def classification(logits: list[float], id2label: dict[int, str]) -> pb.Classification:
    probs, label = label_probs(logits, id2label)
    return pb.Classification(logits=logits, probs=probs, label=label)


def deadline(ctx: RayServegRPCContext) -> float | None:
    """The client's deadline (time.time() seconds) from the `jamba-deadline` metadata the client
    library sends: Serve's proxy does not pass gRPC's own deadline on to the replica."""
    value = dict(ctx.invocation_metadata()).get("jamba-deadline")
    try:
        return float(value) if value else None
    except ValueError:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"metadata jamba-deadline must be a unix time in seconds, not {value!r}") from None


# ---- the RPCs --------------------------------------------------------------------------------------
class GrpcApi:
    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def _fail(self, method: str, ctx: RayServegRPCContext, e: Exception):
        """Report an error with its status code (Serve's proxy passes the context's code on)."""
        code, message = status(e)
        self.replica.metrics.requests.inc(tags={"method": method, "code": code.name})
        ctx.set_code(code)
        ctx.set_details(message)
        # A builtin exception: it crosses back to Serve's proxy by pickling, which then sends
        # the code and details set on the context.
        raise RuntimeError(message) from None

    async def _guard(self, method: str, ctx: RayServegRPCContext, coro):
        try:
            result = await coro
        except (RequestError, *REFUSALS) as e:
            self._fail(method, ctx, e)
        self.replica.metrics.requests.inc(tags={"method": method, "code": "OK"})
        return result

    def _engine(self, classifier: bool, rpc: str) -> Engine:
        """The engine, if its head serves `rpc` (a classifier, or a causal LM)."""
        engine = self.replica.engine()
        if self.replica.config.is_classifier != classifier:
            have = "a sequence classifier" if self.replica.config.is_classifier else "a causal language model"
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{rpc} is not available: application {self.replica.name!r} serves {have}")
        return engine

    @staticmethod
    def _prompts(engine: Engine, prompts, field: str, single: bool = False) -> list[list[int]]:
        if not prompts:
            raise IntakeError(field, f"{field} is empty")
        if len(prompts) > MAX_BATCH:
            raise IntakeError(field, f"{field} has {len(prompts)} entries; at most {MAX_BATCH} per call")
        names = [field] if single else [f"{field}[{i}]" for i in range(len(prompts))]
        return [prompt_ids(engine, p, n) for p, n in zip(prompts, names)]

    @staticmethod
    async def _generations(engine: Engine, prompts: list[list[int]], p: pb.SamplingParams, fields: list[str]):
        """The checked requests; a structure compiled for the first time compiles in a thread (the
        prompts share it: the first compiles it, the others find it cached)."""
        params = sampling_params(p)
        names = {"structure": p.WhichOneof("structure") or "structure"}  # an error names the field the caller set
        return [await engine.intake.generation_async(ids, params, name, max_field=SAMPLING + "max_new_tokens",
                                                     prefix=SAMPLING, names=names)
                for ids, name in zip(prompts, fields)]

    async def generate(self, request: pb.GenerateRequest, ctx: RayServegRPCContext) -> pb.GenerateResponse:
        async def body():
            engine = self._engine(False, "Generate")
            ids = self._prompts(engine, request.prompts, "prompts")
            requests = await self._generations(engine, ids, request.params, [f"prompts[{i}]" for i in range(len(ids))])
            self.replica.metrics.tokens_in.inc(sum(map(len, ids)))
            until = deadline(ctx)
            results = await asyncio.gather(*[engine.scheduler.complete(r, until) for r in requests])
            self.replica.metrics.tokens_out.inc(sum(len(r.output_ids) for r in results))
            return pb.GenerateResponse(completions=[completion(r, engine.tokenizer) for r in results])
        return await self._guard("Generate", ctx, body())

    async def generate_stream(self, request: pb.GenerateStreamRequest, ctx: RayServegRPCContext):
        metrics = self.replica.metrics
        t0 = time.perf_counter()
        try:
            engine = self.replica.engine()
            ids = self._prompts(engine, [request.prompt] if request.HasField("prompt") else [], "prompt", single=True)[0]
            engine = self._engine(False, "GenerateStream")
            [req] = await self._generations(engine, [ids], request.params, ["prompt"])
            # Chunks: every token that is ready goes out in one message, so a stream that falls
            # behind (many streams, a busy proxy) catches up instead of lagging one message per token.
            stream = engine.scheduler.generate_chunks(req, deadline(ctx))
            chunk = await stream.__anext__()  # admission errors (queue full) surface here, before any message
        except (RequestError, *REFUSALS) as e:
            self._fail("GenerateStream", ctx, e)
        metrics.tokens_in.inc(len(ids))
        interval = self.replica.options.stream_interval_ms / 1000
        last = None
        try:
            while True:
                now = time.perf_counter()
                tokens = [ev for ev in chunk if isinstance(ev, TokenEvent)]
                if tokens:
                    if last is None:
                        metrics.ttft.observe(now - t0)
                    else:
                        for _ in tokens:  # the tokens of one message share the wait
                            metrics.itl.observe((now - last) / len(tokens))
                    last = now
                    yield pb.GenerateStreamResponse(delta=pb.TokenDelta(
                        token_ids=[ev.token_id for ev in tokens], text="".join(ev.text for ev in tokens),
                        logprobs=[ev.logprob for ev in tokens if ev.logprob is not None],
                        top_logprobs=[top_logprobs(ev.top_logprobs, engine.tokenizer)
                                      for ev in tokens if ev.top_logprobs is not None]))
                if isinstance(chunk[-1], GenerationResult):
                    metrics.tokens_out.inc(len(chunk[-1].output_ids))
                    metrics.requests.inc(tags={"method": "GenerateStream", "code": "OK"})
                    yield pb.GenerateStreamResponse(final=completion(chunk[-1], engine.tokenizer))
                    return
                if interval and last is not None:
                    await asyncio.sleep(max(0.0, last + interval - time.perf_counter()))
                chunk = await stream.__anext__()
        except (DeadlineExceededError, SchedulerClosedError) as e:  # mid-stream: the deadline, or the pipeline gave up
            self._fail("GenerateStream", ctx, e)
        finally:
            await stream.aclose()  # a cancelled call lands here: the request is aborted, slots freed

    async def _prefills(self, rpc: str, inputs, ctx: RayServegRPCContext) -> tuple[list[list[int]], list]:
        """Classify's and Score's inputs, each run whole; their token ids and the results."""
        classify = rpc == "Classify"
        engine = self._engine(classify, rpc)
        ids = self._prompts(engine, inputs, "inputs")
        check, run = ((engine.intake.classification, engine.scheduler.classify) if classify
                      else (engine.intake.scoring, engine.scheduler.score))
        requests = [check(p, f"inputs[{i}]") for i, p in enumerate(ids)]
        self.replica.metrics.tokens_in.inc(sum(map(len, ids)))
        until = deadline(ctx)
        return ids, await asyncio.gather(*[run(r, until) for r in requests])

    async def classify(self, request: pb.ClassifyRequest, ctx: RayServegRPCContext) -> pb.ClassifyResponse:
        async def body():
            _, logits = await self._prefills("Classify", request.inputs, ctx)
            return pb.ClassifyResponse(results=[classification(lg, self.replica.config.id2label) for lg in logits])
        return await self._guard("Classify", ctx, body())

    async def score(self, request: pb.ScoreRequest, ctx: RayServegRPCContext) -> pb.ScoreResponse:
        async def body():
            ids, scores = await self._prefills("Score", request.inputs, ctx)
            return pb.ScoreResponse(results=[
                pb.ScoreResult(token_ids=p, token_logprobs=s[1:], sum_logprob=math.fsum(s[1:])) for p, s in zip(ids, scores)
            ])
        return await self._guard("Score", ctx, body())

    async def model_info(self, request: pb.ModelInfoRequest, ctx: RayServegRPCContext) -> pb.ModelInfoResponse:
        async def body():
            pipe = self.replica.engine()
            c, sched = self.replica.config, pipe.scheduler
            return pb.ModelInfoResponse(
                model_name=self.replica.name, task="classification" if c.is_classifier else "causal-lm",
                num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                attn_layer_period=c.attn_layer_period, attn_layer_offset=c.attn_layer_offset,
                max_context=sched.max_seq_len,
                stages=[pb.StageInfo(index=i, start_layer=s, end_layer=e) for i, (s, e) in enumerate(pipe.splits)],
                labels=[c.id2label[i] for i in sorted(c.id2label)] if c.is_classifier else [],
                num_slots=sched.num_slots, quantize=pipe.cfg.quantize or "",
                block_size=sched.pages.block_size, num_blocks=sched.pages.num_blocks,
                num_snapshots=sched.pages.num_snapshots, prefix_cache=sched.pages.prefix_cache,
            )
        return await self._guard("ModelInfo", ctx, body())

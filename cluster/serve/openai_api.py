"""The OpenAI-compatible HTTP API on a replica (replica.py): its routes, on the engine's intake
and scheduler. OpenAI's wire format (the requests and their checks, the responses and stream
chunks) is openai_protocol.py.

It runs in the same Serve replica as the gRPC API (grpc_api.py), on the same engine, behind
Serve's HTTP proxy: the replica's FastAPI app is built here, per replica.

    POST /v1/completions        prompt: text, token ids, or a list of either; stream: true for SSE
    POST /v1/chat/completions   messages through the checkpoint's chat template; stream: true for SSE
    GET  /v1/models, /v1/models/{model}
    GET  /health                200 while the pipeline serves; 503 while it starts, and once it failed

What OpenAI's API has and this server does not (top_logprobs, penalties, logit_bias, suffix,
tools, JSON response formats) is refused with a 400 naming the field, never ignored. Beyond
OpenAI's fields, requests may carry vLLM's `top_k`, `ignore_eos` and `stop_token_ids`.

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad field
(param names it), 404 for an unknown model or path, 429 with Retry-After when the queue is full,
503 with Retry-After while the pipeline starts and when it is down, 504 past the request's deadline (Serve's --http-request-timeout).
A stream that fails after its first event ends with an error event. A client that disconnects
cancels its request in the replica, which aborts it and frees its slots on every stage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.runtime.engine import Engine
from cluster.runtime.intake import GenerateRequest, IntakeError
from cluster.runtime.scheduler import DeadlineExceededError, QueueFullError, SchedulerClosedError
from stages.sequence import GenerationResult

from .openai_protocol import (APIError, ChatCompletions, ChatRequest, CompletionRequest, Completions, bad,
                              choice_params, parse, refuse_unsupported, sampling_params, sse)
from .replica import NotReadyError, Replica

log = logging.getLogger("ray.serve")

MAX_PROMPTS = 256  # prompts in one completions request, as for gRPC's Generate
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
REFUSALS = (IntakeError, NotReadyError, QueueFullError, SchedulerClosedError, DeadlineExceededError)


def api_error(e: Exception) -> APIError:
    """What the engine refused, as OpenAI's errors."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, IntakeError):
        return APIError(400, str(e), param=e.field)
    if isinstance(e, QueueFullError):
        # Retry-After is whole seconds (RFC 9110); the openai client also reads retry-after-ms.
        return APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(max(1, math.ceil(e.retry_after))),
                                 "retry-after-ms": str(round(e.retry_after * 1000))})
    if isinstance(e, NotReadyError):
        return APIError(503, str(e), "service_unavailable", code="model_not_ready",
                        headers={"Retry-After": str(math.ceil(e.retry_after))})
    if isinstance(e, SchedulerClosedError):
        return APIError(503, str(e), "service_unavailable", code="pipeline_unavailable")
    if isinstance(e, DeadlineExceededError):
        return APIError(504, f"{e} (the server's request timeout)", "timeout", code="deadline_exceeded")
    raise e


# ---- the API -----------------------------------------------------------------------------------------
class OpenAIServer:
    """The routes' logic, on one replica."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.name = replica.name
        self.config = replica.config
        self.created = int(time.time())

    def _engine(self, model: str) -> Engine:
        """The engine, once the request names this endpoint's model; NotReadyError (503) while it starts."""
        if model != self.name:
            raise APIError(404, f"the model {model!r} does not exist; this endpoint serves {self.name!r}",
                           param="model", code="model_not_found")
        if self.config.is_classifier:
            raise bad("model", f"{self.name!r} is a sequence classifier; completions need a causal language model")
        return self.replica.engine()

    def _token_text(self, token_id: int) -> str:
        tok = self.replica.engine().tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok else str(token_id)

    def _count(self, route: str, status: int) -> None:
        self.replica.metrics.requests.inc(tags={"method": route, "code": str(status)})

    # ---- /v1/completions ---------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        engine = self._engine(req.model)
        refuse_unsupported(req)
        if req.suffix:
            raise bad("suffix", "suffix is not supported")
        if req.best_of not in (None, req.n):
            raise bad("best_of", "best_of is not supported (only equal to n)")
        if req.logprobs not in (None, 0):
            raise bad("logprobs", "logprobs must be 0 or null: this server returns each chosen token's "
                                  "log-probability (tokens, token_logprobs), not the top alternatives")
        p, intake = req.prompt, engine.intake
        if isinstance(p, str):
            prompts = [(p, intake.text(p, "prompt"))]
        elif not p:
            raise bad("prompt", "prompt is empty")
        elif isinstance(p[0], int):
            prompts = [(None, intake.token_ids(p, "prompt"))]
        elif len(p) > MAX_PROMPTS:
            raise bad("prompt", f"prompt has {len(p)} entries; at most {MAX_PROMPTS} per request")
        elif isinstance(p[0], str):
            prompts = [(s, intake.text(s, f"prompt[{i}]")) for i, s in enumerate(p)]
        else:
            prompts = [(None, intake.token_ids(ids, f"prompt[{i}]")) for i, ids in enumerate(p)]
        max_tokens = COMPLETIONS_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        params = sampling_params(req, max_tokens, req.logprobs is not None)
        checked = [intake.generation(ids, params, "prompt" if len(prompts) == 1 else f"prompt[{i}]", "max_tokens")
                   for i, (_, ids) in enumerate(prompts)]
        jobs = [(i * req.n + j, GenerateRequest(r.prompt, choice_params(r.params, j)))
                for i, r in enumerate(checked) for j in range(req.n)]
        echoes = await self._echoes(engine, prompts, req) if req.echo else {}
        self.replica.metrics.tokens_in.inc(sum(len(ids) for _, ids in prompts))
        out = Completions(self.name, self._token_text, req, prompts, echoes)
        if req.stream:
            return await self._stream(engine, out, jobs, "POST /v1/completions")
        finals = await self._run_all(engine, jobs)
        self._count("POST /v1/completions", 200)
        return JSONResponse(out.response(finals))

    async def _echoes(self, engine: Engine, prompts, req: CompletionRequest) -> dict[int, tuple[str, list, list]]:
        """Per prompt: its text, and with logprobs its tokens and their log-probabilities (scored
        by the pipeline; the first token has none)."""
        out = {}
        for i, (text, ids) in enumerate(prompts):
            if text is None:
                text = engine.tokenizer.decode(ids) if engine.tokenizer else ""
            tokens, lps = [], []
            if req.logprobs is not None:
                lps = await engine.scheduler.score(engine.intake.scoring(ids, "prompt"), self.replica.deadline())
                tokens = [self._token_text(t) for t in ids]
            out[i] = (text, tokens, lps)
        return out

    # ---- /v1/chat/completions ----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        req = await parse(request, ChatRequest)
        engine = self._engine(req.model)
        refuse_unsupported(req)
        if req.top_logprobs:
            raise bad("top_logprobs", "top_logprobs is not supported (only 0): this server returns each chosen "
                                      "token's log-probability, not the top alternatives")
        if req.tools or req.tool_choice not in (None, "none"):
            raise bad("tools" if req.tools else "tool_choice", "tools are not supported")
        if req.response_format and req.response_format.get("type") != "text":
            raise bad("response_format", "response_format must be {\"type\": \"text\"}: structured output is "
                                         "not supported")
        if engine.tokenizer is None and req.messages:
            raise bad("messages", "the model has no tokenizer, so no chat template; use /v1/completions with token ids")
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "\n".join(part.text for part in m.content)
            messages.append({"role": m.role, "content": content or "", **({"name": m.name} if m.name else {})})
        ids = engine.intake.chat(messages, "messages")
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        # Unasked, a chat may take the rest of the context (at least one token, or the intake says it is full).
        max_tokens = asked if asked is not None else max(1, engine.max_seq_len - len(ids))
        checked = engine.intake.generation(ids, sampling_params(req, max_tokens, req.logprobs), "messages", field)
        jobs = [(j, GenerateRequest(ids, choice_params(checked.params, j))) for j in range(req.n)]
        self.replica.metrics.tokens_in.inc(len(ids))
        out = ChatCompletions(self.name, self._token_text, req, [(None, ids)])
        if req.stream:
            return await self._stream(engine, out, jobs, "POST /v1/chat/completions")
        finals = await self._run_all(engine, jobs)
        self._count("POST /v1/chat/completions", 200)
        return JSONResponse(out.response(finals))

    # ---- running requests --------------------------------------------------------------------
    async def _run_all(self, engine: Engine, jobs) -> list[GenerationResult]:
        deadline = self.replica.deadline()
        finals = await asyncio.gather(*[engine.scheduler.complete(r, deadline) for _, r in jobs])
        self.replica.metrics.tokens_out.inc(sum(len(f.output_ids) for f in finals))
        return finals

    async def _stream(self, engine: Engine, out: "Completions", jobs, route: str) -> StreamingResponse:
        """Start every choice, wait for each one's first tokens (so that a refusal, such as a full
        queue, is still an HTTP status), then stream server-sent events as tokens come."""
        deadline = self.replica.deadline()
        streams = [engine.scheduler.generate_chunks(r, deadline) for _, r in jobs]
        try:
            firsts = await asyncio.gather(*[s.__anext__() for s in streams], return_exceptions=True)
            failed = [f for f in firsts if isinstance(f, BaseException)]
        except BaseException:  # the client went away meanwhile
            failed = [None]
            raise
        finally:
            if failed:
                for s in streams:
                    await s.aclose()
        if failed:
            raise api_error(failed[0]) from None

        async def events() -> AsyncIterator[str]:
            merged = merge([j[0] for j in jobs], streams, firsts)
            try:
                for chunk in out.start():
                    yield sse(chunk)
                async for index, chunk in merged:
                    for event in out.chunk(index, chunk):
                        yield sse(event)
                    if isinstance(chunk[-1], GenerationResult):
                        self.replica.metrics.tokens_out.inc(len(chunk[-1].output_ids))
                if out.finish() is not None:
                    yield sse(out.finish())
                yield "data: [DONE]\n\n"
                self._count(route, 200)
            except (DeadlineExceededError, SchedulerClosedError) as e:  # after the first event
                err = api_error(e)
                self._count(route, err.status)
                yield sse(err.body())
            finally:
                await merged.aclose()  # its tasks first: a stream cannot be closed while one reads it
                for s in streams:  # a disconnected client lands here too: its requests are aborted
                    await s.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def merge(indices: list[int], streams, firsts) -> AsyncIterator[tuple[int, list]]:
    """(choice index, chunk) from several chunk streams as they come, each stream's first chunk
    (already read) first."""
    if len(streams) == 1:  # the common case, without tasks
        chunk = firsts[0]
        while True:
            yield indices[0], chunk
            if isinstance(chunk[-1], GenerationResult):
                return
            chunk = await streams[0].__anext__()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream, first) -> None:
        chunk = first
        try:
            while True:
                await queue.put((index, chunk))
                if isinstance(chunk[-1], GenerationResult):
                    return
                chunk = await stream.__anext__()
        except Exception as e:
            await queue.put((index, e))

    tasks = [asyncio.get_running_loop().create_task(pump(i, s, f)) for i, s, f in zip(indices, streams, firsts)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield index, item
            if isinstance(item[-1], GenerationResult):
                left -= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- the app -------------------------------------------------------------------------------------------
def build_app(replica: Replica) -> FastAPI:
    """The replica's ASGI app (Serve calls JambaService.__serve_build_asgi_app__ after __init__)."""
    api = OpenAIServer(replica)
    app = FastAPI(title=f"jamba-serve: {replica.name}", docs_url=None, redoc_url=None, openapi_url=None)

    def guarded(route: str, handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as e:
                api._count(route, e.status)
                return e.response()
            except REFUSALS as e:
                err = api_error(e)
                api._count(route, err.status)
                return err.response()
            except Exception as e:  # a bug: still OpenAI's shape, and the traceback in the replica's log
                log.exception("%s failed", route)
                api._count(route, 500)
                return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()
        return endpoint

    app.add_api_route("/v1/completions", guarded("POST /v1/completions", api.completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", guarded("POST /v1/chat/completions", api.chat), methods=["POST"])

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(api)]})

    async def model(request: Request) -> Response:
        model = request.path_params["model"]
        if model != api.name:
            raise APIError(404, f"the model {model!r} does not exist; this endpoint serves {api.name!r}",
                           param="model", code="model_not_found")
        return JSONResponse(_model_card(api))

    app.add_api_route("/v1/models", guarded("GET /v1/models", models), methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", guarded("GET /v1/models/{model}", model), methods=["GET"])

    @app.get("/health")
    async def health() -> Response:
        try:
            engine = replica.engine()
        except NotReadyError as e:
            return api_error(e).response()
        error = engine.scheduler.error
        if error is not None:
            return APIError(503, f"the pipeline failed: {error}", "service_unavailable",
                            code="pipeline_unavailable").response()
        return JSONResponse({"status": "ok", "model": api.name})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        # Unknown paths and methods, in OpenAI's shape too.
        message = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, message, "invalid_request_error", code=str(e.status_code)).response()

    return app


def _model_card(api: OpenAIServer) -> dict:
    return {"id": api.name, "object": "model", "created": api.created, "owned_by": "jamba-serve",
            "max_model_len": api.replica.engine().max_seq_len}

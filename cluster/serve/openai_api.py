"""The OpenAI-compatible HTTP API on a replica (replica.py): its routes, on the engine's intake
and scheduler. OpenAI's wire format (the requests and their checks, the responses and stream
chunks) is openai_protocol.py.

It runs in the same Serve replica as the gRPC API (grpc_api.py), on the same engine, behind
Serve's HTTP proxy: the replica's FastAPI app is built here, per replica.

    POST /v1/completions        prompt: text, token ids, or a list of either; stream: true for SSE
    POST /v1/chat/completions   messages through the checkpoint's chat template; stream: true for SSE
    GET  /v1/models, /v1/models/{model}
    GET  /health                200 while the pipeline serves; 503 while it starts, and once it failed

Beyond plain sampling: structured output (response_format, vLLM's structured_outputs and guided_*,
compiled by the intake: stages/grammar.py), top_logprobs, penalties, logit_bias, min_tokens, and
tool calling (tools through the chat template; tool_choice "required" or a named function forced
by a grammar, "auto" read out of the text: tool_calls.py). What OpenAI's API has and this server
does not (suffix, best_of, images) is refused with a 400 naming the field, never ignored. Beyond
OpenAI's fields, requests may carry vLLM's `top_k`, `ignore_eos`, `stop_token_ids`,
`repetition_penalty` and `min_tokens`.

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
from cluster.runtime.intake import IntakeError
from cluster.runtime.scheduler import DeadlineExceededError, QueueFullError, SchedulerClosedError
from stages.sequence import GenerationResult

from .openai_protocol import APIError, ChatRequest, CompletionRequest, Completions, bad, parse, sse
from .openai_requests import Prepared, echoes, prepare_chat, prepare_completions, prepare_in_thread
from .replica import NotReadyError, Replica
from .tool_calls import ToolCallFormat, ToolsUnsupported

log = logging.getLogger("ray.serve")

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
        self._tools: ToolCallFormat | ToolsUnsupported | None = None  # the chat template's tool-call format

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

    # ---- the routes: a request through openai_requests.py, then the engine ---------------------
    async def completions(self, request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        engine = self._engine(req.model)
        prepared = await prepare_in_thread(prepare_completions, req, engine.intake, self.name, self._token_text)
        if prepared.echo:
            deadline = self.replica.deadline()
            scores = await asyncio.gather(*[engine.scheduler.score(s, deadline) for s in prepared.echo_scores])
            prepared.builder.echoes = echoes(prepared, scores, engine.tokenizer, self._token_text)
        return await self._answer(engine, prepared, "POST /v1/completions")

    async def chat(self, request: Request) -> Response:
        req = await parse(request, ChatRequest)
        engine = self._engine(req.model)
        prepared = await prepare_in_thread(prepare_chat, req, engine.intake, engine.max_seq_len, self.name,
                                           self._token_text, self._tool_format)
        return await self._answer(engine, prepared, "POST /v1/chat/completions")

    async def _answer(self, engine: Engine, prepared: Prepared, route: str) -> Response:
        self.replica.metrics.tokens_in.inc(sum(len(ids) for _, ids in prepared.prompts))
        if prepared.builder.req.stream:
            return await self._stream(engine, prepared.builder, prepared.jobs, route)
        finals = await self._run_all(engine, prepared.jobs)
        self._count(route, 200)
        return JSONResponse(prepared.builder.response(finals))

    def _tool_format(self) -> ToolCallFormat:
        """How the checkpoint's chat template writes tool calls (worked out once); ToolsUnsupported if it does not."""
        if self._tools is None:
            try:
                self._tools = ToolCallFormat.of(self.replica.engine().tokenizer)
            except ToolsUnsupported as e:
                self._tools = e
        if isinstance(self._tools, ToolsUnsupported):
            raise self._tools
        return self._tools

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

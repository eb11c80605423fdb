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
import json
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
from stages.grammar import GrammarError
from stages.sequence import GenerationResult, Structure

from .openai_protocol import (APIError, ChatCompletions, ChatRequest, CompletionRequest, Completions, bad,
                              chat_message, choice_params, output_structure, parse, refuse_unsupported,
                              sampling_params, sse)
from .replica import NotReadyError, Replica
from .tool_calls import NAME, Function, ToolCallFormat, ToolCallReader, ToolsUnsupported

log = logging.getLogger("ray.serve")

MAX_PROMPTS = 256  # prompts in one completions request, as for gRPC's Generate
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions' logprobs
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

    # ---- /v1/completions ---------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        engine = self._engine(req.model)
        refuse_unsupported(req)
        if req.suffix:
            raise bad("suffix", "suffix is not supported")
        if req.best_of not in (None, req.n):
            raise bad("best_of", "best_of is not supported (only equal to n)")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise bad("logprobs", f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS} (how many of the most "
                                  f"likely tokens to return at each step), got {req.logprobs}")
        if req.echo and req.logprobs:
            raise bad("echo", "echo with logprobs above 0 is not supported (the prompt's alternatives are not "
                              "computed); use logprobs: 0")
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
        field, structure = output_structure(req) or ("response_format", None)
        params = sampling_params(req, max_tokens, req.logprobs is not None, req.logprobs or 0, structure)
        names = {"structure": field, "top_logprobs": "logprobs"}
        checked = [await intake.generation_async(ids, params, "prompt" if len(prompts) == 1 else f"prompt[{i}]",
                                                 "max_tokens", names=names)
                   for i, (_, ids) in enumerate(prompts)]
        jobs = [(i * req.n + j, GenerateRequest(r.prompt, choice_params(r.params, j), r.grammar))
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
        if req.top_logprobs and not req.logprobs:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        if engine.tokenizer is None and req.messages:
            raise bad("messages", "the model has no tokenizer, so no chat template; use /v1/completions with token ids")
        tools, reader, forced = await self._tool_calling(engine, req)
        messages = [chat_message(m, i) for i, m in enumerate(req.messages)]
        ids = engine.intake.chat(messages, "messages", tools=tools)
        field, structure = output_structure(req) or ("response_format", None)
        if forced is not None:
            if structure is not None:
                raise bad(field, f"{field} cannot be combined with tool_choice {_choice_name(req.tool_choice)}: "
                                 "the answer is a tool call")
            field, structure = "tools", forced
        max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        # Unasked, a chat may take the rest of the context (at least one token, or the intake says it is full).
        max_tokens = asked if asked is not None else max(1, engine.max_seq_len - len(ids))
        params = sampling_params(req, max_tokens, req.logprobs, req.top_logprobs or 0, structure)
        checked = await engine.intake.generation_async(ids, params, "messages", max_field, names={"structure": field})
        jobs = [(j, GenerateRequest(ids, choice_params(checked.params, j), checked.grammar)) for j in range(req.n)]
        self.replica.metrics.tokens_in.inc(len(ids))
        out = ChatCompletions(self.name, self._token_text, req, [(None, ids)], reader)
        if req.stream:
            return await self._stream(engine, out, jobs, "POST /v1/chat/completions")
        finals = await self._run_all(engine, jobs)
        self._count("POST /v1/chat/completions", 200)
        return JSONResponse(out.response(finals))

    async def _tool_calling(self, engine: Engine, req: ChatRequest) -> tuple[list[dict] | None,
                                                                               ToolCallReader | None,
                                                                               Structure | None]:
        """What the request's tools ask for: the tools the chat template lists, the reader of the
        answer's tool calls, and, for tool_choice "required" or a named function, the grammar that
        forces a call. tool_choice "none" lists no tools and reads no calls."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise bad("tool_choice", "tool_choice needs tools")
            return None, None, None
        functions = await self._functions(engine, req.tools)
        if choice == "none":
            return None, None, None
        try:
            format = self._tool_format()
        except ToolsUnsupported as e:
            raise bad("tools", f"tools are not supported by {self.name!r}: {e}") from None
        listed = [t.model_dump(exclude_none=True) for t in req.tools]
        if choice in (None, "auto"):
            return listed, ToolCallReader(format, functions, engine.tokenizer), None
        if choice == "required":
            allowed = functions
        else:
            allowed = [f for f in functions if f.name == choice.function.name]
            if not allowed:
                raise bad("tool_choice", f"tool_choice names the function {choice.function.name!r}, which is not "
                                         "among tools")
        grammar = format.grammar(allowed, parallel=req.parallel_tool_calls is not False)
        return listed, ToolCallReader(format, allowed, engine.tokenizer), Structure("lark", grammar)

    async def _functions(self, engine: Engine, tools) -> list[Function]:
        """The tools' functions, checked: OpenAI's names, unique, and parameters a JSON Schema of an
        object that the grammar library compiles (first sight of a schema compiles it in a thread)."""
        functions = []
        for i, tool in enumerate(tools):
            fn, field = tool.function, f"tools[{i}].function"
            if not NAME.fullmatch(fn.name):
                raise bad(f"{field}.name", f"{field}.name must be 1 to 64 letters, digits, _ or -, got {fn.name[:80]!r}")
            if any(f.name == fn.name for f in functions):
                raise bad(f"{field}.name", f"{field}.name: two tools are named {fn.name!r}")
            if fn.parameters is None:
                functions.append(Function(fn.name))
                continue
            if fn.parameters.get("type", "object") != "object":
                raise bad(f"{field}.parameters", f"{field}.parameters must be the JSON Schema of an object "
                                                 "(type: object): the arguments are a JSON object")
            schema = Structure("json_schema", json.dumps(fn.parameters))
            if len(schema.spec) > Structure.MAX_SPEC:
                raise bad(f"{field}.parameters", f"{field}.parameters is {len(schema.spec)} characters of JSON, "
                                                 f"more than {Structure.MAX_SPEC}")
            grammars = engine.intake.grammars
            try:
                if not grammars.cached(schema):
                    await asyncio.to_thread(grammars.matcher, schema)
            except GrammarError as e:
                raise bad(f"{field}.parameters", f"{field}.parameters: {e}") from None
            functions.append(Function(fn.name, fn.parameters))
        return functions

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


def _choice_name(choice) -> str:
    return f"{{function: {choice.function.name}}}" if hasattr(choice, "function") else repr(choice)

"""OpenAI's wire format for the HTTP API (openai_api.py): the requests it accepts and their
checks, the errors, the responses and stream chunks; no Ray and no engine here.

Requests are pydantic models that refuse unknown fields and coerce nothing; a validation error
becomes a 400 whose `param` names the field as the client wrote it (`messages[0].content`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.runtime.scheduler import TokenEvent
from stages.sequence import GenerationResult, SamplingParams

MAX_N = 16  # choices per prompt


# ---- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


# ---- requests ---------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # Unknown fields are refused (as OpenAI does), and no type is coerced: "0.5" is not a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    temperature: float | None = None  # OpenAI's default is 1
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Not OpenAI's; vLLM's names for them.
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


# Fields whose union type makes pydantic's own message unreadable.
UNION_HELP = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}


async def parse(request: Request, model: type[_Strict]) -> _Strict:
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad(None, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    path: list[str] = []
    for part in err["loc"]:
        if isinstance(part, int):
            path.append(f"[{part}]")
        elif path and ("[" in part or part in ("str", "int", "float", "bool", "none", "function-after")):
            break  # pydantic names the union member it tried; the field is what the user knows
        else:
            path.append(("." if path else "") + part)
    param = "".join(path)
    field = str(err["loc"][-1]) if err["type"] == "extra_forbidden" else param.rsplit(".", 1)[-1].split("[")[0]
    if err["type"] == "extra_forbidden":
        return bad(param, f"{param}: unknown field (this server does not support it)")
    if err["type"] == "missing":
        return bad(param, f"{param} is required")
    help_ = UNION_HELP.get(field)
    return bad(param, f"{param} {help_}" if help_ else f"{param}: {err['msg']}")


def refuse_unsupported(req: _Common) -> None:
    """OpenAI fields whose meaning this server cannot honour: a clear 400, never silence."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad(name, f"{name} is not supported (only 0)")
    if req.logit_bias:
        raise bad("logit_bias", "logit_bias is not supported")
    if not 1 <= req.n <= MAX_N:
        raise bad("n", f"n must be between 1 and {MAX_N}, got {req.n}")
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")


def sampling_params(req: _Common, max_tokens: int, logprobs: bool) -> SamplingParams:
    """The request's sampling fields, OpenAI's defaults filled in (the engine's intake checks them:
    OpenAI's names are ours, but max_tokens)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=stop,
        stop_token_ids=list(req.stop_token_ids or []), logprobs=logprobs, ignore_eos=req.ignore_eos)


def choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """The params of choice j of n: its own seed (seed + j), so seeded choices differ from each other
    and choice 0 is what the same request with n=1 gives."""
    p = SamplingParams(**{k: getattr(params, k) for k in params.__dataclass_fields__})
    if p.seed is not None and j:
        p.seed = (p.seed + j) % 2**63
    return p


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- responses and stream chunks ---------------------------------------------------------------------------------------
class Completions:
    """/v1/completions responses and stream chunks."""

    object = "text_completion"

    def __init__(self, model: str, token_text, req, prompts, echoes: dict | None = None) -> None:
        # token_text(id): the token's string, for logprobs
        self.model, self.token_text, self.req, self.prompts, self.echoes = model, token_text, req, prompts, echoes or {}
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.completion_tokens = 0
        self.cached: dict[int, int] = {}  # choice index -> its prompt tokens found in the prefix cache
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def _head(self) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}

    def _finished(self, index: int, final: GenerationResult) -> None:
        self.completion_tokens += len(final.output_ids)
        self.cached[index] = final.cached_tokens

    def usage(self) -> dict:
        prompt = sum(len(ids) for _, ids in self.prompts)
        # A prompt's tokens count as cached if none of its n choices had to compute them.
        n = self.req.n
        cached = sum(min(self.cached.get(i * n + j, 0) for j in range(n)) for i in range(len(self.prompts)))
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}

    def _logprobs(self, ids: list[int], lps: list[float | None], text_before: str = "",
                  echo: tuple | None = None) -> dict | None:
        if self.req.logprobs is None:
            return None
        tokens = [self.token_text(t) for t in ids]
        if echo is not None:
            tokens, lps = echo[1] + tokens, echo[2] + lps
        offsets, at = [], len(text_before)
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}

    def response(self, finals: list[GenerationResult]) -> dict:
        choices = []
        for index, f in enumerate(finals):
            echo = self.echoes.get(index // self.req.n)
            text = (echo[0] if echo else "") + (f.text or "")
            lp = self._logprobs(f.output_ids, list(f.logprobs or []), echo=echo)
            choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": f.finish_reason})
            self._finished(index, f)
        return {**self._head(), "choices": choices, "usage": self.usage()}

    def start(self) -> list[dict]:
        """Chunks before any token: the echoed prompts."""
        out = []
        for i in sorted(self.echoes):
            text, tokens, lps = self.echoes[i]
            for j in range(self.req.n):
                lp = ({"tokens": tokens, "token_logprobs": lps, "top_logprobs": None,
                       "text_offset": _offsets(tokens)} if self.req.logprobs is not None else None)
                out.append(self._chunk(i * self.req.n + j, text, lp, None))
        return out

    def _chunk(self, index: int, text: str, logprobs, finish_reason) -> dict:
        return {**self._head(), "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                             "finish_reason": finish_reason}],
                **({"usage": None} if self.include_usage else {})}

    def chunk(self, index: int, events: list) -> list[dict]:
        tokens = [ev for ev in events if isinstance(ev, TokenEvent)]
        final = events[-1] if isinstance(events[-1], GenerationResult) else None
        if final is not None:
            self._finished(index, final)
        text = "".join(t.text for t in tokens)
        if not text and final is None and self.req.logprobs is None:
            return []  # text held back (part of a character, or maybe a stop string): nothing to say yet
        lp = self._logprobs([t.token_id for t in tokens], [t.logprob for t in tokens])
        return [self._chunk(index, text, lp, final.finish_reason if final else None)]

    def finish(self) -> dict | None:
        """The last chunk: usage, when the request asked for it."""
        if not self.include_usage:
            return None
        return {**self._head(), "choices": [], "usage": self.usage()}


class ChatCompletions(Completions):
    """/v1/chat/completions responses and stream chunks."""

    object = "chat.completion"

    def _content_logprobs(self, ids: list[int], lps: list[float | None]) -> dict | None:
        if not self.req.logprobs:
            return None
        out = []
        for t, lp in zip(ids, lps):
            s = self.token_text(t)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []})
        return {"content": out}

    def response(self, finals: list[GenerationResult]) -> dict:
        choices = []
        for index, f in enumerate(finals):
            choices.append({"index": index, "message": {"role": "assistant", "content": f.text or ""},
                            "logprobs": self._content_logprobs(f.output_ids, list(f.logprobs or [])),
                            "finish_reason": f.finish_reason})
            self._finished(index, f)
        return {**self._head(), "choices": choices, "usage": self.usage()}

    def _head(self) -> dict:
        return {"id": self.id.replace("cmpl-", "chatcmpl-"), "object": self.object, "created": self.created,
                "model": self.model}

    def _delta(self, index: int, delta: dict, logprobs, finish_reason) -> dict:
        return {**self._head(), "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                **({"usage": None} if self.include_usage else {})}

    def start(self) -> list[dict]:
        return [self._delta(j, {"role": "assistant", "content": ""}, None, None) for j in range(self.req.n)]

    def chunk(self, index: int, events: list) -> list[dict]:
        tokens = [ev for ev in events if isinstance(ev, TokenEvent)]
        final = events[-1] if isinstance(events[-1], GenerationResult) else None
        out = []
        text = "".join(t.text for t in tokens)
        lp = self._content_logprobs([t.token_id for t in tokens], [t.logprob for t in tokens])
        if text or lp:
            out.append(self._delta(index, {"content": text}, lp, None))
        if final is not None:
            self._finished(index, final)
            out.append(self._delta(index, {}, None, final.finish_reason))
        return out

    def finish(self) -> dict | None:
        if not self.include_usage:
            return None
        return {**self._head(), "object": "chat.completion.chunk", "choices": [], "usage": self.usage()}


def _offsets(tokens: list[str]) -> list[int]:
    out, at = [], 0
    for t in tokens:
        out.append(at)
        at += len(t)
    return out

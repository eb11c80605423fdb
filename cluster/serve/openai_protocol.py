"""OpenAI's wire format for the HTTP API (openai_api.py): the requests it accepts and their
checks, the errors, the responses and stream chunks; no Ray and no engine here.

Requests are pydantic models that refuse unknown fields and coerce nothing; a validation error
becomes a 400 whose `param` names the field as the client wrote it (`messages[0].content`).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.runtime.scheduler import TokenEvent
from stages.sequence import GenerationResult, SamplingParams, Structure

from .tool_calls import ToolCall, ToolCallReader, ToolCallScanner

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


class JSONSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow pydantic's method
    strict: bool | None = None  # accepted; the schema is always enforced


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` (exactly one of these; vLLM's other options are refused)."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")  # a JSON Schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # llguidance's Lark
    json_object: bool | None = None


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
    response_format: ResponseFormat | None = None  # OpenAI's for chat; vLLM takes it for completions too
    # Not OpenAI's; vLLM's names for them.
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's names before structured_outputs (removed in vLLM 0.12; clients still send them).
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    logprobs: int | None = None  # OpenAI's legacy meaning: the chosen tokens' log-probabilities and the top `logprobs`
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; omitted: no arguments
    strict: bool | None = None  # accepted; a forced call's arguments always validate


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatRequest(_Common):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


# Fields whose union type makes pydantic's own message unreadable.
UNION_HELP = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    "tool_choice": "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
    "json": "must be a JSON Schema (an object, or its text)",
    "guided_json": "must be a JSON Schema (an object, or its text)",
}


async def parse(request: Request, model: type[_Strict]) -> _Strict:
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(None, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad(None, "the request body nests too deeply") from None
    if not isinstance(data, dict):
        raise bad(None, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> APIError:
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
    """Request-level checks before any prompt is encoded."""
    if not 1 <= req.n <= MAX_N:
        raise bad("n", f"n must be between 1 and {MAX_N}, got {req.n}")
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")


def sampling_params(req: _Common, max_tokens: int, logprobs: bool, top_logprobs: int = 0,
                    structure: Structure | None = None) -> SamplingParams:
    """The request's sampling fields, OpenAI's defaults filled in. The engine's intake checks them
    (`NAMES` maps our names to OpenAI's in its errors); only logit_bias's keys are checked here,
    OpenAI sending token ids as JSON strings."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=stop,
        stop_token_ids=list(req.stop_token_ids or []), logprobs=logprobs, ignore_eos=req.ignore_eos,
        top_logprobs=top_logprobs, logit_bias=_logit_bias(req.logit_bias),
        min_tokens=0 if req.min_tokens is None else req.min_tokens,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
        structure=structure)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        if not re.fullmatch(r"-?[0-9]{1,19}", key):
            raise bad("logit_bias", f"logit_bias keys must be token ids (integers, as JSON strings), got {key[:40]!r}")
        out[int(key)] = value
    return out


# ---- structured output ---------------------------------------------------------------------------------
def output_structure(req: _Common) -> tuple[str, Structure] | None:
    """What the request constrains its output to, and the field that says so: OpenAI's
    response_format, vLLM's structured_outputs, or vLLM's older guided_* fields (at most one)."""
    found: list[tuple[str, Structure]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", Structure("json_object")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad("response_format.json_schema", "response_format of type json_schema needs json_schema.schema")
        found.append(("response_format", Structure("json_schema", json.dumps(rf.json_schema.schema_))))
    so = req.structured_outputs
    if so is not None:
        given = [(name, getattr(so, attr)) for name, attr in _STRUCTURED_OUTPUTS if getattr(so, attr) not in (None, False)]
        if len(given) != 1:
            raise bad("structured_outputs", "structured_outputs must set exactly one of "
                                            + ", ".join(name for name, _ in _STRUCTURED_OUTPUTS))
        name, value = given[0]
        found.append((f"structured_outputs.{name}", _structure(name, value, f"structured_outputs.{name}")))
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{name}")
        if value is not None:
            found.append((f"guided_{name}", _structure(name, value, f"guided_{name}")))
    if len(found) > 1:
        raise bad(found[1][0], f"{found[0][0]} and {found[1][0]} both constrain the output: give one of them")
    return found[0] if found else None


_STRUCTURED_OUTPUTS = (("json", "json_"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar"),
                       ("json_object", "json_object"))


def _structure(kind: str, value, field: str) -> Structure:
    """One of vLLM's constraints as a Structure (the grammar library checks the text itself)."""
    if kind == "json":
        return Structure("json_schema", value if isinstance(value, str) else json.dumps(value))
    if kind == "regex":
        return Structure("regex", value)
    if kind == "grammar":
        return Structure("lark", value)
    if kind == "choice":
        if not value or not all(value):
            raise bad(field, f"{field} must be a non-empty list of non-empty strings")
        return Structure("lark", "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    return Structure("json_object")


def chat_message(m: Message, i: int) -> dict:
    """A message as the chat template takes it: text parts joined; an assistant's tool_calls and a
    tool message's tool_call_id passed on."""
    content = m.content if isinstance(m.content, str) or m.content is None else "\n".join(p.text for p in m.content)
    out = {"role": m.role, "content": content or "", **({"name": m.name} if m.name else {})}
    if m.tool_calls:
        if m.role != "assistant":
            raise bad(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls: only assistant messages make tool calls")
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.role == "tool":
        if not m.tool_call_id:
            raise bad(f"messages[{i}].tool_call_id", f"messages[{i}].tool_call_id is required: a tool message "
                                                     "answers the call with that id")
        out["tool_call_id"] = m.tool_call_id
    elif m.tool_call_id is not None:
        raise bad(f"messages[{i}].tool_call_id", f"messages[{i}].tool_call_id: only tool messages answer a call")
    return out


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

    def _logprobs(self, ids: list[int], lps: list[float | None], tops: list | None, text_before: str = "",
                  echo: tuple | None = None) -> dict | None:
        """OpenAI's legacy logprobs: with `logprobs: N` above 0, `top_logprobs` maps each step's N
        most likely tokens, and the chosen one (so up to N + 1 entries), to their log-probabilities."""
        if self.req.logprobs is None:
            return None
        tokens = [self.token_text(t) for t in ids]
        top = None
        if self.req.logprobs:
            top = [{**{self.token_text(i): p for i, p in alternatives}, chosen: lp}
                   for chosen, lp, alternatives in zip(tokens, lps, tops or [[]] * len(ids))]
        if echo is not None:
            tokens, lps = echo[1] + tokens, echo[2] + lps
        offsets, at = [], len(text_before)
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}

    def response(self, finals: list[GenerationResult]) -> dict:
        choices = []
        for index, f in enumerate(finals):
            echo = self.echoes.get(index // self.req.n)
            text = (echo[0] if echo else "") + (f.text or "")
            lp = self._logprobs(f.output_ids, list(f.logprobs or []), f.top_logprobs, echo=echo)
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
        lp = self._logprobs([t.token_id for t in tokens], [t.logprob for t in tokens], [t.top_logprobs for t in tokens])
        return [self._chunk(index, text, lp, final.finish_reason if final else None)]

    def finish(self) -> dict | None:
        """The last chunk: usage, when the request asked for it."""
        if not self.include_usage:
            return None
        return {**self._head(), "choices": [], "usage": self.usage()}


class ChatCompletions(Completions):
    """/v1/chat/completions responses and stream chunks. With `tools` (a ToolCallReader), answers
    are read for tool calls: `message.tool_calls` and finish_reason "tool_calls"; streamed, text
    that may be a call is held back, and each call goes out as OpenAI sends it (a delta with its
    id and name and empty arguments, then one with the arguments)."""

    object = "chat.completion"

    def __init__(self, model: str, token_text, req, prompts, tools: ToolCallReader | None = None) -> None:
        super().__init__(model, token_text, req, prompts)
        self.tools = tools
        self.scanners: dict[int, ToolCallScanner] = {}  # choice index -> its stream's scanner
        self.calls: dict[int, int] = {}  # choice index -> tool calls streamed

    def _content_logprobs(self, ids: list[int], lps: list[float | None], tops: list | None) -> dict | None:
        if not self.req.logprobs:
            return None
        out = []
        for t, lp, alternatives in zip(ids, lps, tops or [None] * len(ids)):
            out.append({**self._token_logprob(t, lp), "top_logprobs": [self._token_logprob(i, p)
                                                                       for i, p in alternatives or []]})
        return {"content": out}

    def _token_logprob(self, token_id: int, logprob: float | None) -> dict:
        s = self.token_text(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    def response(self, finals: list[GenerationResult]) -> dict:
        choices = []
        for index, f in enumerate(finals):
            message, reason = {"role": "assistant", "content": f.text or ""}, f.finish_reason
            if self.tools is not None:
                message["content"], calls = self.tools.whole(f.output_ids, f.text or "")
                if calls:
                    message["tool_calls"] = [_tool_call(c) for c in calls]
                    reason = "tool_calls"
            choices.append({"index": index, "message": message, "finish_reason": reason,
                            "logprobs": self._content_logprobs(f.output_ids, list(f.logprobs or []), f.top_logprobs)})
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
        calls: list[ToolCall] = []
        if self.tools is None:
            text = "".join(t.text for t in tokens)
        else:
            scanner = self.scanners.setdefault(index, self.tools.scanner())
            pieces = []
            for t in tokens:
                piece, found = scanner.push_token(t.token_id, t.text)
                pieces.append(piece)
                calls += found
            text = "".join(pieces) + (scanner.finish() if final is not None else "")
        lp = self._content_logprobs([t.token_id for t in tokens], [t.logprob for t in tokens],
                                    [t.top_logprobs for t in tokens])
        out = []
        if text or lp:
            out.append(self._delta(index, {"content": text}, lp, None))
        for call in calls:
            k = self.calls.get(index, 0)
            self.calls[index] = k + 1
            head = _tool_call(call)
            head["function"]["arguments"] = ""
            out.append(self._delta(index, {"tool_calls": [{"index": k, **head}]}, None, None))
            out.append(self._delta(index, {"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]},
                                   None, None))
        if final is not None:
            self._finished(index, final)
            out.append(self._delta(index, {}, None, "tool_calls" if self.calls.get(index) else final.finish_reason))
        return out

    def finish(self) -> dict | None:
        if not self.include_usage:
            return None
        return {**self._head(), "object": "chat.completion.chunk", "choices": [], "usage": self.usage()}


def _tool_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _offsets(tokens: list[str]) -> list[int]:
    out, at = [], 0
    for t in tokens:
        out.append(at)
        at += len(t)
    return out

"""OpenAI requests, checked and turned into the engine's requests: what `/v1/completions` and
`/v1/chat/completions` (openai_api.py) and OpenAI Batch API files (cluster/batch/openai_batch.py)
both do with a parsed body, so a request means the same in both.

`prepare_completions` and `prepare_chat` take a parsed request (openai_protocol.py) and the
engine's intake, and return a `Prepared`: the engine requests of its choices (n per prompt), the
prompts to score for `echo` with logprobs, and the builder of its response. They are plain
functions that may compile grammars (a structure, tools' parameters: stages/grammar.py, cached):
a caller on an event loop runs them in a thread when `compiles(...)` says they will
(`prepare_in_thread`). Problems raise `APIError` (400, `param` naming the field) or the intake's
`IntakeError`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from typing import Callable

from cluster.runtime.intake import GenerateRequest, Intake, ScoreRequest
from stages.grammar import GrammarError
from stages.sequence import Structure

from .openai_protocol import (ChatCompletions, ChatRequest, CompletionRequest, Completions, bad, chat_message,
                              choice_params, output_structure, refuse_unsupported, sampling_params)
from .tool_calls import NAME, Function, ToolCallFormat, ToolCallReader

MAX_PROMPTS = 256  # prompts in one completions request, as for gRPC's Generate
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions' logprobs
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context

ToolFormat = Callable[[], ToolCallFormat]  # the chat template's tool-call format; raises ToolsUnsupported


@dataclass
class Prepared:
    """One request, checked: its choices' engine requests (index, request) and its response's builder."""

    builder: Completions
    jobs: list[tuple[int, GenerateRequest]]
    prompts: list[tuple[str | None, list[int]]]  # (text as given, or None for token ids; the ids)
    echo: bool = False  # the response starts with the prompts (completions' echo: see `echoes`)
    echo_scores: list[ScoreRequest] = field(default_factory=list)  # echo with logprobs: each prompt, scored


def compiles(req: CompletionRequest | ChatRequest, intake: Intake) -> bool:
    """Whether preparing `req` may compile a grammar (a first sight of its structure, or tools)."""
    found = output_structure(req)
    return bool(getattr(req, "tools", None)) or (found is not None and intake.tokenizer is not None
                                                 and not intake.grammars.cached(found[1]))


async def prepare_in_thread(prepare: Callable[..., Prepared], req, intake: Intake, *args) -> Prepared:
    """`prepare(req, intake, *args)` for a caller on an event loop: in a thread when it compiles."""
    if compiles(req, intake):
        return await asyncio.to_thread(prepare, req, intake, *args)
    return prepare(req, intake, *args)


# ---- /v1/completions ---------------------------------------------------------------------------------
def prepare_completions(req: CompletionRequest, intake: Intake, model: str, token_text) -> Prepared:
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
    p = req.prompt
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
    where, structure = output_structure(req) or ("response_format", None)
    params = sampling_params(req, max_tokens, req.logprobs is not None, req.logprobs or 0, structure)
    names = {"structure": where, "top_logprobs": "logprobs"}
    checked = [intake.generation(ids, params, "prompt" if len(prompts) == 1 else f"prompt[{i}]", "max_tokens",
                                 names=names) for i, (_, ids) in enumerate(prompts)]
    jobs = [(i * req.n + j, replace(r, params=choice_params(r.params, j))) for i, r in enumerate(checked)
            for j in range(req.n)]
    scores = [intake.scoring(ids, "prompt") for _, ids in prompts] if req.echo and req.logprobs is not None else []
    return Prepared(Completions(model, token_text, req, prompts), jobs, prompts, bool(req.echo), scores)


def echoes(prepared: Prepared, scores: list[list[float | None]], tokenizer, token_text) -> dict[int, tuple]:
    """The builder's `echoes` of an echo request: per prompt its text and, when scored
    (logprobs), its tokens and their log-probabilities (the first token has none)."""
    out = {}
    for i, (text, ids) in enumerate(prepared.prompts):
        if text is None:
            text = tokenizer.decode(ids) if tokenizer else ""
        out[i] = (text, [token_text(t) for t in ids] if scores else [], scores[i] if scores else [])
    return out


# ---- /v1/chat/completions ---------------------------------------------------------------------------
def prepare_chat(req: ChatRequest, intake: Intake, max_seq_len: int, model: str, token_text,
                 tool_format: ToolFormat) -> Prepared:
    refuse_unsupported(req)
    if req.top_logprobs and not req.logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    if intake.tokenizer is None and req.messages:
        raise bad("messages", "the model has no tokenizer, so no chat template; use /v1/completions with token ids")
    tools, reader, forced = _tool_calling(req, intake, model, tool_format)
    messages = [chat_message(m, i) for i, m in enumerate(req.messages)]
    ids = intake.chat(messages, "messages", tools=tools)
    where, structure = output_structure(req) or ("response_format", None)
    if forced is not None:
        if structure is not None:
            raise bad(where, f"{where} cannot be combined with tool_choice {_choice_name(req.tool_choice)}: "
                             "the answer is a tool call")
        where, structure = "tools", forced
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    # Unasked, a chat may take the rest of the context (at least one token, or the intake says it is full).
    max_tokens = asked if asked is not None else max(1, max_seq_len - len(ids))
    params = sampling_params(req, max_tokens, req.logprobs, req.top_logprobs or 0, structure)
    checked = intake.generation(ids, params, "messages", max_field, names={"structure": where})
    jobs = [(j, replace(checked, params=choice_params(checked.params, j))) for j in range(req.n)]
    return Prepared(ChatCompletions(model, token_text, req, [(None, ids)], reader), jobs, [(None, ids)])


def _tool_calling(req: ChatRequest, intake: Intake, model: str,
                  tool_format: ToolFormat) -> tuple[list[dict] | None, ToolCallReader | None, Structure | None]:
    """What the request's tools ask for: the tools the chat template lists, the reader of the
    answer's tool calls, and, for tool_choice "required" or a named function, the grammar that
    forces a call. tool_choice "none" lists no tools and reads no calls."""
    from .tool_calls import ToolsUnsupported

    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad("tool_choice", "tool_choice needs tools")
        return None, None, None
    functions = _functions(req.tools, intake)
    if choice == "none":
        return None, None, None
    try:
        format = tool_format()
    except ToolsUnsupported as e:
        raise bad("tools", f"tools are not supported by {model!r}: {e}") from None
    listed = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice in (None, "auto"):
        return listed, ToolCallReader(format, functions, intake.tokenizer), None
    if choice == "required":
        allowed = functions
    else:
        allowed = [f for f in functions if f.name == choice.function.name]
        if not allowed:
            raise bad("tool_choice", f"tool_choice names the function {choice.function.name!r}, which is not "
                                     "among tools")
    grammar = format.grammar(allowed, parallel=req.parallel_tool_calls is not False)
    return listed, ToolCallReader(format, allowed, intake.tokenizer), Structure("lark", grammar)


def _functions(tools, intake: Intake) -> list[Function]:
    """The tools' functions, checked: OpenAI's names, unique, and parameters a JSON Schema of an
    object that the grammar library compiles."""
    functions = []
    for i, tool in enumerate(tools):
        fn, where = tool.function, f"tools[{i}].function"
        if not NAME.fullmatch(fn.name):
            raise bad(f"{where}.name", f"{where}.name must be 1 to 64 letters, digits, _ or -, got {fn.name[:80]!r}")
        if any(f.name == fn.name for f in functions):
            raise bad(f"{where}.name", f"{where}.name: two tools are named {fn.name!r}")
        if fn.parameters is None:
            functions.append(Function(fn.name))
            continue
        if fn.parameters.get("type", "object") != "object":
            raise bad(f"{where}.parameters", f"{where}.parameters must be the JSON Schema of an object "
                                             "(type: object): the arguments are a JSON object")
        schema = Structure("json_schema", json.dumps(fn.parameters))
        if len(schema.spec) > Structure.MAX_SPEC:
            raise bad(f"{where}.parameters", f"{where}.parameters is {len(schema.spec)} characters of JSON, "
                                             f"more than {Structure.MAX_SPEC}")
        if intake.tokenizer is not None:
            try:
                intake.grammars.matcher(schema)
            except GrammarError as e:
                raise bad(f"{where}.parameters", f"{where}.parameters: {e}") from None
        functions.append(Function(fn.name, fn.parameters))
    return functions


def _choice_name(choice) -> str:
    return f"{{function: {choice.function.name}}}" if hasattr(choice, "function") else repr(choice)

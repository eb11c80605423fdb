"""What the client sends and gets back: prompt and sampling builders, typed results, JambaError.

Everything here is a pure conversion between plain Python values and the protos of
protos/jamba.proto, so it can be tested without a server and shared by the sync and async
clients. Builders check the Python types and name the offending field; value ranges
(temperature >= 0, token ids within the vocabulary, ...) are the server's to check, because only
the server knows the model: it answers INVALID_ARGUMENT with a message naming the field.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

import grpc

from protos import jamba_pb2 as pb

# A prompt: text, token ids, chat messages, or an already built Prompt proto.
PromptLike = Union[str, Sequence[int], Sequence[Mapping[str, str]], pb.Prompt]


# ---- errors -----------------------------------------------------------------------------------
_RETRY_AFTER = re.compile(r"retry after (\d+) ms")


class JambaError(Exception):
    """A failed RPC: the gRPC status code and the server's message.

    `str()` is `CODE: details` (e.g. `INVALID_ARGUMENT: params.temperature must be >= 0`), which is
    what the CLI prints. The codes the service uses are listed in protos/jamba.proto.
    """

    def __init__(self, code: grpc.StatusCode | str, details: str) -> None:
        if isinstance(code, str):
            code = grpc.StatusCode[code]
        super().__init__(code.name, details)  # plain args, so the error pickles
        self.code: grpc.StatusCode = code
        self.details: str = details

    @property
    def code_name(self) -> str:
        return self.code.name

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before retrying, when the server said (RESOURCE_EXHAUSTED: its queue is
        full; the details end with "retry after N ms"), else None."""
        m = _RETRY_AFTER.search(self.details)
        return int(m.group(1)) / 1000 if m else None

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> "JambaError":
        # Every RpcError that grpc raises for a call is also a grpc.Call with code()/details();
        # the fallbacks only guard against an RpcError raised by something else.
        code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


# ---- results ----------------------------------------------------------------------------------
class TopLogprob(NamedTuple):
    """A likely token at an output position: its id, log-probability and text (on its own: a
    byte-level token may be part of a character)."""

    token_id: int
    logprob: float
    token: str


@dataclass
class Completion:
    """One finished generation. `logprobs` and `top_logprobs` are None unless the call asked for them."""

    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    logprobs: list[float] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache
    top_logprobs: list[list[TopLogprob]] | None = None  # per output token, most likely first


@dataclass
class Delta:
    """Tokens of a stream as they are sampled. `text` is the text that became final with these
    tokens; it may be empty (e.g. half of a multi-byte character)."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    top_logprobs: list[list[TopLogprob]] | None = None  # per token, most likely first


@dataclass
class Classification:
    logits: list[float]
    probs: list[float]
    label: str


@dataclass
class ScoreResult:
    """`token_logprobs[i]` is log p(token_ids[i] | token_ids[:i]); the first token has none, so
    `token_logprobs[0]` is None and both lists have the same length (the JSONL contract)."""

    token_ids: list[int]
    token_logprobs: list[float | None]
    sum_logprob: float


class Stage(NamedTuple):
    """A pipeline stage owning layers [start_layer, end_layer)."""

    index: int
    start_layer: int
    end_layer: int


@dataclass
class ModelInfo:
    model_name: str
    task: str  # "causal-lm" or "classification"
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_experts: int
    num_experts_per_tok: int
    attn_layer_period: int
    attn_layer_offset: int
    max_context: int
    stages: list[Stage] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    num_slots: int = 0
    quantize: str = ""  # "" (weights as stored), "int8-experts", "int8" or "int8-with-mamba"
    block_size: int = 0  # tokens per KV block
    num_blocks: int = 0  # KV blocks per stage
    num_snapshots: int = 0  # Mamba-state snapshots per stage (prefix cache)
    prefix_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; stages become {"index", "start_layer", "end_layer"} objects."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["stages"] = [s._asdict() for s in self.stages]
        d["labels"] = list(self.labels)
        return d


# ---- prompts ----------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    # numbers.Integral also admits numpy integers without importing numpy; bool is not a token id.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_sequence(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes, bytearray))


def to_chat(messages: Sequence[Mapping[str, str]]) -> pb.Chat:
    """Chat messages -> Chat proto. The proto carries only `role` and `content` (strings), so any
    other key (tool_calls, name, content parts) is an error rather than silently dropped."""
    if not _is_sequence(messages):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {i} must be a dict, got {type(m).__name__}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise ValueError(f"message {i} has keys the service does not take: {', '.join(map(str, extra))} "
                             "(only role and content)")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise TypeError(f"message {i} {key} must be a string, got {type(m.get(key)).__name__}")
        out.append(pb.ChatMessage(role=m["role"], content=m["content"]))
    return pb.Chat(messages=out)


def to_prompt(prompt: PromptLike) -> pb.Prompt:
    """A `str` is text, a list of ints is token ids, a list of dicts is a chat."""
    if isinstance(prompt, pb.Prompt):
        return prompt
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    if _is_sequence(prompt):
        if not prompt:
            raise ValueError("a prompt cannot be an empty list (neither token ids nor messages)")
        if all(_is_int(x) for x in prompt):
            return pb.Prompt(token_ids=pb.TokenIds(ids=[int(x) for x in prompt]))
        if all(isinstance(x, Mapping) for x in prompt):
            return pb.Prompt(chat=to_chat(prompt))
    raise TypeError("a prompt is a str (text), a list of int (token ids) or a list of {'role', 'content'} "
                    f"dicts (chat), got {_describe(prompt)}")


def to_prompts(prompts: Sequence[PromptLike], what: str = "prompts") -> list[pb.Prompt]:
    """A batch of prompts. A single prompt is refused rather than guessed at: a list of ints or of
    message dicts is itself one prompt, and a str would be split into characters."""
    if isinstance(prompts, (str, pb.Prompt)) or (
            _is_sequence(prompts) and prompts and all(_is_int(x) or isinstance(x, Mapping) for x in prompts)):
        raise TypeError(f"{what} must be a list of prompts; this is a single prompt: wrap it in a list")
    if not _is_sequence(prompts):
        raise TypeError(f"{what} must be a list of prompts, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        try:
            out.append(to_prompt(p))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{what}[{i}]: {e}") from None
    return out


def _describe(x: Any) -> str:
    if _is_sequence(x):
        kinds = sorted({type(e).__name__ for e in x})
        return f"a {type(x).__name__} of {', '.join(kinds)}"
    return type(x).__name__


# ---- sampling parameters ----------------------------------------------------------------------
STRUCTURES = ("json_schema", "json_object", "regex", "grammar")  # the proto's structure oneof


def sampling_params(*, max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None,
                    stop_token_ids: Sequence[int] | None = None, logprobs: bool = False,
                    ignore_eos: bool = False, top_logprobs: int | None = None,
                    logit_bias: Mapping[int, float] | None = None, min_tokens: int | None = None,
                    repetition_penalty: float | None = None, frequency_penalty: float | None = None,
                    presence_penalty: float | None = None, json_schema: str | Mapping | bool | None = None,
                    json_object: bool = False, regex: str | None = None, grammar: str | None = None,
                    ) -> pb.SamplingParams:
    """The SamplingParams proto; only the fields given are set, so the server's defaults apply to
    the rest (max_new_tokens 16, greedy, no top-k/top-p, unseeded, no penalties). `stop` may be one
    string; `logit_bias` maps token ids (ints) to the number added to their logits.

    At most one structure constrains the output: `json_schema` (a JSON Schema, as a dict or JSON
    text), `json_object=True` (any JSON object), `regex`, or `grammar` (Lark, llguidance's dialect).
    """
    p = pb.SamplingParams()
    for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k), ("seed", seed),
                        ("top_logprobs", top_logprobs), ("min_tokens", min_tokens)):
        if value is not None:
            if not _is_int(value):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
            if name == "seed" and not 0 <= value < 2**64:
                raise ValueError(f"seed must be in [0, 2**64), got {value}")
            _set(p, name, int(value))
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty),
                        ("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if value is not None:
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            _set(p, name, float(value))
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not _is_sequence(stops) or not all(isinstance(s, str) for s in stops):
            raise TypeError("stop must be a string or a list of strings")
        p.stop.extend(stops)
    if stop_token_ids is not None:
        if not _is_sequence(stop_token_ids) or not all(_is_int(i) for i in stop_token_ids):
            raise TypeError("stop_token_ids must be a list of integers")
        _set(p, "stop_token_ids", [int(i) for i in stop_token_ids])
    for name, value in (("logprobs", logprobs), ("ignore_eos", ignore_eos), ("json_object", json_object)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false")
    p.logprobs, p.ignore_eos = logprobs, ignore_eos
    if logit_bias is not None:
        _set(p, "logit_bias", _logit_bias(logit_bias))
    _set_structure(p, json_schema=json_schema, json_object=json_object, regex=regex, grammar=grammar)
    return p


def _logit_bias(bias: Any) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise TypeError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    out = {}
    for k, v in bias.items():
        if not _is_int(k):
            raise TypeError(f"logit_bias keys must be token ids, got {k!r}")
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"logit_bias[{k}] must be a number, got {type(v).__name__}")
        out[int(k)] = float(v)
    return out


def _set_structure(p: pb.SamplingParams, **given: Any) -> None:
    """The structure oneof from whichever of STRUCTURES is given (json_object=False is not given)."""
    chosen = {k: v for k, v in given.items() if v is not None and not (k == "json_object" and v is False)}
    if len(chosen) > 1:
        raise ValueError(f"at most one of {', '.join(STRUCTURES)} constrains the output (got {', '.join(chosen)})")
    for name, value in chosen.items():
        if name == "json_schema" and not isinstance(value, str):
            if not isinstance(value, (Mapping, bool)):
                raise TypeError(f"json_schema must be a JSON Schema (a dict, or JSON text), got {type(value).__name__}")
            value = json.dumps(value, ensure_ascii=False)
        elif name != "json_object" and not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        _set(p, name, value)


def _set(p: pb.SamplingParams, name: str, value: Any) -> None:
    """Set a field, turning protobuf's range errors (an int beyond int64) into ones naming it."""
    try:
        if isinstance(value, list):
            getattr(p, name).extend(value)
        elif isinstance(value, dict):
            getattr(p, name).update(value)
        else:
            setattr(p, name, value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None


# ---- requests ---------------------------------------------------------------------------------
def generate_request(prompts: Sequence[PromptLike], params: pb.SamplingParams) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompts=to_prompts(prompts), params=params)


def generate_stream_request(prompt: PromptLike, params: pb.SamplingParams) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(prompt=to_prompt(prompt), params=params)


def classify_request(inputs: Sequence[PromptLike]) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(inputs=to_prompts(inputs, "inputs"))


def score_request(inputs: Sequence[PromptLike]) -> pb.ScoreRequest:
    return pb.ScoreRequest(inputs=to_prompts(inputs, "inputs"))


# ---- responses --------------------------------------------------------------------------------
# A repeated field cannot say "not asked for" apart from "empty", so the caller passes whether
# it asked for logprobs: None then means "not requested", [] a genuinely empty list.
def completion_from_pb(c: pb.Completion, logprobs: bool, top_logprobs: bool = False) -> Completion:
    return Completion(output_ids=list(c.output_ids), text=c.text, finish_reason=c.finish_reason,
                      logprobs=list(c.logprobs) if logprobs else None,
                      prompt_tokens=c.usage.prompt_tokens, completion_tokens=c.usage.completion_tokens,
                      cached_tokens=c.usage.cached_tokens,
                      top_logprobs=_top_logprobs(c.top_logprobs) if top_logprobs else None)


def delta_from_pb(d: pb.TokenDelta, logprobs: bool, top_logprobs: bool = False) -> Delta:
    return Delta(token_ids=list(d.token_ids), text=d.text, logprobs=list(d.logprobs) if logprobs else None,
                 top_logprobs=_top_logprobs(d.top_logprobs) if top_logprobs else None)


def _top_logprobs(steps) -> list[list[TopLogprob]]:
    return [[TopLogprob(c.token_id, c.logprob, c.token) for c in step.candidates] for step in steps]


def classification_from_pb(c: pb.Classification) -> Classification:
    return Classification(logits=list(c.logits), probs=list(c.probs), label=c.label)


def score_result_from_pb(r: pb.ScoreResult) -> ScoreResult:
    """The proto has one log-probability per token after the first; the result puts None first
    so that token_logprobs lines up with token_ids."""
    lps: list[float | None] = [None, *r.token_logprobs] if r.token_ids else []
    return ScoreResult(token_ids=list(r.token_ids), token_logprobs=lps, sum_logprob=r.sum_logprob)


def model_info_from_pb(m: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_name=m.model_name, task=m.task, num_layers=m.num_layers, hidden_size=m.hidden_size,
        vocab_size=m.vocab_size, num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
        attn_layer_period=m.attn_layer_period, attn_layer_offset=m.attn_layer_offset, max_context=m.max_context,
        stages=[Stage(s.index, s.start_layer, s.end_layer) for s in m.stages], labels=list(m.labels),
        num_slots=m.num_slots, quantize=m.quantize, block_size=m.block_size, num_blocks=m.num_blocks,
        num_snapshots=m.num_snapshots, prefix_cache=m.prefix_cache,
    )

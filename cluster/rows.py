"""The JSON Lines contracts of `jamba generate|score|classify` (and, later, batch jobs).

A row is a JSON object. It names its input with exactly one of `prompt`/`text` (a string),
`input_ids` (token ids) or `messages` (chat, rendered with the checkpoint's chat template), and
may carry sampling parameters. The output row is the input row plus the result fields.
Every problem raises `RowError` with a message that names the field.
"""

from __future__ import annotations

import math
from typing import Any

from stages.config import JambaConfig
from stages.sequence import GenerationResult
from stages.sequence import SamplingParams

INPUT_FIELDS = ("prompt", "text", "input_ids", "messages")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "logprobs")
DEFAULT_MAX_NEW_TOKENS = 16


class RowError(ValueError):
    pass


def prompt_ids(row: dict[str, Any], tokenizer, config: JambaConfig, task: str = "score") -> list[int]:
    """The row's input as token ids; text gets the tokenizer's special tokens (BOS), as HF does."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, not {type(row).__name__}")
    if task == "generate" and "text" in row:
        # `text` is generate's output field; taking it as input would overwrite the input.
        raise RowError("generate takes its input as prompt, input_ids or messages; text is the output field")
    given = [f for f in INPUT_FIELDS if f in row]
    if len(given) != 1:
        raise RowError(f"a row needs exactly one of {', '.join(INPUT_FIELDS)}" + (f" (got {', '.join(given)})" if given else ""))
    field = given[0]
    value = row[field]
    if field in ("prompt", "text"):
        if not isinstance(value, str):
            raise RowError(f"{field} must be a string")
        if not value:
            raise RowError(f"{field} is empty")
        _need_tokenizer(tokenizer, field)
        ids = tokenizer.encode(value)
    elif field == "messages":
        _need_tokenizer(tokenizer, field)
        try:
            ids = tokenizer.encode_chat(value)
        except ValueError as e:  # includes ChatTemplateError
            raise RowError(f"messages: {e}") from None
    else:
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise RowError("input_ids must be a list of integers")
        ids = value
    if not ids:
        raise RowError(f"{field} is empty")
    bad = [i for i in ids if not 0 <= i < config.vocab_size]
    if bad:
        raise RowError(f"{field} has token ids out of range [0, {config.vocab_size}): {bad[:5]}")
    return ids


def _need_tokenizer(tokenizer, field: str) -> None:
    if tokenizer is None:
        raise RowError(f"{field} needs a tokenizer, and the model directory has no tokenizer.json; send input_ids")


def sampling_params(row: dict[str, Any], vocab_size: int) -> SamplingParams:
    kwargs = {k: row[k] for k in SAMPLING_FIELDS if k in row and row[k] is not None}
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = [kwargs["stop"]]
    for name in ("temperature", "top_p"):  # JSON has no NaN, but accept ints for floats
        if isinstance(kwargs.get(name), int) and not isinstance(kwargs[name], bool):
            kwargs[name] = float(kwargs[name])
    if "logprobs" in kwargs and not isinstance(kwargs["logprobs"], bool):
        raise RowError("logprobs must be true or false")
    kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    params = SamplingParams(**kwargs)
    try:
        params.validate(vocab_size)
    except ValueError as e:
        raise RowError(str(e)) from None
    return params


def check_context(ids: list[int], max_new_tokens: int, limit: int) -> None:
    if len(ids) + max_new_tokens > limit:
        raise RowError(
            f"prompt has {len(ids)} tokens; with max_new_tokens {max_new_tokens} it exceeds the model's context of {limit}"
        )


# ---- output rows ------------------------------------------------------------------------------
def generation_row(row: dict[str, Any], res: GenerationResult) -> dict[str, Any]:
    out = dict(row, output_ids=res.output_ids, text=res.text, finish_reason=res.finish_reason)
    if res.logprobs is not None:
        out["logprobs"] = res.logprobs
    return out


def score_row(row: dict[str, Any], token_logprobs: list[float | None]) -> dict[str, Any]:
    return dict(row, token_logprobs=token_logprobs, sum_logprob=math.fsum(x for x in token_logprobs if x is not None))


def classify_row(row: dict[str, Any], logits: list[float], id2label: dict[int, str]) -> dict[str, Any]:
    m = max(logits)
    exp = [math.exp(x - m) for x in logits]
    total = sum(exp)
    probs = [e / total for e in exp]
    best = max(range(len(probs)), key=probs.__getitem__)
    return dict(row, logits=logits, probs=probs, label=id2label.get(best, str(best)))

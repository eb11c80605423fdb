"""The JSON Lines rows that `jamba generate|score|classify`, `jamba client ...` and batch jobs
read: their shape, checked here once for all of them (cluster/batch/rows.py builds on this with
the model's tokenizer; client/cli.py with the protos).

A row is a JSON object. It names its input with exactly one of `prompt`/`text` (a string),
`input_ids` (token ids) or `messages` (chat, rendered with the checkpoint's chat template), and
for generate may carry sampling parameters (SAMPLING_FIELDS, named as in the gRPC API's
SamplingParams). The output row is the input row plus the result fields. Every problem raises
`RowError` with a message that names the field. What needs the model (token ids in range, the
chat template, the context, whether a schema compiles) is checked by whoever runs it.

Fields outside the contract are the row's own data (an `id`, a note), carried to the output
untouched, except those that look like a parameter: another API's name for one of ours
(OpenAI's `max_tokens`, vLLM's `guided_json`, transformers' `do_sample`, ...) or a near-miss of
a field name (`temprature`). Those are errors that say what to write instead, since ignoring
them would silently change what the row asks for. (Sampling fields on a score or classify row
are the contract's own, and unused there: one file may serve generate and score.)
"""

from __future__ import annotations

import difflib
import json
from typing import Any

INPUT_FIELDS = ("prompt", "text", "input_ids", "messages")
STRUCTURE_FIELDS = ("json_schema", "json_object", "regex", "grammar")  # at most one: the output matches it
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "logprobs",
                   "ignore_eos", "top_logprobs", "logit_bias", "min_tokens", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", *STRUCTURE_FIELDS)
RESULT_FIELDS = ("output_ids", "finish_reason", "token_logprobs", "sum_logprob", "logits", "probs",
                 "label", "error", "line")

# Other APIs' names for what a row says otherwise, and what to write instead.
FOREIGN_FIELDS = {
    "max_tokens": "write max_new_tokens (max_tokens is OpenAI's name)",
    "max_completion_tokens": "write max_new_tokens (max_completion_tokens is OpenAI's name)",
    "max_length": "write max_new_tokens, the number of new tokens (max_length is transformers' total length)",
    "min_new_tokens": "write min_tokens (min_new_tokens is transformers' name)",
    "response_format": "write json_schema: {schema} or json_object: true (response_format is OpenAI's wrapper)",
    "guided_json": "write json_schema (guided_json is vLLM's name)",
    "guided_regex": "write regex (guided_regex is vLLM's name)",
    "guided_grammar": "write grammar, a Lark grammar (guided_grammar is vLLM's name)",
    "guided_choice": "write regex with the choices as alternatives, e.g. \"(yes|no)\" (guided_choice is vLLM's)",
    "schema": "write json_schema",
    "stop_sequences": "write stop (stop_sequences is another API's name)",
    "top_n_tokens": "write top_logprobs (top_n_tokens is TGI's name)",
    "repeat_penalty": "write repetition_penalty",
    "do_sample": "write temperature (0 is greedy; above 0 samples)",
    "n": "write one row per sample, each with its own seed (a row makes one completion)",
    "best_of": "write one row per sample, each with its own seed (a row makes one completion)",
    "num_beams": "beam search is not supported",
    "use_beam_search": "beam search is not supported",
    "min_p": "min_p is not supported: use top_p or top_k",
    "typical_p": "typical_p is not supported: use top_p or top_k",
    "tools": "tools are for the OpenAI API's /v1/chat/completions (an OpenAI batch file carries them)",
    "tool_choice": "tools are for the OpenAI API's /v1/chat/completions (an OpenAI batch file carries them)",
    "stream": "rows are not streamed: `jamba client stream` streams them",
    "echo": "the output row holds the input row already",
    "prompt_logprobs": "score the prompt with `jamba score`",
}


class RowError(ValueError):
    pass


def parse_line(line: str) -> dict[str, Any]:
    """A line of a JSON Lines file (read with errors="surrogateescape") as a row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError(f"malformed JSON: {e.msg} at column {e.colno}") from None
    if any("\udc80" <= ch <= "\udcff" for ch in line):  # surrogateescape marks bad bytes
        raise RowError("line is not valid UTF-8")
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, not {type(row).__name__}")
    return row


def row_input(row: dict[str, Any], task: str) -> tuple[str, Any]:
    """(field, value) of the row's input: a non-empty string (prompt, text), a non-empty list of
    integers (input_ids) or a non-empty list (messages); the row's other fields checked too
    (check_fields)."""
    if task == "generate" and "text" in row:
        # `text` is generate's output field; taking it as input would overwrite the input.
        raise RowError("generate takes its input as prompt, input_ids or messages; text is the output field")
    given = [f for f in INPUT_FIELDS if f in row]
    if len(given) != 1:
        got = f" (got {', '.join(given)})" if given else ""
        raise RowError(f"a row needs exactly one of {', '.join(INPUT_FIELDS)}{got}")
    field = given[0]
    value = row[field]
    if field in ("prompt", "text"):
        if not isinstance(value, str):
            raise RowError(f"{field} must be a string")
    elif field == "input_ids":
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise RowError("input_ids must be a list of integers")
    elif not isinstance(value, list) or not value:
        raise RowError("messages must be a non-empty list of {role, content} objects")
    if not value:
        raise RowError(f"{field} is empty")
    check_fields(row)
    return field, value


def check_fields(row: dict[str, Any]) -> None:
    """Refuse the fields that look like parameters the contract does not have (see the module's docstring)."""
    for name in row:
        if name in INPUT_FIELDS or name in SAMPLING_FIELDS or name in RESULT_FIELDS or name == "id":
            continue
        if name in FOREIGN_FIELDS:
            raise RowError(f"unknown field {name}: {FOREIGN_FIELDS[name]}")
        close = difflib.get_close_matches(name, [*SAMPLING_FIELDS, *INPUT_FIELDS, *FOREIGN_FIELDS], n=1, cutoff=0.85)
        if close and close[0] in FOREIGN_FIELDS:
            raise RowError(f"unknown field {name} (like {close[0]}): {FOREIGN_FIELDS[close[0]]}")
        if close:
            raise RowError(f"unknown field {name}: did you mean {close[0]}?")


def row_sampling(row: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields the row gives (a null is an absent field), in the shapes the client's
    `sampling_params` takes: `stop` a list, `logit_bias` keyed by int ids, at most one structure.
    Value ranges are the engine's to check."""
    out = {k: row[k] for k in SAMPLING_FIELDS if row.get(k) is not None}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if "logit_bias" in out:
        out["logit_bias"] = _logit_bias(out["logit_bias"])
    structures = [k for k in STRUCTURE_FIELDS if k in out and out[k] is not False]
    if len(structures) > 1:
        raise RowError(f"at most one of {', '.join(STRUCTURE_FIELDS)} constrains the output (got {', '.join(structures)})")
    if "json_schema" in out and not isinstance(out["json_schema"], (dict, bool, str)):
        raise RowError("json_schema must be a JSON Schema: an object (or its JSON text)")
    for name in ("regex", "grammar"):
        if name in out and not isinstance(out[name], str):
            raise RowError(f"{name} must be a string")
    if not isinstance(out.get("json_object", False), bool):
        raise RowError("json_object must be true or false")
    return out


def _logit_bias(bias: Any) -> dict[int, Any]:
    """{"token id": bias} (JSON's keys are strings, as in OpenAI's logit_bias) as {id: bias}."""
    if not isinstance(bias, dict):
        raise RowError("logit_bias must be an object mapping token ids to numbers, e.g. {\"50256\": -100}")
    out = {}
    for k, v in bias.items():
        try:
            out[int(k)] = v
        except ValueError:
            raise RowError(f"logit_bias keys must be token ids, got {k!r}") from None
    return out


def top_logprobs_field(steps) -> list[list[dict[str, Any]]]:
    """An output row's `top_logprobs`: per output token, its candidates as {token_id, token,
    logprob} objects, most likely first. `steps` holds (token_id, logprob, token) triples."""
    return [[{"token_id": t, "token": s, "logprob": lp} for t, lp, s in step] for step in steps]

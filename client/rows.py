"""The JSON Lines rows that `jamba generate|score|classify`, `jamba client ...` and batch jobs
read: their shape, checked here once for all of them (cluster/batch/rows.py builds on this with
the model's tokenizer; client/cli.py with the protos).

A row is a JSON object. It names its input with exactly one of `prompt`/`text` (a string),
`input_ids` (token ids) or `messages` (chat, rendered with the checkpoint's chat template), and
for generate may carry sampling parameters (SAMPLING_FIELDS). The output row is the input row
plus the result fields. Every problem raises `RowError` with a message that names the field.
What needs the model (token ids in range, the chat template, the context) is checked by whoever
runs it.
"""

from __future__ import annotations

import json
from typing import Any

INPUT_FIELDS = ("prompt", "text", "input_ids", "messages")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "logprobs")


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
    integers (input_ids) or a non-empty list (messages)."""
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
    return field, value


def row_sampling(row: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields the row gives (a null is an absent field)."""
    return {k: row[k] for k in SAMPLING_FIELDS if row.get(k) is not None}

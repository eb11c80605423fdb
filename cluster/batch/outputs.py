"""A batch job's output tables: one Parquet schema per task, so that every part of a job reads as
one table (`pyarrow.parquet.read_table(OUT/data)`, `ray.data.read_parquet(OUT/data)`).

    data parts     id, source_file, source_row, the inputs, the result fields (fields outside the
                   row contract are kept as JSON text in one `extra` column; `messages`, `logit_bias`
                   and `json_schema` are JSON text too)
    errors parts   id, source_file, source_row, error (the reason), input (the raw row)

An OpenAI batch job's data parts hold id (the custom_id), source_file, source_row, custom_id,
status_code and output (the output line, JSON text): see openai_batch.py.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from .inputs import json_default

_BASE = [("id", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
         ("prompt", pa.string()), ("text", pa.string()), ("input_ids", pa.list_(pa.int64())), ("messages", pa.string())]
# The row's sampling fields (client/rows.py); logit_bias and json_schema as JSON text.
_SAMPLING = [("max_new_tokens", pa.int64()), ("temperature", pa.float64()), ("top_k", pa.int64()), ("top_p", pa.float64()),
             ("seed", pa.int64()), ("stop", pa.list_(pa.string())), ("stop_token_ids", pa.list_(pa.int64())),
             ("ignore_eos", pa.bool_()), ("logit_bias", pa.string()), ("min_tokens", pa.int64()),
             ("repetition_penalty", pa.float64()), ("frequency_penalty", pa.float64()), ("presence_penalty", pa.float64()),
             ("json_schema", pa.string()), ("json_object", pa.bool_()), ("regex", pa.string()), ("grammar", pa.string())]
_FLOATS = ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_TOP_LOGPROB = pa.struct([("token_id", pa.int64()), ("token", pa.string()), ("logprob", pa.float64())])
_RESULTS = {
    "score": [("token_logprobs", pa.list_(pa.float64())), ("sum_logprob", pa.float64())],
    "classify": [("logits", pa.list_(pa.float64())), ("probs", pa.list_(pa.float64())), ("label", pa.string())],
    "generate": [("output_ids", pa.list_(pa.int64())), ("finish_reason", pa.string()), ("logprobs", pa.list_(pa.float64())),
                 ("top_logprobs", pa.list_(pa.list_(_TOP_LOGPROB)))],
}
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
                          ("error", pa.string()), ("input", pa.string())])


# An OpenAI batch job's parts (openai_batch.py): each request's custom_id, status code and output line.
_OPENAI = [("id", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()), ("custom_id", pa.string()),
           ("status_code", pa.int64()), ("output", pa.string())]


def output_schema(task: str) -> pa.Schema:
    if task == "openai":
        return pa.schema(_OPENAI + [("extra", pa.string())])
    return pa.schema(_BASE + (_SAMPLING if task == "generate" else []) + _RESULTS[task] + [("extra", pa.string())])


def row_id(row: Any, file: str, n: int) -> str:
    v = row.get("id") if isinstance(row, dict) else None
    if v is None:
        return f"{file}:{n}"
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=json_default)


def _utf8(s: str | None) -> str | None:
    """Arrow strings are UTF-8: a lone surrogate (JSON allows "\\ud800") becomes "?"."""
    if s is None:
        return None
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _cell(name: str, v: Any):
    if v is None:
        return None
    if isinstance(v, str):
        v = _utf8(v)
    if name in ("messages", "logit_bias") or (name == "json_schema" and not isinstance(v, str)):
        return _utf8(json.dumps(v, ensure_ascii=False, default=json_default))
    if name == "stop" and isinstance(v, str):
        return [v]
    if name in _FLOATS and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if name in ("logprobs", "top_logprobs") and not isinstance(v, list):
        return None  # the input's ask; the column holds the answer
    return v


def output_table(task: str, rows: list[dict], srcs: list[tuple[str, int]]) -> pa.Table:
    schema = output_schema(task)
    names = set(schema.names)
    cols: dict[str, list] = {n: [] for n in schema.names}
    for row, (file, n) in zip(rows, srcs):
        cols["id"].append(_utf8(row_id(row, file, n)))
        cols["source_file"].append(file)
        cols["source_row"].append(n)
        for name in schema.names[3:-1]:
            cols[name].append(_cell(name, row.get(name)))
        extra = {k: v for k, v in row.items() if k not in names}
        cols["extra"].append(_utf8(json.dumps(extra, ensure_ascii=False, default=json_default)) if extra else None)
    return pa.Table.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema)


def error_table(errors: list[tuple[str, str, int, str, str]]) -> pa.Table:
    errors = [tuple(_utf8(x) if isinstance(x, str) else x for x in e) for e in errors]
    cols = list(zip(*errors)) if errors else [[] for _ in ERROR_SCHEMA]
    return pa.Table.from_arrays([pa.array(list(c), f.type) for c, f in zip(cols, ERROR_SCHEMA)], schema=ERROR_SCHEMA)

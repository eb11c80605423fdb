"""The JSON Lines rows of `jamba generate|score|classify` and batch jobs, on an engine: a row's
shape is checked by client/rows.py (the contract `jamba client` shares), its input becomes a
checked request through the engine's intake, and its result becomes the output row: the input
row plus the result fields.

    generate   output_ids, text, finish_reason (stop or length), logprobs and top_logprobs if asked
    score      token_logprobs (null for the first token), sum_logprob
    classify   logits, probs, label (the config's id2label)

A bad row gets {"line": N, "error": "..."} instead; the other rows of its chunk still run.
"""

from __future__ import annotations

import json
import math
from typing import Any

from client.rows import RowError, parse_line, row_input, row_sampling, top_logprobs_field
from cluster.runtime.engine import SyncEngine
from cluster.runtime.intake import ClassifyRequest, GenerateRequest, Intake, IntakeError, ScoreRequest
from stages.config import JambaConfig
from stages.sequence import GenerationResult, SamplingParams, Structure, label_probs

TASKS = ("score", "classify", "generate")
DEFAULT_MAX_NEW_TOKENS = 16


def check_task(task: str, config: JambaConfig, model_dir) -> None:
    """The checkpoint's head can do `task`, or a ValueError saying which checkpoint it needs."""
    if task == "classify" and not config.is_classifier:
        raise ValueError(f"{model_dir} is a causal LM ({config.architectures}); classify needs a "
                         "JambaForSequenceClassification checkpoint")
    if task != "classify" and config.is_classifier:
        raise ValueError(f"{model_dir} is a sequence classifier; {task} needs a JambaForCausalLM checkpoint")


# A row's structure fields (client/rows.py: STRUCTURE_FIELDS) and the Structure kind each one is.
STRUCTURE_KINDS = {"json_schema": "json_schema", "json_object": "json_object", "regex": "regex", "grammar": "lark"}


def sampling_params(row: dict[str, Any]) -> SamplingParams:
    """The row's sampling fields (JSON's types: integers for floats, a schema as an object); the
    intake checks them."""
    kwargs = row_sampling(row)
    for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        if isinstance(kwargs.get(name), int) and not isinstance(kwargs[name], bool):
            kwargs[name] = float(kwargs[name])
    for name in ("logprobs", "ignore_eos"):
        if name in kwargs and not isinstance(kwargs[name], bool):
            raise RowError(f"{name} must be true or false")
    kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    structures = {k: kwargs.pop(k) for k in STRUCTURE_KINDS if k in kwargs}
    for name, value in structures.items():
        if value is not False:
            spec = "" if name == "json_object" else value if isinstance(value, str) else json.dumps(value)
            kwargs["structure"] = Structure(STRUCTURE_KINDS[name], spec)
    return SamplingParams(**kwargs)


def request(row: dict[str, Any], task: str, intake: Intake) -> GenerateRequest | ScoreRequest | ClassifyRequest:
    """The row as a checked request for the engine."""
    field, value = row_input(row, task)
    if field in ("prompt", "text"):
        ids = intake.text(value, field)
    elif field == "messages":
        ids = intake.chat(value, field)
    else:
        ids = intake.token_ids(value, field)
    if task == "generate":
        return intake.generation(ids, sampling_params(row), field, names={"structure": _structure_field(row)})
    return intake.scoring(ids, field) if task == "score" else intake.classification(ids, field)


def _structure_field(row: dict[str, Any]) -> str:
    """The row's name for its structure, which an error about it names."""
    return next((k for k in STRUCTURE_KINDS if row.get(k) not in (None, False)), "structure")


# ---- output rows ------------------------------------------------------------------------------
def generation_row(row: dict[str, Any], res: GenerationResult, tokenizer) -> dict[str, Any]:
    out = dict(row, output_ids=res.output_ids, text=res.text, finish_reason=res.finish_reason)
    if res.logprobs is not None:
        out["logprobs"] = res.logprobs
    if res.top_logprobs is not None:
        out["top_logprobs"] = top_logprobs_field(
            [[(t, lp, tokenizer.decode([t], skip_special_tokens=False) if tokenizer else "") for t, lp in step]
             for step in res.top_logprobs])
    return out


def score_row(row: dict[str, Any], token_logprobs: list[float | None]) -> dict[str, Any]:
    return dict(row, token_logprobs=token_logprobs, sum_logprob=math.fsum(x for x in token_logprobs if x is not None))


def classify_row(row: dict[str, Any], logits: list[float], id2label: dict[int, str]) -> dict[str, Any]:
    probs, label = label_probs(logits, id2label)
    return dict(row, logits=logits, probs=probs, label=label)


def run_chunk(runner: SyncEngine, task: str, chunk: list[tuple[int, str]]) -> tuple[list[dict[str, Any]], int]:
    """Parse and run one chunk of (line number, line); returns one output row per line, and the
    tokens processed."""
    results: list[dict[str, Any] | None] = [None] * len(chunk)
    todo = []  # (index, row, request)
    for k, (lineno, line) in enumerate(chunk):
        try:
            row = parse_line(line)
            todo.append((k, row, request(row, task, runner.intake)))
        except (RowError, IntakeError) as e:
            results[k] = {"line": lineno, "error": str(e)}
    n_tok = 0
    outs = runner.run([r for _, _, r in todo]) if todo else []
    for (k, row, req), out in zip(todo, outs):
        n_tok += len(req.prompt)
        if task == "generate":
            results[k] = generation_row(row, out, runner.tokenizer)
            n_tok += len(out.output_ids)
        elif task == "score":
            results[k] = score_row(row, out)
        else:
            results[k] = classify_row(row, out, runner.config.id2label)
    return results, n_tok

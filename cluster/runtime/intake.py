"""The one way into the engine: prompts become token ids, and requests are checked here, once.

Every front end (the gRPC and OpenAI APIs, the JSON Lines rows of the command line and batch
jobs, the Python API) turns its own wire format into calls of an `Intake`: text and chat through
the checkpoint's tokenizer and chat template, token ids against the vocabulary, sampling
parameters, and the room the request needs against the context. What comes out is a request the
scheduler trusts (`GenerateRequest`, `ScoreRequest`, `ClassifyRequest`); nothing after this
checks it again. A problem is an `IntakeError` whose `field` names what is wrong as the caller
wrote it (`prompts[2].token_ids`, `max_tokens`, `messages`), which each front end reports in its
own way (INVALID_ARGUMENT, HTTP 400 with `param`, a row's error).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from stages.config import JambaConfig
from stages.grammar import Closers, GrammarError, Grammars, Matcher
from stages.sequence import JSON_KINDS, SamplingParams, pooling_position
from stages.tokenizer import ChatTemplateError


class IntakeError(ValueError):
    """A request the engine cannot take; `field` names the offending part."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerateRequest:
    prompt: list[int]
    params: SamplingParams
    grammar: Matcher | None = None  # params.structure, compiled (at its start; the scheduler copies it)
    closers: Closers | None = None  # a JSON structure's closing tokens (stages/grammar.py)


@dataclass(frozen=True)
class ScoreRequest:
    prompt: list[int]


@dataclass(frozen=True)
class ClassifyRequest:
    prompt: list[int]
    pool: int  # the position whose logits are pooled (the last one that is not padding)


class Intake:
    def __init__(self, config: JambaConfig, tokenizer, max_seq_len: int) -> None:
        self.config, self.tokenizer, self.max_seq_len = config, tokenizer, max_seq_len
        self._grammars: Grammars | None = None

    # ---- prompts to token ids ---------------------------------------------------------------
    def text(self, text: str, field: str = "prompt") -> list[int]:
        """A text prompt, encoded with the tokenizer's special tokens (BOS), as transformers does."""
        if not text:
            raise IntakeError(field, f"{field} is empty")
        return self.token_ids(self._tokenizer(field).encode(text), field)

    def chat(self, messages: list[dict], field: str = "messages", tools: list[dict] | None = None) -> list[int]:
        """A conversation, rendered with the checkpoint's chat template; `tools` (OpenAI's function
        definitions) reach the template as its `tools` variable."""
        if not messages:
            raise IntakeError(field, f"{field} is empty")
        try:
            ids = self._tokenizer(field).encode_chat(messages, **({"tools": tools} if tools else {}))
        except ChatTemplateError as e:
            raise IntakeError(field, f"{field}: the chat template failed: {e}") from None
        except ValueError as e:
            raise IntakeError(field, f"{field}: {e}") from None
        return self.token_ids(ids, field)

    def token_ids(self, ids: list[int], field: str = "prompt") -> list[int]:
        if not ids:
            raise IntakeError(field, f"{field} is empty")
        vocab = self.config.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
        if bad:
            raise IntakeError(field, f"{field} has ids out of range [0, {vocab}): {bad[:5]}")
        return list(ids)

    def _tokenizer(self, field: str):
        if self.tokenizer is None:
            raise IntakeError(field, f"{field} needs a tokenizer, and the model has none (no tokenizer.json); "
                                     "send token ids")
        return self.tokenizer

    # ---- requests ---------------------------------------------------------------------------
    def sampling(self, params: SamplingParams, prefix: str = "", names: dict[str, str] | None = None) -> SamplingParams:
        """`params`, checked. An error names the field as `prefix` + the caller's name for it
        (`names` maps SamplingParams' names to the caller's, e.g. max_new_tokens -> max_tokens)."""
        try:
            params.validate(self.config.vocab_size)
        except ValueError as e:
            ours, _, rest = str(e).partition(" ")
            field = prefix + (names or {}).get(ours, ours)
            raise IntakeError(field, f"{field} {rest}") from None
        return params

    def generation(self, ids: list[int], params: SamplingParams, field: str = "prompt",
                   max_field: str = "max_new_tokens", prefix: str = "",
                   names: dict[str, str] | None = None) -> GenerateRequest:
        """A generation of `params.max_new_tokens` tokens after the prompt `ids` (already token
        ids: `text`, `chat` or `token_ids` made them). `max_field` is the caller's name for max_new_tokens."""
        ids = self.token_ids(ids, field)
        names = {"max_new_tokens": max_field.removeprefix(prefix), **(names or {})}
        params = self.sampling(params, prefix, names)
        n, limit = len(ids), self.max_seq_len
        if n >= limit:
            raise IntakeError(field, f"{field} has {n} tokens, " + ("more than" if n > limit else "all of")
                              + f" the context of {limit}: no room for new tokens")
        if n + params.max_new_tokens > limit:
            raise IntakeError(max_field, f"{field} has {n} tokens and {max_field} is {params.max_new_tokens}, "
                                         f"more than the context of {limit}")
        grammar = self._grammar(params, prefix, names)
        closers = self.grammars.closers if grammar is not None and params.structure.kind in JSON_KINDS else None
        return GenerateRequest(ids, params, grammar, closers)

    async def generation_async(self, ids: list[int], params: SamplingParams, field: str = "prompt",
                               max_field: str = "max_new_tokens", prefix: str = "",
                               names: dict[str, str] | None = None) -> GenerateRequest:
        """`generation`, for a caller on an event loop: a structure compiled for the first time
        is compiled in a thread, so a large schema holds up no other request."""
        if params.structure is not None and self.tokenizer is not None and not self.grammars.cached(params.structure):
            return await asyncio.to_thread(self.generation, ids, params, field, max_field, prefix, names)
        return self.generation(ids, params, field, max_field, prefix, names)

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            self._grammars = Grammars(self._tokenizer("structure").to_json(), self.config.vocab_size,
                                      self.config.eos_token_ids)
        return self._grammars

    def _grammar(self, params: SamplingParams, prefix: str, names: dict[str, str]) -> Matcher | None:
        if params.structure is None:
            return None
        field = prefix + names.get("structure", "structure")
        if self.tokenizer is None:
            raise IntakeError(field, f"{field} needs a tokenizer, and the model has none (no tokenizer.json)")
        try:
            return self.grammars.matcher(params.structure)
        except GrammarError as e:
            raise IntakeError(field, f"{field}: {e}") from None

    def scoring(self, ids: list[int], field: str = "prompt") -> ScoreRequest:
        return ScoreRequest(self._fits(self.token_ids(ids, field), field))

    def classification(self, ids: list[int], field: str = "prompt") -> ClassifyRequest:
        if not self.config.is_classifier:
            raise IntakeError(None, "this checkpoint has no sequence-classification head")
        ids = self._fits(self.token_ids(ids, field), field)
        return ClassifyRequest(ids, pooling_position(ids, self.config.pad_token_id))

    def _fits(self, ids: list[int], field: str) -> list[int]:
        if len(ids) > self.max_seq_len:
            raise IntakeError(field, f"{field} has {len(ids)} tokens, more than the context of {self.max_seq_len}")
        return ids

"""Constrained decoding: a request's `Structure` (stages/sequence.py) compiled to a token matcher.

The matcher is llguidance's `LLMatcher`. It lives beside the scheduler's record of the sequence
(cluster/runtime/scheduler.py): before each of the row's tokens is drawn, the scheduler asks it
for the bitmask of the tokens the grammar allows next (one bit per vocabulary id, vocab/32
little-endian 32-bit words), the microbatch header carries that mask to the last stage, which
sets every other logit to -inf before sampling (stages/sampling.py), and the token that comes
back advances the matcher. EOS is in the mask only where the grammar accepts, so a constrained
row cannot end early; once the grammar is complete (`is_stopped`) the row ends.

Replay after a stage failure or a preemption needs nothing here: the matcher has consumed exactly
the sequence's output tokens, which is what the replay feeds the stages again.

Why llguidance rather than xgrammar (bench/structured.py measures both where both are
installed): llguidance has no dependencies (xgrammar needs torch and transformers at run time,
and transformers is only our test reference), computes a mask in ~15-50 us at a 65,536-token
vocabulary, compiles JSON schemas lazily (a schema costs well under a millisecond up front),
and covers JSON Schema (enums, numeric ranges, min/max items, additionalProperties, $ref, ...),
regular expressions and Lark grammars that embed JSON schemas (`%json {...}`), which is what
tool calling needs.

Compiling is cached by structure (an LRU of ready matchers, copied per request). A first
compile can take long for a large schema, so front ends on an event loop compile in a thread
(cluster/runtime/intake.py: `Intake.generation_async`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from .sequence import Structure


MAX_DEPTH = 64  # JSON schema nesting


def _depth(value, limit: int = MAX_DEPTH + 1) -> int:
    """How deep `value` nests (counting stops past `limit`: no recursion on hostile input)."""
    depth, level = 0, [value]
    while level and depth < limit:
        depth += 1
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())
                 if isinstance(v, (dict, list))]
    return depth


class GrammarError(ValueError):
    """The structure does not compile: not JSON Schema, a bad regex, a Lark syntax error, ..."""


class Matcher(Protocol):
    """What the scheduler needs of a grammar's state (llguidance's LLMatcher)."""

    def compute_bitmask(self) -> bytes: ...
    def consume_token(self, token: int) -> bool: ...
    def is_stopped(self) -> bool: ...
    def is_accepting(self) -> bool: ...
    def is_error(self) -> bool: ...
    def get_error(self) -> str: ...
    def deep_copy(self) -> "Matcher": ...


def grammar_text(structure: Structure) -> str:
    """The structure as an llguidance grammar (its JSON form). Raises GrammarError on a spec
    that is not even well-formed (a JSON schema that is not JSON)."""
    import llguidance

    kind, spec = structure.kind, structure.spec
    if kind in ("json_schema", "json_object"):
        if kind == "json_object":
            schema = {"type": "object"}
        else:
            try:
                schema = json.loads(spec)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not JSON: {e}") from None
            except RecursionError:
                raise GrammarError(f"the JSON schema is nested more than {MAX_DEPTH} levels deep") from None
            if not isinstance(schema, (dict, bool)):
                raise GrammarError(f"a JSON schema is an object or a boolean, not {type(schema).__name__}")
        if _depth(schema) > MAX_DEPTH:
            raise GrammarError(f"the JSON schema is nested more than {MAX_DEPTH} levels deep")
        try:
            # Compact JSON (no whitespace between items): shorter outputs, and nothing for a small model to ramble in.
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"})
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid: {e}") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec)
    raise GrammarError(f"unknown structure kind {kind!r}")


class Grammars:
    """Compiles structures for one tokenizer and vocabulary; thread-safe, cached."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int], cache_size: int = 256) -> None:
        self._tokenizer_json, self.vocab_size, self.eos_ids = tokenizer_json, vocab_size, list(eos_ids)
        self._tokenizer = None
        self._closers: Closers | None = None
        self._cache: OrderedDict[Structure, Matcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _lltokenizer(self):
        import llguidance

        if self._tokenizer is None:  # ~10 ms for a small vocabulary, ~1 s for a large one: once
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                     eos_token=self.eos_ids)
        return self._tokenizer

    @property
    def closers(self) -> "Closers":
        """This vocabulary's JSON closing tokens (Closers), found once."""
        if self._closers is None:
            tok = self._lltokenizer()
            texts = {i: tok.decode_bytes([i]) for i in range(self.vocab_size) if not tok.is_special_token(i)}
            self._closers = Closers(
                quotes=tuple(i for i, t in texts.items() if t.startswith(b'"') and not t.strip(b'"]}')
                             and t.count(b'"') == 1),
                brackets=tuple(i for i, t in texts.items() if t and not t.strip(b"]}")),
                letters=tuple(i for i, t in texts.items() if t in (b"a", b"e", b"s", b"t")))
        return self._closers

    def cached(self, structure: Structure) -> bool:
        with self._lock:
            return structure in self._cache

    def matcher(self, structure: Structure) -> Matcher:
        """A fresh matcher for `structure` at its start. Raises GrammarError naming the problem."""
        with self._lock:
            ready = self._cache.get(structure)
            if ready is not None:
                self._cache.move_to_end(structure)
                return ready.deep_copy()
        ready = self._compile(structure)  # outside the lock: a slow compile holds up no one else
        with self._lock:
            self._cache[structure] = ready
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return ready.deep_copy()

    def _compile(self, structure: Structure) -> Matcher:
        import llguidance

        text = grammar_text(structure)
        matcher = llguidance.LLMatcher(self._lltokenizer(), text, log_level=0)
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        matcher.compute_bitmask()  # the first mask builds the lexer: fail now on a grammar too big to serve
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        return matcher


@dataclass(frozen=True)
class Closers:
    """The tokens that finish a JSON document: `quotes` end a string (`"`, `"}`, `"]}`, ...),
    `brackets` close arrays and objects (`]`, `}`, `}]`, ...); `letters` (plain "a", "e", ...) are
    allowed only inside a string, which is how a mask tells where the row is.

    A JSON-constrained row near the end of its token budget gets `bias(mask)`: the closers for
    where it is (inside a string: the quotes; outside: the brackets), by WRAP_UP_BIAS. The mask
    still comes first (stages/sampling.py), so a closer the grammar does not allow stays out: the
    row finishes with a document that parses (required keys are still written, empty strings
    close at once) instead of being cut mid-string at max_new_tokens."""

    quotes: tuple[int, ...]
    brackets: tuple[int, ...]
    letters: tuple[int, ...]

    WRAP_UP_BIAS = 1000.0

    @staticmethod
    def window(max_new_tokens: int) -> int:
        """The last tokens of a row's budget where it is steered to finish: a quarter, 16 to 64
        (room for a few keys of an unfinished object; longer would cut well-behaved rows short)."""
        return min(64, max(16, max_new_tokens // 4))

    def bias(self, mask: bytes) -> dict[int, float]:
        def allowed(t: int) -> bool:  # bit t % 32 of little-endian int32 word t // 32 is byte t // 8's bit t % 8
            return t >> 3 < len(mask) and mask[t >> 3] >> (t & 7) & 1 == 1

        inside = any(allowed(t) for t in self.letters)
        return dict.fromkeys(self.quotes if inside else self.brackets, self.WRAP_UP_BIAS)


class Masks:
    """The next-token bitmasks of many matchers at once, computed in parallel by llguidance's
    thread pool (the GIL is dropped while it works): what the scheduler calls for a microbatch."""

    def __init__(self, threads: int | None = None) -> None:
        self._threads = threads
        self._executor = None
        self._words = 0  # int32 words per mask, learned from the first one

    def __call__(self, matchers: list[Matcher]) -> list[bytes]:
        import llguidance
        import numpy as np

        if not self._words or len(matchers) == 1:
            first = matchers[0].compute_bitmask()
            self._words = len(first) // 4
            if len(matchers) == 1:
                return [first]
            rest = self(matchers[1:])
            return [first, *rest]
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self._threads)
        pairs = [(m, i) for i, m in enumerate(matchers)]
        out = np.empty((len(matchers), self._words), dtype=np.int32)
        try:
            self._executor.unsafe_compute_mask_ptr(pairs, out.ctypes.data, self._words * 4, len(matchers))
        except ValueError:  # compute_bitmask's masks have a spare word the executor's do not take
            self._words -= 1
            out = np.empty((len(matchers), self._words), dtype=np.int32)
            self._executor.unsafe_compute_mask_ptr(pairs, out.ctypes.data, self._words * 4, len(matchers))
        return [row.tobytes() for row in out]


def _first_line(message: str) -> str:
    if message.startswith("NoExtension"):
        return "the grammar matches no text at all"
    if message.startswith("panic"):
        return "the grammar is too large or too complex to serve"
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:500] or "the grammar does not compile"

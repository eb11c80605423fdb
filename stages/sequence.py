"""What a request is, apart from the model: its sampling parameters, its progress through
generation and its stop rules, and its result. No torch here: the scheduler's process (a Serve
replica) needs these and nothing that computes.

`SequenceState` is the scheduler's record of a generation (cluster/runtime/scheduler.py);
`GenerationResult` is its result, the last event of a stream. Sampling itself happens on the
last stage (stages/sampling.py), from the parameters the microbatch header carries.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .microbatch import Sampling


STRUCTURE_KINDS = ("json_schema", "json_object", "regex", "lark")
JSON_KINDS = ("json_schema", "json_object")


@dataclass(frozen=True)
class Structure:
    """Output constrained to a grammar (stages/grammar.py compiles it): `kind` is one of
    STRUCTURE_KINDS and `spec` its text: a JSON Schema (as JSON text), a regular expression, a
    Lark grammar (llguidance's dialect, which may embed `%json {schema}`); "" for json_object."""

    kind: str
    spec: str = ""

    MAX_SPEC = 1 << 20  # characters


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (output text is cut before them)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False  # return log p(token) of each sampled token
    ignore_eos: bool = False
    # The logits processors, applied on the last stage in this order before temperature, top-k and
    # top-p (stages/sampling.py), as vLLM does. Penalties look at the row's own tokens only.
    top_logprobs: int = 0  # also return the this-many most likely tokens at each step (0..MAX_TOP_LOGPROBS)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    min_tokens: int = 0  # EOS and stop_token_ids cannot be drawn before this many tokens
    repetition_penalty: float = 1.0  # transformers': divide positive logits of seen tokens (prompt + output), multiply negative
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the output, in [-2, 2]
    presence_penalty: float = 0.0  # OpenAI's: minus this if the token is in the output, in [-2, 2]
    structure: Structure | None = None  # constrained decoding: the output must match this grammar

    MAX_STOP = 64
    MAX_STOP_LEN = 512
    MAX_TOP_LOGPROBS = 20
    MAX_LOGIT_BIAS = 1024

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the offending field."""

        def bad(name: str, why: str, value: object) -> None:
            raise ValueError(f"{name} {why} (got {value!r})")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be a positive integer", self.max_new_tokens)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
            bad("temperature", "must be a finite number >= 0", t)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0", self.top_k)
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1:
            bad("top_p", "must be in (0, 1]", p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            bad("seed", "must be an integer in [0, 2**63)", self.seed)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a list of non-empty strings", self.stop)
        if len(self.stop) > self.MAX_STOP or any(len(s) > self.MAX_STOP_LEN for s in self.stop):
            bad("stop", f"allows at most {self.MAX_STOP} strings of at most {self.MAX_STOP_LEN} characters", f"{len(self.stop)} strings")
        ids = self.stop_token_ids
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            bad("stop_token_ids", "must be a list of integers", ids)
        if len(ids) > 1024:
            bad("stop_token_ids", "allows at most 1024 ids", f"{len(ids)} ids")
        if any(not 0 <= i < vocab_size for i in ids):
            bad("stop_token_ids", f"must be token ids in [0, {vocab_size})", [i for i in ids if not 0 <= i < vocab_size][:5])
        n = self.top_logprobs
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be an integer in [0, {self.MAX_TOP_LOGPROBS}]", n)
        bias = self.logit_bias
        if not isinstance(bias, dict) or len(bias) > self.MAX_LOGIT_BIAS:
            bad("logit_bias", f"must map at most {self.MAX_LOGIT_BIAS} token ids to numbers", type(bias).__name__
                if not isinstance(bias, dict) else f"{len(bias)} entries")
        for i, b in bias.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
                bad("logit_bias", f"keys must be token ids in [0, {vocab_size})", i)
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                bad("logit_bias", "values must be numbers in [-100, 100]", b)
        m = self.min_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= self.max_new_tokens:
            bad("min_tokens", "must be an integer in [0, max_new_tokens]", m)
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or not 0 < r <= 10:
            bad("repetition_penalty", "must be in (0, 10]", r)
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not -2 <= v <= 2:
                bad(name, "must be in [-2, 2]", v)
        st = self.structure
        if st is not None:
            if not isinstance(st, Structure) or st.kind not in STRUCTURE_KINDS:
                bad("structure", f"must be one of {', '.join(STRUCTURE_KINDS)}", getattr(st, "kind", st))
            if not isinstance(st.spec, str) or len(st.spec) > Structure.MAX_SPEC:
                bad("structure", f"must be text of at most {Structure.MAX_SPEC} characters",
                    f"{len(st.spec)} characters" if isinstance(st.spec, str) else type(st.spec).__name__)
            if st.kind != "json_object" and not st.spec:
                bad("structure", f"{st.kind} needs its text", st.spec)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def resolved_seed(self) -> int:
        """The request's seed: the given one, or a fresh random one for an unseeded request."""
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


@dataclass
class GenerationResult:
    output_ids: list[int]
    finish_reason: str  # "stop" (eos, stop id or stop string) or "length"
    text: str | None = None
    logprobs: list[float] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per output token: (id, logprob), most likely first


@dataclass
class SequenceState:
    """One generation request in flight: what has been fed to the model and what came out."""

    prompt: list[int]
    params: SamplingParams
    eos_ids: list[int]
    tokenizer: object | None = None
    grammar: object | None = None  # params.structure's matcher (stages/grammar.py: Matcher), its own copy
    closers: object | None = None  # a JSON structure's closing tokens (stages/grammar.py: Closers)
    slot: int = -1
    fed: int = 0  # tokens of prompt + output already in the cache
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    seed: int = 0
    counts: dict[int, int] = field(default_factory=dict)  # output token -> times drawn (penalties only)
    seen: set[int] = field(default_factory=set)  # prompt and output ids (repetition penalty only)

    def __post_init__(self) -> None:
        self.seed = self.params.resolved_seed()
        if self.params.repetition_penalty != 1:
            self.seen = set(self.prompt)

    @property
    def tokens(self) -> list[int]:
        """Everything the model must have seen; replaying these rebuilds the cache exactly."""
        return self.prompt + self.output_ids

    @property
    def pending(self) -> list[int]:
        """Tokens not yet in the cache (the prompt's remainder, or the last sampled token)."""
        return self.tokens[self.fed :]

    def banned(self) -> list[int] | None:
        """Ids the next token may not be: EOS and the stop ids, until min_tokens are out."""
        p = self.params
        if len(self.output_ids) >= p.min_tokens:
            return None
        return ([] if p.ignore_eos else list(self.eos_ids)) + list(p.stop_token_ids) or None

    def sampling(self) -> Sampling:
        """How the last stage draws the next token: the parameters, and what the logits
        processors need from the tokens so far (stages/sampling.py). The grammar's mask is
        left out: the scheduler computes a microbatch's masks together (stages/grammar.py:Masks)."""
        p, step = self.params, len(self.output_ids)
        if p.structure is None and not p.logit_bias and not p.min_tokens and not p.penalized and not p.top_logprobs:
            return Sampling(p.temperature, p.top_k, p.top_p, self.seed, step)
        penalized = p.penalized
        return Sampling(
            p.temperature, p.top_k, p.top_p, self.seed, step, p.top_logprobs,
            logit_bias=list(p.logit_bias.items()) or None,
            banned=self.banned(),
            penalties=(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) if penalized else None,
            seen=list(self.seen) if penalized and p.repetition_penalty != 1 else None,
            counts=list(self.counts.items()) if penalized and self.counts else None,
        )

    def masked(self, sampling: Sampling, mask: bytes) -> Sampling:
        """`sampling` with the grammar's mask for this step; in the last of a JSON row's budget,
        with the bias that steers it to finish too (stages/grammar.py: Closers)."""
        p, c = self.params, self.closers
        if c is None or p.max_new_tokens - len(self.output_ids) > c.window(p.max_new_tokens):
            return sampling._replace(mask=mask)
        bias = c.bias(mask)
        for t, b in p.logit_bias.items():
            bias[t] = bias.get(t, 0.0) + b
        return sampling._replace(mask=mask, logit_bias=list(bias.items()))

    def add_token(self, token: int, logprob: float, top: list[tuple[int, float]] | None = None) -> bool:
        """Record a sampled token; returns True when the sequence is finished."""
        self.output_ids.append(token)
        p = self.params
        if p.logprobs:
            self.logprobs.append(logprob)
        if p.top_logprobs:
            self.top_logprobs.append([tuple(t) for t in top or []])
        if p.frequency_penalty or p.presence_penalty:
            self.counts[token] = self.counts.get(token, 0) + 1
        if p.repetition_penalty != 1:
            self.seen.add(token)
        grammar_done = False
        if self.grammar is not None:
            # The mask let only allowed tokens through, so this succeeds; an error ends the row all the same.
            self.grammar.consume_token(token)
            grammar_done = self.grammar.is_stopped() or self.grammar.is_error()
        early = len(self.output_ids) < p.min_tokens
        if grammar_done or (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish_reason = "stop"
        elif p.stop and not early and self.tokenizer is not None and _find_stop(self.text_so_far(), p.stop) is not None:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def text_so_far(self) -> str:
        return self.tokenizer.decode(self.output_ids, skip_special_tokens=True)

    def result(self) -> GenerationResult:
        text = None
        if self.tokenizer is not None:
            text = self.text_so_far()
            cut = _find_stop(text, self.params.stop)
            if cut is not None:
                text = text[:cut]
        return GenerationResult(
            self.output_ids, self.finish_reason or "length", text,
            self.logprobs if self.params.logprobs else None, len(self.prompt),
            top_logprobs=self.top_logprobs if self.params.top_logprobs else None,
        )


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def pooling_position(ids: list[int], pad_token_id: int | None) -> int:
    """Rightmost token that is not padding (HF's rule, so a trailing pad id is skipped); 0 if all pad."""
    if pad_token_id is None:
        return len(ids) - 1
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_token_id:
            return i
    return 0


def label_probs(logits: list[float], id2label: dict[int, str]) -> tuple[list[float], str]:
    """A classifier's logits as probabilities (softmax), and the label of the most probable class."""
    m = max(logits)
    exp = [math.exp(x - m) for x in logits]
    total = sum(exp)
    probs = [e / total for e in exp]
    best = max(range(len(probs)), key=probs.__getitem__)
    return probs, id2label.get(best, str(best))

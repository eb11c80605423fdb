"""Constrained decoding and the logits processors in the engine (stages/grammar.py,
stages/sampling.py, the scheduler's rows): each processor against a plain or transformers
reference, structured outputs that always parse and validate, replay after preemption, and
hostile requests refused at the intake with the field named. The front ends' own tests
(OpenAI, gRPC, rows, batch) build on these."""

from __future__ import annotations

import asyncio
import json
import math
import re

import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pytest
import torch

from cluster.runtime.intake import Intake, IntakeError
from cluster.runtime.local import LocalRunner
from stages.grammar import Grammars
from stages.loading import load_stage
from stages.microbatch import Sampling
from stages.sampling import process_logits, sample
from stages.sequence import SamplingParams, Structure
from stages.tokenizer import Tokenizer

V = 300

# Schemas of the kinds applications send (objects with enums, integer ranges, nested arrays with
# min/max items, additionalProperties false), kept away from the model's training text.
SCHEMAS = [
    {"type": "object", "additionalProperties": False, "required": ["name", "age", "mood"],
     "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 18, "maximum": 99},
                    "mood": {"enum": ["calm", "curious", "grumpy"]}}},
    {"type": "object", "additionalProperties": False, "required": ["grid"],
     "properties": {"grid": {"type": "array", "minItems": 2, "maxItems": 3,
                             "items": {"type": "array", "minItems": 1, "maxItems": 2,
                                       "items": {"type": "integer", "minimum": -5, "maximum": 5}}}}},
    {"type": "object", "additionalProperties": False, "required": ["ok", "tags", "meta"],
     "properties": {"ok": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
                    "meta": {"type": "object", "additionalProperties": False, "required": ["score"],
                             "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}}}}},
]


@pytest.fixture(scope="module")
def lm(models):
    tok = Tokenizer.from_dir(models[0])
    return load_stage(models[0])[0], tok


def _params(**kw) -> Sampling:
    return Sampling(kw.pop("temperature", 0.0), 0, 1.0, 1, kw.pop("step", 0), **kw)


# ---- the processors, one by one, against references ----------------------------------------------
def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 3
    history = torch.randint(0, V, (40,), generator=g)
    for penalty in (0.7, 1.3, 2.0):
        want = RepetitionPenaltyLogitsProcessor(penalty)(history[None], logits[None].clone())[0]
        got = process_logits(logits.clone(), _params(penalties=(penalty, 0.0, 0.0), seen=sorted(set(history.tolist()))))
        assert torch.equal(got, want)


def test_min_tokens_matches_transformers():
    from transformers import MinNewTokensLengthLogitsProcessor

    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    prompt = [5, 6, 7]
    for produced in range(4):
        ids = torch.tensor([prompt + [9] * produced])
        want = MinNewTokensLengthLogitsProcessor(len(prompt), 3, eos_token_id=[2, 11])(ids, logits[None].clone())[0]
        p = SamplingParams(min_tokens=3, stop_token_ids=[11])
        from stages.sequence import SequenceState

        s = SequenceState(prompt, p, [2])
        s.output_ids = [9] * produced
        got = process_logits(logits.clone(), _params(banned=s.banned()))
        assert torch.equal(got, want), produced


def test_frequency_presence_and_logit_bias_match_the_formulas():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2))
    output = [3, 3, 3, 17, 42, 42]
    bias = {3: 1.5, 100: -100.0, 299: 7.25}
    counts = {t: output.count(t) for t in set(output)}
    got = process_logits(logits.clone(), _params(logit_bias=list(bias.items()), penalties=(1.0, 0.4, 0.9),
                                                  counts=list(counts.items())))
    want = logits.tolist()  # OpenAI's: logit + bias - count * frequency - (count > 0) * presence
    for t, b in bias.items():
        want[t] += b
    for t, c in counts.items():
        want[t] -= c * 0.4 + 0.9
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_grammar_mask_matches_llguidance_and_top_logprobs_are_the_most_likely(lm):
    _, tok = lm
    grammars = Grammars(tok.to_json(), tok.vocab_size, [tok.eos_token_id])
    matcher = grammars.matcher(Structure("regex", "(yes|no), [0-9]+"))
    mask = matcher.compute_bitmask()
    logits = torch.randn(2, tok.vocab_size, generator=torch.Generator().manual_seed(3))
    want = logits.numpy().copy()
    llguidance.numpy.apply_token_bitmask_inplace(want, np.frombuffer(mask, dtype=np.int32)[None].repeat(2, 0))
    got = process_logits(logits[0].clone(), _params(mask=mask))
    assert torch.equal(got, torch.from_numpy(want[0]))
    tokens, chosen, tops = sample(logits, [_params(mask=mask, top_logprobs=5), _params(mask=mask, temperature=1.0)])
    assert all(math.isfinite(want[0][t]) for t in tokens)  # only allowed tokens are drawn
    assert tokens[0] == int(np.argmax(want[0]))
    raw = torch.log_softmax(logits, -1)  # log-probs are the model's, before the processors
    assert chosen == pytest.approx([raw[b, t].item() for b, t in enumerate(tokens)], abs=1e-6)
    ranked = sorted(range(tok.vocab_size), key=lambda i: -raw[0, i].item())[:5]
    assert [t for t, _ in tops[0]] == ranked and tops[1] is None
    assert [lp for _, lp in tops[0]] == pytest.approx([raw[0, i].item() for i in ranked], abs=1e-6)


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    from stages.sampling import draw, token_generator

    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    counts = torch.zeros(5)
    for step in range(20000):
        counts[draw(probs, token_generator(3, step))] += 1
    assert counts[1] == counts[4] == 0
    assert (counts / 20000 - probs).abs().max() < 0.015  # ~4 standard deviations
    assert draw(probs, token_generator(9, 4)) == draw(probs, token_generator(9, 4))  # (seed, step) decide alone


# ---- through the engine ---------------------------------------------------------------------
def _structured(i: int, temperature: float, schema: dict, max_new_tokens: int = 160) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=i,
                          structure=Structure("json_schema", json.dumps(schema)))


def test_every_output_parses_and_validates(lm):
    """Greedy and sampled, every schema: the output is JSON that validates, and the row ended
    because the grammar was complete (never by EOS before it accepted)."""
    stage, tok = lm
    runner = LocalRunner(stage, tok, num_slots=6)
    try:
        prompts = [tok.encode(t) for t in ["Your fortune:", "A haiku about", "Q: What is a monad?\nA:"]]
        for schema in SCHEMAS:
            cases = [(p, _structured(i, t, schema)) for i, p in enumerate(prompts) for t in (0.0, 1.0)]
            for r in runner.generate([p for p, _ in cases], [sp for _, sp in cases]):
                assert r.finish_reason == "stop", r.text
                jsonschema.validate(json.loads(r.text), schema)
        other = [SamplingParams(max_new_tokens=40, structure=Structure("json_object"), temperature=0.9, seed=5),
                 SamplingParams(max_new_tokens=40, structure=Structure("regex", r"(yes|no), because [a-z ]{3,20}\."),
                                temperature=0.9, seed=6),
                 SamplingParams(max_new_tokens=60, structure=Structure("lark", 'start: "Answer: " %json {"type": "array", '
                                                                       '"items": {"type": "integer"}, "maxItems": 3}'))]
        obj, regex, lark = runner.generate([prompts[0]] * 3, other)
        # The toy model never closes a free-form key: json_object runs to max_new_tokens, every token
        # a step of a JSON object (a schema with bounded strings, above, always completes).
        check = Grammars(tok.to_json(), stage.config.vocab_size, stage.config.eos_token_ids).matcher(Structure("json_object"))
        assert obj.text.startswith("{") and check.consume_tokens(obj.output_ids) and not check.is_error()
        assert re.fullmatch(r"(yes|no), because [a-z ]{3,20}\.", regex.text), regex.text
        assert lark.text.startswith("Answer: ") and len(json.loads(lark.text.removeprefix("Answer: "))) <= 3
    finally:
        runner.close()


def test_json_rows_near_their_budget_are_steered_to_finish(lm):
    """Unbounded strings: the toy model wanders in them, but in the last quarter of its budget a
    JSON row closes what is open (the grammar still decides what may come), so every output
    parses and validates; and the bias goes to quotes inside a string, to brackets outside."""
    stage, tok = lm
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "city", "age", "kind", "tags"],
              "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}, "kind": {"enum": ["a", "b"]},
                             "tags": {"type": "array", "items": {"type": "string"}}}}
    runner = LocalRunner(stage, tok, num_slots=6)
    try:
        prompts = [tok.encode(t) for t in ["Your fortune:", "A haiku about", "User profile:"]]
        params = [_structured(i, t, schema, 200) for i in range(2) for t in (0.0, 1.0)]
        results = runner.generate([p for p in prompts for _ in params], params * len(prompts))
        closers = runner.intake.grammars.closers
    finally:
        runner.close()
    for r in results:
        jsonschema.validate(json.loads(r.text), schema)
    assert any(len(r.output_ids) > 200 - 50 for r in results)  # some did need the push
    grammars = Grammars(tok.to_json(), stage.config.vocab_size, stage.config.eos_token_ids)
    m = grammars.matcher(Structure("json_schema", json.dumps(schema)))
    assert m.consume_tokens(tok.encode('{"name":"Ada', add_special_tokens=False))
    inside = closers.bias(m.compute_bitmask())
    assert set(inside) == set(closers.quotes) and tok.decode(list(closers.quotes)).count('"') == len(closers.quotes)
    assert m.consume_tokens(tok.encode('","city":"x","age":3,"kind":"a","tags":["q"', add_special_tokens=False))
    assert set(closers.bias(m.compute_bitmask())) == set(closers.brackets)


def test_processors_replay_exactly_after_preemption(lm):
    """Constrained, penalized, biased and min_tokens rows, greedy and seeded: with blocks so scarce
    that requests are preempted and replayed, every row gives the undisturbed tokens."""
    stage, tok = lm
    prompts = [tok.encode(f"Stream {i} of the tests says") for i in range(4)]
    params = [SamplingParams(max_new_tokens=24, temperature=0.9, seed=1, repetition_penalty=1.3, frequency_penalty=0.5,
                             presence_penalty=0.4, top_logprobs=3, logprobs=True),
              _structured(2, 0.8, SCHEMAS[0], 60),
              SamplingParams(max_new_tokens=24, min_tokens=20, logit_bias={tok.encode(" the")[-1]: 3.0}),
              _structured(4, 0.0, SCHEMAS[1], 60)]
    options = dict(num_slots=4, max_batch_tokens=16, block_size=4)
    ample = LocalRunner(stage, tok, **options)
    scarce = LocalRunner(stage, tok, num_blocks=24, **options)
    try:
        want = ample.generate(prompts, params)
        got = scarce.generate(prompts, params)
        assert scarce.engine.scheduler.preemptions > 0
    finally:
        ample.close()
        scarce.close()
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids and g.finish_reason == w.finish_reason
    assert len(want[2].output_ids) >= 20
    assert len(want[0].top_logprobs) == len(want[0].output_ids) and all(len(t) == 3 for t in want[0].top_logprobs)
    assert [t[0][1] >= t[1][1] >= t[2][1] for t in want[0].top_logprobs] == [True] * len(want[0].top_logprobs)


def test_streams_carry_top_logprobs(lm):
    from cluster.runtime.local import LocalEngine
    from cluster.runtime.config import PipelineConfig

    stage, tok = lm

    async def run():
        engine = await LocalEngine.start(stage, tok, PipelineConfig("", num_slots=2))
        try:
            events = [ev async for ev in engine.generate(tok.encode("Hello"), SamplingParams(
                max_new_tokens=6, top_logprobs=2, logprobs=True, ignore_eos=True))]
        finally:
            await engine.close()
        return events

    *tokens, result = asyncio.run(run())
    assert [ev.top_logprobs for ev in tokens] == result.top_logprobs
    assert all(len(t) == 2 for t in result.top_logprobs)


# ---- hostile requests ---------------------------------------------------------------------------
@pytest.mark.parametrize("params, field, message", [
    (SamplingParams(structure=Structure("json_schema", '{"type": "frobnicate"}')), "response_format", "frobnicate"),
    (SamplingParams(structure=Structure("json_schema", "{not json")), "response_format", "not JSON"),
    (SamplingParams(structure=Structure("json_schema", '{"type": "object", "x": "' + "y" * (1 << 20) + '"}')),
     "response_format", "at most 1048576 characters"),
    (SamplingParams(structure=Structure("json_schema", '{"properties": {"a": ' * 100 + "{}" + "}}" * 100)),
     "response_format", "nested more than"),
    (SamplingParams(structure=Structure("regex", "a[")), "response_format", "regex"),
    (SamplingParams(structure=Structure("regex", "[^\\s\\S]")), "response_format", "matches no text"),
    (SamplingParams(structure=Structure("lark", "start: nowhere")), "response_format", "nowhere"),
    (SamplingParams(top_logprobs=1000), "top_logprobs", "[0, 20]"),
    (SamplingParams(logit_bias={10**6: 1.0}), "logit_bias", "token ids"),
    (SamplingParams(logit_bias={5: 1000.0}), "logit_bias", "[-100, 100]"),
    (SamplingParams(min_tokens=100, max_new_tokens=10), "min_tokens", "max_new_tokens"),
    (SamplingParams(presence_penalty=float("nan")), "presence_penalty", "[-2, 2]"),
    (SamplingParams(repetition_penalty=0), "repetition_penalty", "(0, 10]"),
])
def test_hostile_requests_are_refused_naming_the_field(lm, params, field, message):
    stage, tok = lm
    intake = Intake(stage.config, tok, 512)
    names = {"structure": "response_format"}
    with pytest.raises(IntakeError) as e:
        intake.generation(tok.encode("Hi"), params, names=names)
    assert e.value.field == field and message in str(e.value), str(e.value)
    with pytest.raises(IntakeError) as e:  # the event loop's path compiles in a thread, with the same answer
        asyncio.run(intake.generation_async(tok.encode("Hi"), params, names=names))
    assert e.value.field == field

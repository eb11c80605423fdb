"""Paged KV cache and prefix caching give the answers of a run without them.

Greedy tokens are identical and log-probabilities / logits agree to 1e-4 (fp32), with and
without the prefix cache, in the single-process runner and on every pipeline split, for
prompts that share nothing, part of a block, exactly one block or many blocks; with blocks
so scarce that running requests are preempted and replayed; and the cache is actually used
(cached_tokens, hit counters). Recovery with the cache on is in tests/test_recovery.py.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from cluster.runtime.config import PipelineConfig, resolve_paging
from cluster.runtime.local import LocalRunner
from cluster.runtime.pipeline import Pipeline
from stages.config import JambaConfig
from stages.loading import load_stage
from stages.sequence import SamplingParams

BS = 16  # small blocks: many boundaries in short prompts, so the CPU runs stay quick


def _prompts(block: int) -> list[list[int]]:
    """Prompts over a shared system prefix of 5.5 blocks, plus ones sharing less or nothing."""
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(3, 4096) for _ in range(n)]  # no pad (0), bos (1) or eos (2)

    system = ids(block * 5 + block // 2)
    return [
        system + ids(9),  # computes the prefix ...
        system + ids(7),  # ... these take 5 blocks of it from the cache
        system + ids(block),
        system[: block * 2],  # exactly two blocks long: one block hit (the last token must run)
        system[: block] + ids(block + 3),  # shares exactly one block
        system[: block // 2] + ids(block * 2),  # shares half a block: no hit
        ids(block * 3 + 1),  # shares nothing
        system + ids(9),  # an earlier prompt's twin
    ]


def _assert_same_generations(got, want):
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    for g, w in zip(got, want):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)


def _assert_same_scores(got, want):
    for g, w in zip(got, want):
        assert g[0] is None and w[0] is None
        assert g[1:] == pytest.approx(w[1:], abs=1e-4)


@pytest.fixture(scope="module")
def runners(models):
    lm, cls = models
    lm_stage, cls_stage = load_stage(lm)[0], load_stage(cls)[0]
    return {
        "lm": LocalRunner(lm_stage, prefix_cache=True, block_size=BS),
        "lm_plain": LocalRunner(lm_stage, prefix_cache=False),
        "cls": LocalRunner(cls_stage, prefix_cache=True, block_size=BS, max_batch_tokens=40),
        "cls_plain": LocalRunner(cls_stage, prefix_cache=False),
    }


def _params(n):
    return [SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=True) for _ in range(n)]


def test_runner_with_prefix_cache_matches_runner_without(runners):
    prompts = _prompts(BS)
    got = runners["lm"].generate(prompts, _params(len(prompts)))
    _assert_same_generations(got, runners["lm_plain"].generate(prompts, _params(len(prompts))))
    cached = [g.cached_tokens for g in got]
    # the first computes the prefix; later ones wait for it and take every full block short of their last token
    assert cached[0] == 0 and cached[1] == cached[2] == 5 * BS and cached[7] == 5 * BS
    assert cached[3] == BS and cached[4] == BS and cached[5] == 0 and cached[6] == 0
    _assert_same_scores(runners["lm"].score(prompts), runners["lm_plain"].score(prompts))
    for g, w in zip(runners["cls"].classify(prompts), runners["cls_plain"].classify(prompts)):
        assert g == pytest.approx(w, abs=1e-4)


def test_runner_at_the_default_block_size(runners, models):
    """64-token blocks, prompts chunked across block boundaries (budget 40)."""
    prompts = _prompts(64)
    runner = LocalRunner(runners["lm"].stage, max_batch_tokens=40)
    got = runner.generate(prompts, _params(len(prompts)))
    _assert_same_generations(got, runners["lm_plain"].generate(prompts, _params(len(prompts))))
    assert got[1].cached_tokens == 5 * 64


def test_paging_defaults_and_limits(models):
    config = JambaConfig.from_file(models[0])
    paged = resolve_paging(PipelineConfig(str(models[0]), num_slots=4), config)
    assert paged == {"max_seq_len": 4096, "block_size": 64, "num_blocks": 4 * 64, "num_snapshots": 8}
    assert resolve_paging(PipelineConfig(str(models[0]), num_blocks=10), config)["max_seq_len"] == 640
    with pytest.raises(ValueError, match="does not fit in the KV cache: 10 blocks of 64 tokens"):
        resolve_paging(PipelineConfig(str(models[0]), num_blocks=10, max_seq_len=1000), config)
    assert resolve_paging(PipelineConfig(str(models[0]), prefix_cache=False), config)["num_snapshots"] == 0


# ---- the pipeline -------------------------------------------------------------------------------
def _run(model, coro_fn, **cfg):
    async def main():
        pipe = await Pipeline.start(PipelineConfig(str(model), cpus_per_stage=0.25, block_size=BS, **cfg))
        try:
            return await coro_fn(pipe)
        finally:
            await pipe.close()
    return asyncio.run(main())


async def _generate_all(pipe, prompts):
    return await asyncio.gather(*[pipe.generate_full(p, sp) for p, sp in zip(prompts, _params(len(prompts)))])


@pytest.mark.parametrize("split", ["8", "3,5", "1,6,1"])
def test_pipeline_with_prefix_cache_matches_single_process(ray_cluster, models, runners, split):
    lm, cls = models
    prompts = _prompts(BS)
    stages = len(split.split(","))

    async def lm_calls(pipe):
        gens = await _generate_all(pipe, prompts)
        first = await pipe.generate_full(prompts[1], _params(1)[0])  # again, now that all is cached
        scores = await asyncio.gather(*[pipe.score(p) for p in prompts])
        return gens, first, scores, pipe.scheduler.stats()

    gens, again, scores, stats = _run(lm, lm_calls, num_stages=stages, layer_split=split, max_batch_tokens=40)
    _assert_same_generations(gens, runners["lm_plain"].generate(prompts, _params(len(prompts))))
    _assert_same_scores(scores, runners["lm_plain"].score(prompts))
    assert again.output_ids == gens[1].output_ids and again.cached_tokens == 5 * BS
    assert gens[1].cached_tokens == 5 * BS and gens[5].cached_tokens == 0
    assert stats["cache"]["hits"] >= 5 and stats["slots_in_use"] == 0 and stats["cache"]["used_blocks"] == 0

    async def cls_calls(pipe):
        return await asyncio.gather(*[pipe.classify(p) for p in prompts]), pipe.scheduler.stats()

    logits, stats = _run(cls, cls_calls, num_stages=stages, layer_split=split, max_batch_tokens=40)
    for g, w in zip(logits, runners["cls_plain"].classify(prompts)):
        assert g == pytest.approx(w, abs=1e-4)
    assert stats["cache"]["cached_tokens"] > 0


def test_scarce_blocks_preempt_and_replay_with_identical_output(ray_cluster, models, runners):
    """Blocks for a third of what the requests grow to: the pipeline admits what fits, preempts
    the youngest request when a running one needs a block, replays it later, and every output
    is what a run with room to spare gives."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 4096) for _ in range(20 + i)] for i in range(6)]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True, logprobs=True) for _ in prompts]

    async def calls(pipe):
        with pytest.raises(ValueError, match="more than the context of 128"):  # 8 blocks of 16
            await pipe.generate_full(prompts[0], SamplingParams(max_new_tokens=120))
        gens = await asyncio.gather(*[pipe.generate_full(p, sp) for p, sp in zip(prompts, params)])
        return gens, pipe.scheduler.stats()

    gens, stats = _run(models[0], calls, num_stages=2, layer_split="4,4", num_blocks=8, num_slots=6)
    _assert_same_generations(gens, runners["lm_plain"].generate(prompts, params))
    assert stats["preemptions"] > 0 and stats["cache"]["used_blocks"] == 0


def test_no_prefix_cache_switch(ray_cluster, models, runners):
    prompts = _prompts(BS)[:3]

    async def calls(pipe):
        return await _generate_all(pipe, prompts), pipe.scheduler.stats()

    gens, stats = _run(models[0], calls, num_stages=1, prefix_cache=False)
    _assert_same_generations(gens, runners["lm_plain"].generate(prompts, _params(3)))
    assert [g.cached_tokens for g in gens] == [0, 0, 0] and stats["cache"]["prefix_cache"] is False

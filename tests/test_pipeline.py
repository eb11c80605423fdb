"""The Ray pipeline gives the single-process results, under concurrency, with slot accounting."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.runtime.config import PipelineConfig
from cluster.runtime.pipeline import SyncPipeline
from cluster.runtime.scheduler import QueueFullError
from stages.sequence import GenerationResult, SamplingParams


def _pipe(model, **kw) -> SyncPipeline:
    kw.setdefault("cpus_per_stage", 0.25)  # 2 cores here: let 4 stages and Ray's own tasks share them
    return SyncPipeline(PipelineConfig(str(model), **kw))


TEXTS = ["The weather today is", "Cooking rice takes about twenty minutes if", "a", "Trains leave the station at noon"]


def _prompts(tok, n=len(TEXTS)):
    return [tok.encode(TEXTS[i % len(TEXTS)] + " x" * (i // len(TEXTS))) for i in range(n)]


@pytest.mark.parametrize("split", [
    [(0, 8)],
    [(0, 4), (4, 8)],
    [(0, 1), (1, 7), (7, 8)],  # uneven
    [(0, 2), (2, 4), (4, 6), (6, 8)],
])
def test_pipeline_equals_single_process(ray_cluster, models, reference, split):
    lm, cls = models
    ref_lm, ref_cls, tok = reference
    prompts = _prompts(tok)
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True) for _ in prompts]
    # a small token budget forces prompts through in several chunks
    pipe = _pipe(lm, num_stages=len(split), layer_split=split, max_batch_tokens=6)
    try:
        got = pipe.generate(prompts, params)
        want = ref_lm.generate(prompts, [SamplingParams(max_new_tokens=8, ignore_eos=True) for _ in prompts])
        assert [g.output_ids for g in got] == [w.output_ids for w in want]
        assert [g.text for g in got] == [w.text for w in want]
        for g, w in zip(pipe.score(prompts), ref_lm.score(prompts)):
            assert g[0] is None and w[0] is None
            assert g[1:] == pytest.approx(w[1:], abs=1e-4)
    finally:
        pipe.close()
    pipe = _pipe(cls, num_stages=len(split), layer_split=split, max_batch_tokens=6)
    try:
        for g, w in zip(pipe.classify(prompts), ref_cls.classify(prompts)):
            assert g == pytest.approx(w, abs=1e-4)
    finally:
        pipe.close()


def test_concurrent_mixed_requests_match_solo_runs(ray_cluster, models, reference):
    lm, _ = models
    ref_lm, _, tok = reference
    prompts = _prompts(tok, 24)
    def params(i):
        if i % 3 == 0:
            return SamplingParams(max_new_tokens=4 + i % 7, ignore_eos=True)
        return SamplingParams(max_new_tokens=4 + i % 5, temperature=0.7 + 0.1 * (i % 4), top_k=(i % 3) * 20,
                              top_p=0.9 if i % 2 else 1.0, seed=1000 + i, ignore_eos=True)
    pipe = _pipe(lm, num_stages=2, layer_split="3,5", num_slots=8, max_batch_tokens=32)
    try:
        got = pipe.generate(prompts, [params(i) for i in range(len(prompts))])
        again = pipe.generate(prompts, [params(i) for i in range(len(prompts))])
        assert [g.output_ids for g in got] == [a.output_ids for a in again]  # seeded sampling reproduces
        for i, (p, g) in enumerate(zip(prompts, got)):
            solo = ref_lm.generate([p], [params(i)])[0]  # same seed, same tokens, whatever the batch was
            assert g.output_ids == solo.output_ids, i
    finally:
        pipe.close()


def test_streaming_slots_queue_and_abort(ray_cluster, models, reference):
    lm, _ = models
    _, _, tok = reference
    pipe = _pipe(lm, num_stages=2, num_slots=2, max_queue=3, layer_split="4,4")
    sched = pipe.pipe.scheduler
    prompt = tok.encode("Streaming test")

    async def stream(n):
        deltas, final = [], None
        async for ev in pipe.pipe.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)):
            if isinstance(ev, GenerationResult):
                final = ev
            else:
                deltas.append(ev)
        return deltas, final

    async def exhaust():
        # 2 slots, queue of 3: five long requests fit (2 running, 3 waiting), the sixth is refused.
        gens = [pipe.pipe.generate(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True)) for _ in range(6)]
        firsts = [asyncio.ensure_future(g.__anext__()) for g in gens[:5]]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match=r"queue bound 3\); retry after \d+ ms") as refused:
            await gens[5].__anext__()
        assert 0.1 <= refused.value.retry_after <= 60
        await asyncio.sleep(0.2)
        stats = sched.stats()
        assert stats["slots_in_use"] == 2 and stats["waiting"] == 3
        for f in firsts:
            f.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for g in gens[:5]:
            await g.aclose()  # the client goes away: its request is aborted
        for _ in range(100):
            if sched.stats()["slots_in_use"] == 0 and sched.stats()["in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
        return sched.stats()

    async def many_aborts(n):
        for i in range(n):
            g = pipe.pipe.generate(prompt, SamplingParams(max_new_tokens=50, ignore_eos=True))
            await g.__anext__()
            await g.aclose()
        for _ in range(100):
            if sched.stats()["slots_in_use"] == 0 and sched.stats()["in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)

    async def slow_chunks(n):
        chunks = []
        async for chunk in pipe.pipe.generate_chunks(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)):
            chunks.append(chunk)
            await asyncio.sleep(0.2)  # a consumer that falls behind
        return chunks

    try:
        deltas, final = pipe._call(stream(12))
        assert len(deltas) == 12 and [d.token_id for d in deltas] == final.output_ids
        assert "".join(d.text for d in deltas) == final.text
        # A slow consumer gets the tokens that piled up in one chunk each time, not one per step.
        chunks = pipe._call(slow_chunks(12))
        events = [ev for c in chunks for ev in c]
        assert len(chunks) < len(events) and isinstance(events[-1], GenerationResult)
        assert [ev.token_id for ev in events[:-1]] == final.output_ids and events[-1].text == final.text
        stats = pipe._call(exhaust())
        assert stats["slots_in_use"] == 0 and stats["waiting"] == 0 and stats["active"] == 0
        pipe._call(many_aborts(30))
        assert sched.stats()["slots_in_use"] == 0
        infos = pipe._call(pipe.pipe.stage_stats())
        assert [i["used_slots"] for i in infos] == [0, 0]  # the stages freed them too
        # and the pipeline still serves, with the same answer as before
        assert pipe._call(stream(12))[1].output_ids == final.output_ids
    finally:
        pipe.close()


def test_a_thousand_cancellations_leak_nothing(ray_cluster, models, reference):
    """1,000 streams aborted at every point of their life (queued, admitted, mid-decode): no slot is
    left in use on the scheduler or any stage, and stage memory stays flat."""
    lm, _ = models
    _, _, tok = reference
    pipe = _pipe(lm, num_stages=2, layer_split="4,4", num_slots=8, max_queue=2000)
    sched = pipe.pipe.scheduler
    prompt = tok.encode("Cancel me please")

    async def churn(n):
        async def one(i):
            g = pipe.pipe.generate(prompt, SamplingParams(max_new_tokens=64, ignore_eos=True))
            if i % 3:  # the rest are dropped before their first token, some while still queued
                for _ in range(i % 4):
                    await g.__anext__()
            await g.aclose()
        for start in range(0, n, 50):
            await asyncio.gather(*[one(i) for i in range(start, start + 50)])

    async def settle():
        for _ in range(200):
            if sched.stats()["slots_in_use"] == 0 and sched.stats()["in_flight"] == 0:
                return
            await asyncio.sleep(0.05)

    try:
        pipe._call(churn(50))  # warm-up: allocator and caches reach their working size
        pipe._call(settle())
        before = [i["rss_bytes"] for i in pipe._call(pipe.pipe.stage_stats())]
        pipe._call(churn(1000))
        pipe._call(settle())
        pipe.score([prompt])  # one more microbatch carries the last frees to the stages
        stats = sched.stats()
        assert stats["slots_in_use"] == 0 and stats["waiting"] == 0 and stats["active"] == 0
        # The score's own slot is freed by a header-only microbatch sent after it returned,
        # which may still be on its way through the stages: wait for it.
        for _ in range(100):
            infos = pipe._call(pipe.pipe.stage_stats())
            if all(i["used_slots"] == 0 for i in infos):
                break
            time.sleep(0.05)
        assert [i["used_slots"] for i in infos] == [0, 0]
        growth = [(i["rss_bytes"] - b) / 2**20 for i, b in zip(infos, before)]
        assert max(growth) < 32, growth  # MiB
    finally:
        pipe.close()


def test_stop_strings_and_eos(ray_cluster, models, reference):
    lm, _ = models
    ref_lm, _, tok = reference
    prompt = tok.encode(TEXTS[0])
    free_run = ref_lm.generate([prompt], [SamplingParams(max_new_tokens=20, ignore_eos=True)])[0]
    stop = free_run.text[5:8]
    params = [SamplingParams(max_new_tokens=20, stop=[stop]), SamplingParams(max_new_tokens=20, stop_token_ids=[free_run.output_ids[3]])]
    pipe = _pipe(lm, num_stages=2, layer_split="4,4")
    try:
        got = pipe.generate([prompt, prompt], params)
        want = ref_lm.generate([prompt, prompt], params)
        assert [(g.output_ids, g.text, g.finish_reason) for g in got] == [(w.output_ids, w.text, w.finish_reason) for w in want]
        assert got[0].finish_reason == "stop" and stop not in got[0].text
        assert got[1].output_ids == free_run.output_ids[:4]
    finally:
        pipe.close()


def test_bad_requests_are_refused_with_a_reason(ray_cluster, models):
    lm, _ = models
    pipe = _pipe(lm, num_stages=1, max_seq_len=64)
    try:
        with pytest.raises(ValueError, match="out of range"):
            pipe.score([[1, 10_000]])
        with pytest.raises(ValueError, match="more than the context of 64"):
            pipe.generate([[1] * 60], [SamplingParams(max_new_tokens=10)])
        with pytest.raises(ValueError, match="temperature"):
            pipe.generate([[1, 2]], [SamplingParams(temperature=-1.0)])
        assert pipe.score([[1, 5, 6]])[0][0] is None  # still serving
    finally:
        pipe.close()


def test_actor_startup_reports_load(ray_cluster, models):
    lm, _ = models
    pipe = _pipe(lm, num_stages=2, layer_split=[(0, 3), (3, 8)])
    try:
        info = pipe.pipe.stage_info
        assert [i["layers"] for i in info] == [[0, 3], [3, 8]]
        assert all(i["bytes"] > 0 and i["seconds"] > 0 and i["threads"] == 1 for i in info)
        assert len({i["pid"] for i in info}) == 2
    finally:
        pipe.close()


def test_deadline_drops_the_request_and_frees_its_slot(ray_cluster, models, reference):
    import time

    from cluster.runtime.scheduler import DeadlineExceededError

    lm, _ = models
    _, _, tok = reference
    pipe = _pipe(lm, num_stages=2, layer_split="4,4")
    sched = pipe.pipe.scheduler

    async def run():
        got = []
        with pytest.raises(DeadlineExceededError):
            async for ev in pipe.pipe.generate(tok.encode("slow"), SamplingParams(max_new_tokens=3000, ignore_eos=True),
                                               deadline=time.time() + 3.0):
                got.append(ev)
        with pytest.raises(DeadlineExceededError):
            await pipe.pipe.score(tok.encode("late"), deadline=time.time() - 1)
        for _ in range(100):
            if sched.stats()["slots_in_use"] == 0 and sched.stats()["in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
        return got

    try:
        got = pipe._call(run())
        assert len(got) < 3000  # dropped long before max_new_tokens
        assert sched.stats()["slots_in_use"] == 0 and sched.stats()["active"] == 0
    finally:
        pipe.close()


def test_a_huge_prompt_does_not_stall_running_decodes(ray_cluster, models, reference):
    """A 1,500-token prompt arriving while a stream decodes is fed in chunks under the token
    budget, with the stream's decode row ahead of each chunk: the stream keeps getting tokens all
    through the long prefill instead of waiting for it (counted in events, not timed)."""
    lm, _ = models
    ref_lm, _, tok = reference
    pipe = _pipe(lm, num_stages=2, layer_split="4,4", max_batch_tokens=32)
    huge = [1] + [5 + i % 400 for i in range(1499)]
    chunks = -(-len(huge) // 32)

    async def run():
        order = []  # ("short", i) per streamed token of the running stream; "huge" at the long prompt's first token

        async def short():
            async for ev in pipe.pipe.generate(tok.encode("keep talking"), SamplingParams(max_new_tokens=120, ignore_eos=True)):
                if not isinstance(ev, GenerationResult):
                    order.append("short")

        async def long():
            async for ev in pipe.pipe.generate(huge, SamplingParams(max_new_tokens=2, ignore_eos=True)):
                order.append("huge")
                return ev

        task = asyncio.ensure_future(short())
        while len(order) < 5:  # decoding
            await asyncio.sleep(0.01)
        start = len(order)
        first = await long()
        await task
        return order, start, first

    try:
        order, start, first = pipe._call(run())
    finally:
        pipe.close()
    during = order[start:order.index("huge")].count("short")
    assert during >= chunks - 3, (during, chunks)  # one decode token per prompt chunk
    assert order.count("short") == 120
    assert first.token_id == ref_lm.generate([huge], [SamplingParams(max_new_tokens=1)])[0].output_ids[0]

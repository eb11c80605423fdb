"""The decode step without host overhead (stages/decode.py, stages/ops.py): the custom operators
are sound and match their references, torch.compile traces a stage's whole decode step with no
graph break, and the compiled fixed-shape step gives the eager step's tokens and log-probs, stage
by stage, through the single process (prefix cache, scarce blocks, int8) and through a pipeline.

The rest of the suite runs decode eagerly (tests/conftest.py sets JAMBA_DECODE=eager: compiling
costs seconds per model and split); here the compiled step, the default, is switched on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages import ops
from stages.config import JambaConfig
from stages.decode import DecodeRunner, capture_sizes
from stages.kernels import numba_moe
from stages.linear import int8_linear
from stages.model import JambaStage
from stages.quant import quantize_int8, quantize_stage
from stages.sequence import SamplingParams
from tests.hf_reference import CONFIGS, sharpen

torch.set_num_threads(2)


def _random_stage(name: str, seed: int = 0) -> JambaStage:
    """A whole random-weight model of one of the hf_reference configs, weights as sharp as theirs."""
    torch.manual_seed(seed)
    stage = JambaStage(JambaConfig(**CONFIGS[name]))  # A_log starts as log(1..d_state), as HF's does
    sharpen(stage)
    return stage.eval()


def _split(whole: JambaStage, bounds: list[int]) -> list[JambaStage]:
    """The stages [bounds[i], bounds[i+1]) of `whole`, with its weights."""
    state = whole.state_dict()
    stages = []
    for start, end in zip(bounds, bounds[1:]):
        s = JambaStage(whole.config, start, end)
        s.load_state_dict({k: v for k, v in state.items() if k in s.state_dict()})
        stages.append(s.eval())
    return stages


# ---- the custom operators ------------------------------------------------------------------------
def _routing(T: int, E: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
    return torch.topk(probs, k, dim=-1)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("T", [1, 5, 32])
def test_moe_kernel_matches_grouped_reference(T, k, quantized):
    """numba's one-call MoE (decode steps on CPU) against the grouped GEMMs, float32 and int8."""
    E, H, I = 6, 48, 40
    g = torch.Generator().manual_seed(T * 10 + k)
    gate_up, down = 0.2 * torch.randn(E, 2 * I, H, generator=g), 0.2 * torch.randn(E, H, I, generator=g)
    scales = (None, None)
    if quantized:
        (gate_up, gu_s), (down, d_s) = quantize_int8(gate_up), quantize_int8(down)
        scales = (gu_s, d_s)
    x = torch.randn(T, H, generator=g)
    weights, experts = _routing(T, E, k, seed=T)
    want = ops.moe_experts_grouped(x, weights, experts, gate_up, down, *scales)
    got = numba_moe.moe_experts_cpu(x, weights, experts, gate_up, down, *scales)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # The operator picks the kernel for short inputs, the grouped GEMMs for long ones.
    torch.testing.assert_close(ops.moe_experts(x, weights, experts, gate_up, down, *scales), want, atol=2e-5, rtol=1e-5)
    assert T <= numba_moe.MAX_TOKENS


def test_dense_moe_matches_grouped_reference():
    """The CUDA path (every expert over every token, no host sync) computes the same sum."""
    E, H, I, T = 5, 32, 24, 7
    g = torch.Generator().manual_seed(1)
    gate_up, down = 0.2 * torch.randn(E, 2 * I, H, generator=g), 0.2 * torch.randn(E, H, I, generator=g)
    x = torch.randn(T, H, generator=g)
    weights, experts = _routing(T, E, 2, seed=3)
    torch.testing.assert_close(ops.moe_experts_dense(x, weights, experts, gate_up, down),
                               ops.moe_experts_grouped(x, weights, experts, gate_up, down), atol=1e-5, rtol=1e-5)


def test_paged_decode_attention_matches_per_row_sdpa():
    """One query per row over its paged prefix, against SDPA on each row's keys gathered in order:
    the numba kernel and the torch path."""
    B, n_heads, n_kv, hd, bs, W = 3, 4, 2, 8, 4, 5
    g = torch.Generator().manual_seed(2)
    k_cache, v_cache = torch.randn(12, bs, n_kv, hd, generator=g), torch.randn(12, bs, n_kv, hd, generator=g)
    tables = torch.tensor([[3, 7, 1, 0, 0], [5, 0, 0, 0, 0], [2, 4, 6, 8, 9]])
    positions = torch.tensor([9, 0, 17])
    q = torch.randn(B, n_heads, hd, generator=g)
    got = ops.paged_decode_attention(q, k_cache, v_cache, tables, positions)  # numba on CPU float32
    torch.testing.assert_close(got, ops.paged_decode_attention_torch(q, k_cache, v_cache, tables, positions),
                               atol=1e-5, rtol=1e-5)
    for b in range(B):
        L = int(positions[b]) + 1
        keys = k_cache[tables[b]].flatten(0, 1)[:L].transpose(0, 1)[None]  # (1, n_kv, L, hd)
        vals = v_cache[tables[b]].flatten(0, 1)[:L].transpose(0, 1)[None]
        want = F.scaled_dot_product_attention(q[b][None, :, None], keys, vals, enable_gqa=True)[0, :, 0]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)
    assert tables.shape[1] == W


def test_custom_ops_pass_opcheck():
    """The fake implementations agree with the real ones (shapes, strides, dtypes), as the
    compiler relies on: torch.library.opcheck."""
    E, H, I, T = 4, 16, 12, 3
    g = torch.Generator().manual_seed(4)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    weights, experts = _routing(T, E, 2, seed=5)
    x = torch.randn(T, H, generator=g)
    torch.library.opcheck(ops.moe_experts.op, (x, weights, experts, gate_up, down))
    (qg, sg), (qd, sd) = quantize_int8(gate_up), quantize_int8(down)
    torch.library.opcheck(ops.moe_experts.op, (x, weights, experts, qg, qd, sg, sd))
    k_cache, v_cache = torch.randn(6, 4, 2, 8, generator=g), torch.randn(6, 4, 2, 8, generator=g)
    torch.library.opcheck(ops.paged_decode_attention.op, (torch.randn(2, 4, 8, generator=g), k_cache, v_cache,
                                                       torch.tensor([[1, 2], [3, 0]]), torch.tensor([5, 2])))
    q, s = quantize_int8(torch.randn(10, H, generator=g))
    torch.library.opcheck(int8_linear.op, (x, q, s, torch.randn(10, generator=g)))
    torch.library.opcheck(int8_linear.op, (torch.randn(40, H, generator=g), q, s))  # the prefill path


@pytest.mark.parametrize("T", [1, 3, 8, 20])
def test_skinny_linear_matches_mkl(T):
    """The paths `linear` takes for skinny inputs (numba's matmul for a few float32 tokens, W @ x.T
    up to 128) against F.linear."""
    from stages import linear as lin

    g = torch.Generator().manual_seed(T)
    w, b = torch.randn(300, 256, generator=g), torch.randn(300, generator=g)
    x = torch.randn(T, 256, generator=g)
    assert w.numel() >= lin.SKINNY_MIN_WEIGHT
    torch.testing.assert_close(lin.linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.library.opcheck(lin.skinny_linear.op, (x, w))


def test_model_through_skinny_linear_matches_mkl(monkeypatch):
    """A whole stage's decode steps with every linear layer through the numba matmul (the test
    configs' weights are below its size threshold, so it is lowered here) give MKL's log-probs."""
    from stages import linear as lin

    stage = _random_stage("mqa-top1", seed=2)
    out = {}
    for name, min_weight in (("numba", 0), ("mkl", 1 << 62)):
        monkeypatch.setattr(lin, "SKINNY_MIN_WEIGHT", min_weight)
        cache = stage.make_cache(3, 32)
        slots = [cache.allocate() for _ in range(3)]
        tok = stage(torch.arange(3, 12), cache, slots, [4, 2, 3]).argmax(-1)
        steps = []
        for _ in range(6):
            logits = stage(tok, cache, slots, [1, 1, 1])
            steps.append(torch.log_softmax(logits, -1))
            tok = logits.argmax(-1)
        out[name] = torch.stack(steps)
    assert (out["numba"] - out["mkl"]).abs().max() < 1e-4


# ---- the whole step: one graph -------------------------------------------------------------------
def _decode_inputs(stage: JambaStage, B: int):
    cache = stage.make_cache(B, 32)
    slots = [cache.allocate() for _ in range(B)]
    cache.begin_decode(slots)
    x = (torch.randint(3, stage.config.vocab_size, (B,)) if stage.is_first
         else torch.randn(B, stage.config.hidden_size))
    return x, cache, torch.tensor(slots), torch.zeros(B, dtype=torch.long)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_decode_step_traces_as_one_graph(quantize, monkeypatch):
    """torch.compile(fullgraph=True) needs the whole decode step of a stage as one graph: first,
    middle and last stages, float and int8 weights (the numba kernels behind custom operators;
    the float matmuls through numba's too)."""
    from stages import linear as lin

    monkeypatch.setattr(lin, "SKINNY_MIN_WEIGHT", 0)
    whole = _random_stage("mqa-top1")
    for stage in _split(whole, [0, 2, 4, 6]):
        if quantize:
            quantize_stage(stage, quantize)
        with torch.inference_mode():
            explained = torch._dynamo.explain(stage.decode)(*_decode_inputs(stage, 3))
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


# ---- compiled == eager -------------------------------------------------------------------------
def test_capture_sizes_pad_by_less_than_double():
    assert capture_sizes(16) == [1, 2, 4, 8, 16] and capture_sizes(12) == [1, 2, 4, 8, 12] and capture_sizes(1) == [1]


@pytest.mark.parametrize("bounds", [[0, 2, 4, 6], [0, 3, 6]], ids=["3-stages", "2-stages"])
def test_compiled_decode_matches_eager_stage_by_stage(bounds):
    """Three stages (first, middle, last), or two, of a config with odd periods, top-1 routing,
    MQA, conv width 3 and expand 1: each stage's compiled step (padded from 3 rows to 4, then 4
    rows, then 3 rows again) feeds the next, and the last stage's log-probs match the eager
    stages' within 1e-4, with the same greedy tokens. The runners share one compiled function in
    this process: each must run its own stage."""
    whole = _random_stage("mqa-top1", seed=1)
    stages = _split(whole, bounds)
    compiled_caches = [s.make_cache(4, 64) for s in stages]
    eager_caches = [s.make_cache(4, 64) for s in stages]
    runners = [DecodeRunner(s, c, sizes=[4]) for s, c in zip(stages, compiled_caches)]
    for r in runners:
        r.warm_up()
    g = torch.Generator().manual_seed(0)

    def prefill(slots: list[int], lengths: list[int]) -> torch.Tensor:
        ids = torch.randint(3, whole.config.vocab_size, (sum(lengths),), generator=g)
        outs = []
        for caches in (compiled_caches, eager_caches):
            for c in caches:
                for s in slots:
                    c.allocate(s)
            x = ids
            for stage, c in zip(stages, caches):
                x = stage(x, c, slots, lengths)
            outs.append(x)
        torch.testing.assert_close(outs[0], outs[1])
        return outs[0].argmax(-1)

    tokens = prefill([0, 1, 2], [5, 1, 9])
    rows = [0, 1, 2]
    for step in range(12):
        if step == 4:  # a fourth sequence joins: 4 rows, no padding
            tokens = torch.cat([tokens, prefill([3], [3])])
            rows = [0, 1, 2, 3]
        if step == 8:  # the first leaves: 3 rows again, in another order
            rows, tokens = [3, 1, 2], tokens[[3, 1, 2]]
        x_c = x_e = tokens
        for stage, runner, c in zip(stages, runners, eager_caches):
            x_c = runner(x_c, rows)
            x_e = stage(x_e, c, rows, [1] * len(rows))
        lp_c, lp_e = torch.log_softmax(x_c.float(), -1), torch.log_softmax(x_e.float(), -1)
        assert (lp_c - lp_e).abs().max() < 1e-4, step
        assert torch.equal(x_c.argmax(-1), x_e.argmax(-1)), step
        tokens = x_e.argmax(-1)
    for c_c, c_e in zip(compiled_caches, eager_caches):
        assert c_c.lengths == c_e.lengths


def test_compiled_bf16_step_is_as_close_to_float32_as_the_eager_bf16_step():
    """bf16 has no exact answer to match (inductor fuses ops and keeps float32 inside a fused
    kernel where eager rounds every op to bf16): both bf16 paths are held against the float32
    model, 40 greedy steps of 3 rows, and the compiled one must be as close as the eager one:
    the log-prob of float32's token off by no more (median), and its argmax no more often wrong."""
    import copy
    import statistics

    f32 = _random_stage("mqa-top1", seed=3)
    b16 = copy.deepcopy(f32).to(torch.bfloat16)
    caches = {"f32": f32.make_cache(4, 96), "eager": b16.make_cache(4, 96), "compiled": b16.make_cache(4, 96)}
    runner = DecodeRunner(b16, caches["compiled"], sizes=[4])
    runner.warm_up()
    g = torch.Generator().manual_seed(0)
    rows = [0, 1, 2]
    ids = torch.randint(3, f32.config.vocab_size, (15,), generator=g)
    errors: dict[str, list[float]] = {"eager": [], "compiled": []}
    wrong = {"eager": 0, "compiled": 0}
    with torch.inference_mode():
        for name, c in caches.items():
            for slot in rows:
                c.allocate(slot)
            (f32 if name == "f32" else b16)(ids, c, rows, [5, 1, 9])
        tokens = torch.randint(3, f32.config.vocab_size, (3,), generator=g)
        for _ in range(40):
            want = torch.log_softmax(f32(tokens, caches["f32"], rows, [1] * 3).float(), -1)
            got = {"eager": b16(tokens, caches["eager"], rows, [1] * 3), "compiled": runner(tokens, rows)}
            tokens = want.argmax(-1)
            for name, out in got.items():
                lp = torch.log_softmax(out.float(), -1)
                errors[name].append((lp - want).gather(1, tokens[:, None]).abs().max().item())
                wrong[name] += int((lp.argmax(-1) != tokens).sum())
    median = {name: statistics.median(e) for name, e in errors.items()}
    assert median["compiled"] <= 1.5 * median["eager"] + 1e-3, (median, wrong)
    assert wrong["compiled"] <= wrong["eager"] + 2, (median, wrong)
    assert max(errors["compiled"]) < 0.5, max(errors["compiled"])


def test_replacing_stage_serves_eagerly_while_its_steps_compile_in_the_background():
    """A stage that replaces a lost one compiles its decode steps in a thread while it serves:
    until a size is compiled, `size_for` refuses it and the step runs eagerly (as StageWorker.step
    does); every step, eager beside the compiling thread or compiled after it, gives the eager
    stage's tokens and log-probs within 1e-4, and the compiled sizes are used once ready."""
    whole = _random_stage("mqa-top1", seed=2)
    cache, eager_cache = whole.make_cache(3, 128), whole.make_cache(3, 128)
    runner = DecodeRunner(whole, cache, sizes=[4])
    g = torch.Generator().manual_seed(0)
    rows = [0, 1, 2]
    ids = torch.randint(3, whole.config.vocab_size, (15,), generator=g)
    for c in (cache, eager_cache):
        for s in rows:
            c.allocate(s)
    with torch.inference_mode():
        torch.testing.assert_close(whole(ids, cache, rows, [5, 1, 9]), whole(ids, eager_cache, rows, [5, 1, 9]))
    thread = runner.warm_up_in_background()
    assert runner.size_for(3) is None  # nothing compiled yet: the caller runs the step eagerly
    ran = {"eager": 0, "compiled": 0}
    tokens = torch.randint(3, whole.config.vocab_size, (3,), generator=g)
    for step in range(40):
        if step == 20:  # 20 steps beside the compiling thread (or fewer, if it is done), then wait for it
            thread.join()
        elif step < 20 and not thread.is_alive():
            continue
        with torch.inference_mode():
            if runner.size_for(len(rows)) is None:
                out = whole(tokens, cache, rows, [1] * len(rows))
                ran["eager"] += 1
            else:
                out = runner(tokens, rows)
                ran["compiled"] += 1
            want = whole(tokens, eager_cache, rows, [1] * len(rows))
        lp, lp_want = torch.log_softmax(out.float(), -1), torch.log_softmax(want.float(), -1)
        assert (lp - lp_want).abs().max() < 1e-4, (step, ran)
        assert torch.equal(out.argmax(-1), want.argmax(-1)), (step, ran)
        tokens = want.argmax(-1)
    assert ran["eager"] > 0 and ran["compiled"] >= 20, ran
    assert runner.background is None and runner.traced == {4} and runner.compile_seconds > 0
    assert cache.lengths == eager_cache.lengths


@pytest.fixture(scope="module")
def demo_lm(models):
    from stages.tokenizer import Tokenizer

    lm, _ = models
    return lm, Tokenizer.from_dir(lm)


def _generate(lm, tok, monkeypatch, mode: str, quantize: str | None = None, **options):
    from cluster.runtime.local import LocalRunner
    from stages.loading import load_stage

    monkeypatch.setenv("JAMBA_DECODE", mode)
    prompts = [tok.encode(t) for t in ["The weather today is", "Once upon a time", "a", "The weather today is"]]
    params = [SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=True),
              SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=True, temperature=0.8, top_p=0.9, seed=7),
              SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=True),
              SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=True)]
    with LocalRunner(load_stage(lm, quantize=quantize)[0], tok, **options) as runner:
        decoder = runner.engine.worker.decoder
        first = runner.generate(prompts, params)
        second = runner.generate(prompts, params)  # the prompts' prefixes are cached now
        stats = runner.engine.scheduler.stats()
    return first + second, decoder, stats


def _same(got, want):
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) < 1e-4


@pytest.mark.parametrize("quantize", [None, "int8-with-mamba"])
def test_local_runner_compiled_matches_eager(demo_lm, monkeypatch, quantize):
    """The trained demo model through the single process, float32 and every linear layer int8
    (int8-with-mamba: the experts, as int8-experts has them, and every other linear layer, the
    Mamba projections included, a superset of int8): greedy and
    seeded sampling, the second call's prompts from the prefix cache; then with blocks so scarce
    that running requests are preempted and replayed."""
    lm, tok = demo_lm
    options = dict(num_slots=2, max_batch_tokens=16, block_size=4)
    want, eager_decoder, _ = _generate(lm, tok, monkeypatch, "eager", quantize, **options)
    got, decoder, stats = _generate(lm, tok, monkeypatch, "compiled", quantize, **options)
    assert eager_decoder is None and decoder is not None and decoder.sizes == [1, 2]
    assert stats["cache"]["cached_tokens"] > 0
    _same(got, want)
    if quantize is None:
        scarce = dict(options, num_blocks=10)  # two sequences grow to 8 blocks each
        got, _, stats = _generate(lm, tok, monkeypatch, "compiled", **scarce)
        assert stats["preemptions"] > 0
        _same(got, want)


def test_pipeline_compiled_matches_single_process_through_a_stage_failure(ray_cluster, demo_lm, monkeypatch):
    """Three stages on Ray (first, middle, last) decode through their compiled steps (the driver's
    JAMBA_DECODE reaches the stage actors); the middle one is killed mid-stream, comes back
    (serving eagerly while it compiles its steps again, from the on-disk cache) and the scheduler
    replays. Greedy, seeded, penalized and grammar-held streams all give the eager single
    process's tokens."""
    import asyncio
    import os
    import signal

    from cluster.runtime.config import PipelineConfig
    from cluster.runtime.local import LocalRunner
    from cluster.runtime.pipeline import Pipeline
    from stages.loading import load_stage

    from .streams import settle, stream_params, streams_through_a_fault

    lm, tok = demo_lm
    prompts = [tok.encode(t) for t in ["The weather today is", "Once upon a time", "a", "Stream four says"]]
    params = [stream_params(i) for i in range(4)]
    monkeypatch.setenv("JAMBA_DECODE", "eager")
    with LocalRunner(load_stage(lm)[0], tok, num_slots=2, prefix_cache=False) as runner:
        want = runner.generate(prompts, params)
    monkeypatch.setenv("JAMBA_DECODE", "compiled")

    async def run():
        pipe = await Pipeline.start(PipelineConfig(str(lm), num_stages=3, layer_split="3,3,2", num_slots=2,
                                                   max_batch_tokens=16, cpus_per_stage=0.25))
        try:
            before = await pipe.stage_stats()
            pid = before[1]["pid"]
            tokens, finals = await streams_through_a_fault(pipe, prompts, params, lambda: os.kill(pid, signal.SIGKILL),
                                                           tokens_before=12)
            await settle(pipe)
            return tokens, finals, before, await pipe.stage_stats(), pipe.scheduler.stats()
        finally:
            await pipe.close()

    tokens, finals, before, after, stats = asyncio.run(run())
    assert stats["recoveries"] == 1 and after[1]["pid"] != before[1]["pid"]
    assert all(info.get("decode_compile_seconds", 0) > 0 and info["decode_warm_up"] == "before ready"
               for info in before), before
    # Ray restarted the killed stage: it rejoined before compiling and compiled while serving
    assert [info["decode_warm_up"] for info in after] == ["before ready", "background", "before ready"], after
    for got, fin, w in zip(tokens, finals, want):
        assert not isinstance(fin, BaseException), fin
        assert got == fin.output_ids == w.output_ids


def test_numba_kernels_keep_torch_thread_count():
    """numba.set_num_threads resets the calling thread's OpenMP count (torch's too, one libgomp):
    the kernels put torch's back, so a one-thread stage stays one thread and the compiled step's
    guards hold."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        stage = _random_stage("mqa-top1")
        cache = stage.make_cache(2, 16)
        slots = [cache.allocate(), cache.allocate()]
        stage(torch.tensor([5, 6, 7]), cache, slots, [2, 1])  # numba conv, scan and MoE kernels
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

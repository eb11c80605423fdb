"""8-bit weights (stages/quant.py): quantization bounds, the fast kernels against the reference, and
quantized stages against plain stages holding the dequantized weights (the same products, so the
same numbers to float32 rounding), for each mode, on the demo model and transformers' configs."""

from __future__ import annotations

import os

import pytest
import torch

from cluster.runtime.local import LocalRunner
from stages import linear, quant
from stages.config import QUANT_MODES
from stages.demo import make_demo_model
from stages.loading import Checkpoint, LoadStats, load_stage, save_checkpoint
from stages.model import JambaStage
from stages.sequence import SamplingParams
from tests.hf_reference import CONFIGS, make_hf_model, save_hf_model

torch.set_num_threads(2)


# --- quantize / dequantize ---------------------------------------------------------------


def test_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 24, generator=g) * torch.logspace(-3, 2, 40)[None, :, None]  # rows of very different size
    w[1, 5] = 0  # an all-zero row
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (3, 40)
    assert s[1, 5] == 1 and (q[1, 5] == 0).all()  # no 0/0
    d = linear.dequantize_int8(q, s)
    assert torch.isfinite(d).all() and (d[1, 5] == 0).all()
    err = (d - w).abs()
    assert (err <= s[..., None] / 2 * (1 + 1e-5) + 1e-30).all()
    nonzero = w.abs().amax(-1) > 0
    torch.testing.assert_close(s[nonzero], w.abs().amax(-1)[nonzero] / 127)
    assert (q.abs().amax(-1)[nonzero] == 127).all()  # each row's largest entry maps to +-127
    assert q.min() >= -127  # symmetric: -128 is never used
    # Leading dims are independent rows: quantizing expert by expert is the same.
    for e in range(3):
        qe, se = quant.quantize_int8(w[e])
        assert torch.equal(qe, q[e]) and torch.equal(se, s[e])


def test_chunked_quantization_matches_whole(monkeypatch):
    w = torch.randn(70, 33, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q, s = quant.quantize_int8(w)
    monkeypatch.setattr(quant, "QUANT_CHUNK_ELEMS", 100)  # 3 rows a block
    q2, s2 = quant.quantize_int8(w)
    assert torch.equal(q, q2) and torch.equal(s, s2)


# --- kernels against the reference -------------------------------------------------------

SHAPES = [(0, 8, 16), (1, 40, 24), (3, 37, 70), (4, 64, 128), (17, 130, 33), (32, 256, 96), (33, 64, 40), (70, 129, 64)]


def _inputs(T, N, K, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, s = quant.quantize_int8(torch.randn(N, K, generator=g))
    return torch.randn(T, K, generator=g).to(dtype), q, s, torch.randn(N, generator=g).to(dtype)


def _close_fp32(got, ref, K):
    # Same products summed in another order: float32 rounding of a K-term sum.
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, atol=1e-6 * max(scale, 1) * max(K, 16) ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("T,N,K", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_kernel_matches_reference(T, N, K, bias):
    x, q, s, b = _inputs(T, N, K, seed=T + N)
    b = b if bias else None
    got = linear.int8_linear(x, q, s, b)
    ref = linear.int8_linear_reference(x, q, s, b)
    assert got.shape == (T, N) and got.dtype == torch.float32
    _close_fp32(got, ref, K)


def test_cpu_kernel_bf16_inputs():
    x, q, s, b = _inputs(5, 72, 48, seed=3, dtype=torch.bfloat16)
    got = linear.int8_linear(x, q, s, b)
    assert got.dtype == torch.bfloat16
    # The kernel computes in float32 and rounds once; the reference rounds the weights to bf16 first.
    ref = linear.int8_linear_reference(x.float(), q, s, b.float())
    torch.testing.assert_close(got.float(), ref, atol=0.05, rtol=1.6e-2)


@pytest.mark.parametrize("T,N,K", [(1, 40, 24), (3, 37, 70), (17, 130, 33), (70, 129, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_reference(T, N, K, dtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest) or a GPU")
    from stages.kernels import triton_int8

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, q, s, b = (t.to(dev) for t in _inputs(T, N, K, seed=K, dtype=dtype))
    got = triton_int8.int8_linear_triton(x, q, s, b)
    assert got.dtype == dtype and got.shape == (T, N)
    ref = linear.int8_linear_reference(x.float(), q, s, b.float())
    if dtype == torch.float32:
        _close_fp32(got, ref, K)
    else:  # one bf16 rounding of the output (and, on a GPU, of the input to the dot: exact here)
        torch.testing.assert_close(got.float(), ref, atol=0.05, rtol=1.6e-2)
    # Strided input (a slice of a wider activation).
    wide = torch.randn(T, 2 * K, device=dev).to(dtype)
    torch.testing.assert_close(triton_int8.int8_linear_triton(wide[:, ::2], q, s).float(),
                               linear.int8_linear_reference(wide[:, ::2].float(), q, s), atol=0.05, rtol=1.6e-2)


# --- which weights each mode quantizes ---------------------------------------------------


def test_modes_pick_their_weights():
    names = {
        "model.layers.1.feed_forward.experts.gate_up_proj": ("int8-experts", "int8", "int8-with-mamba"),
        "model.layers.1.feed_forward.experts.down_proj": ("int8-experts", "int8", "int8-with-mamba"),
        "model.layers.4.self_attn.q_proj.weight": ("int8", "int8-with-mamba"),
        "model.layers.4.self_attn.o_proj.weight": ("int8", "int8-with-mamba"),
        "model.layers.0.feed_forward.down_proj.weight": ("int8", "int8-with-mamba"),
        "model.layers.0.mamba.in_proj.weight": ("int8-with-mamba",),
        "model.layers.0.mamba.dt_proj.weight": ("int8-with-mamba",),
        "model.layers.0.mamba.dt_proj.bias": (),
        "model.layers.0.mamba.conv1d.weight": (),
        "model.layers.1.feed_forward.router.weight": (),
        "model.embed_tokens.weight": (),
        "lm_head.weight": (),
        "score.weight": (),
        "model.layers.0.input_layernorm.weight": (),
    }
    for n, modes in names.items():
        for mode in (None, *QUANT_MODES):
            assert quant.quantized_param(n, mode) == (mode in modes), (n, mode)


def test_unknown_mode_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int4'; choose one of int8-experts, int8, int8-with-mamba"):
        load_stage(make_demo_model(tmp_path / "m"), quantize="int4")


# --- quantized stages against dequantized references -------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return make_demo_model(tmp_path_factory.mktemp("demo") / "lm")


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_dir(request, tmp_path_factory):
    return save_hf_model(make_hf_model(request.param), tmp_path_factory.mktemp(request.param))


def _dequantized_reference(stage: JambaStage) -> JambaStage:
    ref = JambaStage(stage.config, stage.start, stage.end, head=stage.head)
    ref.load_state_dict(quant.dequantized_state(stage), strict=True)
    return ref.eval()


def _prompts(vocab, lengths=(1, 5, 40), seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _compare(path, mode):
    stage, stats = load_stage(path, quantize=mode)
    assert stage.quantize == mode and stats.quantize == mode
    ints = [n for n, t in stage.state_dict().items() if t.dtype == torch.int8]
    assert ints and all(quant.quantized_param(n, mode) for n in ints)
    ref = _dequantized_reference(stage)
    vocab = stage.config.vocab_size
    ps = _prompts(vocab)
    # Prefill (T up to 46 > the numba kernel's 32: the blocked path too) and decode, several rows a step.
    ours, theirs = LocalRunner(stage, max_batch_tokens=64), LocalRunner(ref, max_batch_tokens=64)
    for a, b in zip(ours.score(ps), theirs.score(ps)):
        torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), atol=1e-4, rtol=0)
    params = [SamplingParams(max_new_tokens=10, logprobs=True, ignore_eos=True) for _ in ps]
    for a, b in zip(ours.generate(ps, params), theirs.generate(ps, params)):
        assert a.output_ids == b.output_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    return stage, stats


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_quantized_demo_matches_dequantized_reference(demo_dir, mode):
    stage, stats = _compare(demo_dir, mode)
    full, full_stats = load_stage(demo_dir)
    assert stats.kept_bytes < full_stats.kept_bytes
    # One parameter's full-precision sources in hand at a time, beside the kept (int8) tensors.
    largest = max(t.numel() * 4 for t in full.state_dict().values())
    assert stats.peak_bytes <= stats.kept_bytes + largest + 4 * quant.QUANT_CHUNK_ELEMS
    if mode == "int8-experts":
        # Per-expert checkpoint tensors are read and quantized one expert at a time.
        experts = [t for n, t in full.state_dict().items() if n.endswith("experts.gate_up_proj")]
        assert stats.peak_bytes < stats.kept_bytes + experts[0].numel() * 4


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_quantized_hf_configs_match_dequantized_reference(hf_dir, mode):
    _compare(hf_dir, mode)


def test_classifier_head_stays_full_precision(tmp_path):
    path = make_demo_model(tmp_path / "cls", task="classification")
    stage, _ = load_stage(path, quantize="int8")
    assert stage.score.weight.dtype == torch.float32
    ref = _dequantized_reference(stage)
    ps = _prompts(stage.config.vocab_size)
    torch.testing.assert_close(torch.tensor(LocalRunner(stage).classify(ps)), torch.tensor(LocalRunner(ref).classify(ps)),
                               atol=1e-4, rtol=0)


def test_fused_and_per_expert_checkpoints_quantize_alike(hf_dir, tmp_path):
    per_expert, _ = load_stage(hf_dir, quantize="int8")
    full, _ = load_stage(hf_dir)
    save_checkpoint(full.state_dict(), full.config, tmp_path, fused_experts=True)
    fused, _ = load_stage(tmp_path, quantize="int8")
    a, b = per_expert.state_dict(), fused.state_dict()
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_quantizing_a_loaded_stage_equals_quantizing_while_loading(hf_dir):
    for mode in QUANT_MODES:
        loaded, _ = load_stage(hf_dir, quantize=mode)
        after = quant.quantize_stage(load_stage(hf_dir)[0], mode)
        a, b = loaded.state_dict(), after.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), mode


def test_partial_stages_quantize_their_own_tensors(hf_dir):
    whole, _ = load_stage(hf_dir, quantize="int8-experts")
    n = whole.config.num_hidden_layers
    lo, lo_stats = load_stage(hf_dir, 0, n // 2, quantize="int8-experts")
    hi, _ = load_stage(hf_dir, n // 2, n, quantize="int8-experts")
    assert not any(f"layers.{i}." in t for t in lo_stats.tensors_read for i in range(n // 2, n))
    state = whole.state_dict()
    for part in (lo, hi):
        for k, t in part.state_dict().items():
            assert torch.equal(t, state[k]), k


def test_cast_stage_keeps_int8_and_fp32_scales(demo_dir):
    stage, _ = load_stage(demo_dir, dtype="bfloat16", quantize="int8")
    sd = stage.state_dict()
    assert {t.dtype for n, t in sd.items() if n.endswith("_scale")} == {torch.float32}
    assert {t.dtype for n, t in sd.items() if not n.endswith("_scale") and t.dtype != torch.int8} == {torch.bfloat16}
    # Quantized from the checkpoint's float32 values, not from the bf16 cast: the int8 tensors are the fp32 load's.
    fp32, _ = load_stage(demo_dir, quantize="int8")
    for n, t in fp32.state_dict().items():
        if t.dtype == torch.int8 or n.endswith("_scale"):
            assert torch.equal(t, sd[n]), n
    runner = LocalRunner(stage)
    assert len(runner.generate(_prompts(stage.config.vocab_size), [SamplingParams(max_new_tokens=3)] * 3)[0].output_ids) == 3


# --- the unquantized path ----------------------------------------------------------------


def _old_style_load(path) -> JambaStage:
    """What load_stage did before quantization: read every tensor, stack per-expert ones, load."""
    from stages.loading import _source_names

    ckpt = Checkpoint(path)
    c = ckpt.config
    stage = JambaStage(c)
    src = {n: _source_names(n, ckpt, c) for n, _ in stage.named_parameters()}
    t = ckpt.read(sorted({s for v in src.values() for s in v}), LoadStats())
    E, state = c.num_experts, {}
    for n, names in src.items():
        if len(names) == 1:
            state[n] = t[names[0]]
        elif n.endswith("gate_up_proj"):
            state[n] = torch.cat([torch.stack([t[k] for k in names[:E]]), torch.stack([t[k] for k in names[E:]])], dim=1)
        else:
            state[n] = torch.stack([t[k] for k in names])
    stage.load_state_dict(state, assign=True)
    return stage.eval()


def test_unquantized_path_unchanged(hf_dir):
    new, stats = load_stage(hf_dir)
    old = _old_style_load(hf_dir)
    assert new.quantize is None and stats.quantize is None
    assert stats.kept_bytes == sum(p.numel() * p.element_size() for p in new.parameters())
    ps = _prompts(new.config.vocab_size)
    a = LocalRunner(new, max_batch_tokens=64).score(ps)
    b = LocalRunner(old, max_batch_tokens=64).score(ps)
    assert a == b  # bit for bit


def test_stage_through_the_triton_kernel(monkeypatch, tmp_path):
    """The whole quantized model with every int8 matmul in the Triton kernel (the interpreter here)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest)")
    path = save_hf_model(make_hf_model("all-moe-tied"), tmp_path / "m")
    stage, _ = load_stage(path, quantize="int8-with-mamba")
    ps = _prompts(stage.config.vocab_size, lengths=(3, 9))
    cpu = LocalRunner(stage).score(ps)
    monkeypatch.setenv("JAMBA_INT8_KERNEL", "triton")
    tri = LocalRunner(stage).score(ps)
    for a, b in zip(tri, cpu):
        torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), atol=1e-4, rtol=0)


def test_pipeline_equals_single_process_quantized(ray_cluster, demo_dir):
    """Two Ray stages, each quantizing its own layers while loading, give the single process's results."""
    from cluster.runtime.config import PipelineConfig
    from cluster.runtime.pipeline import SyncPipeline

    single, _ = load_stage(demo_dir, quantize="int8-experts")
    ref = LocalRunner(single, max_batch_tokens=6)
    ps = _prompts(single.config.vocab_size, lengths=(1, 5, 12))
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True) for _ in ps]
    pipe = SyncPipeline(PipelineConfig(str(demo_dir), num_stages=2, layer_split="4,4", max_batch_tokens=6,
                                       cpus_per_stage=0.25, quantize="int8-experts"))
    try:
        assert [g.output_ids for g in pipe.generate(ps, params)] == [w.output_ids for w in ref.generate(ps, params)]
        for g, w in zip(pipe.score(ps), ref.score(ps)):
            assert g[1:] == pytest.approx(w[1:], abs=1e-4)
        infos = pipe._call(pipe.pipe.stage_stats())
        assert [i["quantize"] for i in infos] == ["int8-experts"] * 2
        assert all(0 < i["weight_bytes"] <= i["peak_load_bytes"] for i in infos)
    finally:
        pipe.close()


def test_warmup_command_warms_quantized_stages(demo_dir, capsys):
    """`jamba warmup --quantize int8` (the image build) also runs an int8 stage."""
    from cluster.cli.main import main

    assert main(["warmup", "--model", str(demo_dir), "--quantize", "int8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "as stored, cpu" in lines[0] and "as stored, int8, cpu" in lines[1]

"""The Triton kernels (stages/kernels/triton_gpu.py) against the torch references, on CPU through
Triton's interpreter (conftest sets TRITON_INTERPRET=1), and the model end to end with
JAMBA_KERNELS=triton against the CPU path.

Widths are Jamba-Mini's (d_inner 8192, d_state 16, conv width 4) with short rows, so the
interpreter stays fast; the block-tiling tests use small blocks to run many programs with
partial blocks, the way a GPU launch does.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set by conftest) or a GPU", allow_module_level=True)

from stages import kernels  # noqa: E402
from stages.kernels import reference, triton_gpu  # noqa: E402
from tests.test_scan import (  # noqa: E402
    _close,
    _conv_inputs,
    _conv_snap_inputs,
    _rows,
    _scan_inputs,
    _scan_snap_inputs,
    _scan_solo,
    bad_snapshot_requests,
    check_conv_snapshots,
    check_scan_snapshots,
)

D_INNER, D_STATE, D_CONV = 8192, 16, 4  # Jamba-Mini-1.6
# One call mixing every kind of row: fresh prompts, chunks on top of cached state, decode rows,
# rows shorter than the conv state, empty rows.
MIXED = dict(lens=[9, 1, 0, 2, 1, 17, 3, 0, 1], fresh=[0, 5])  # rows 0 and 5 start from zero state
S = 12


def _mixed_rows(seed):
    cu, slots = _rows(MIXED["lens"], S, seed)
    return cu, slots, int(cu[-1])


def _freshen(states, slots):
    """Rows listed in MIXED["fresh"] start a new sequence: zero state."""
    states[slots[MIXED["fresh"]]] = 0
    return states


def _tol(dtype):
    # fp32: rounding only. bf16 outputs: both round the same float32 value to bf16, and values a
    # hair apart may round to neighbours (1 ulp = 2**-8 relative).
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)


@pytest.fixture
def small_blocks(monkeypatch):
    """GPU-like tiling in the interpreter: many programs, partial blocks at the edges."""
    monkeypatch.setattr(triton_gpu, "_INTERPRETER", dict(conv_t=4, conv_d=64, scan_d=32, scan_warps=1))


# --- kernels against the references -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_matches_ref_mixed_rows(dtype):
    cu, slots, T = _mixed_rows(seed=1)
    x, w, b, st = _conv_inputs(T, D_INNER, D_CONV, S, seed=2, dtype=dtype)
    _freshen(st, slots)
    st_ref, st_tri = st.clone(), st.clone()
    y_ref = reference.causal_conv1d_varlen_ref(x, w, b, st_ref, cu, slots)
    y_tri = triton_gpu.causal_conv1d_varlen_triton(x, w, b, st_tri, cu, slots)
    assert y_tri.dtype == dtype and st_tri.dtype == dtype
    _close(y_tri.float(), y_ref.float(), **_tol(dtype))
    assert torch.equal(st_tri, st_ref)  # states hold inputs: exact; untouched and empty rows' slots unchanged


@pytest.mark.parametrize("K", [2, 3, 4])
def test_conv_tiling_no_bias(small_blocks, K):
    D = 200  # not a multiple of the block
    cu, slots, T = _mixed_rows(seed=K)
    x, w, _, st = _conv_inputs(T, D, K, S, seed=3 + K)
    st_ref, st_tri = st.clone(), st.clone()
    y_ref = reference.causal_conv1d_varlen_ref(x, w, None, st_ref, cu, slots)
    y_tri = triton_gpu.causal_conv1d_varlen_triton(x, w, None, st_tri, cu, slots)
    _close(y_tri, y_ref)
    assert torch.equal(st_tri, st_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_matches_ref_mixed_rows(dtype):
    cu, slots, T = _mixed_rows(seed=4)
    u, dt, A, B, C, Dv, z, st = _scan_inputs(T, D_INNER, D_STATE, S, seed=5)
    u, B, C, z = (t.to(dtype) for t in (u, B, C, z))  # as the model passes them; delta is float32
    _freshen(st, slots)
    st_ref, st_tri = st.clone(), st.clone()
    y_ref = reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, st_ref, cu, slots)
    y_tri = triton_gpu.selective_scan_varlen_triton(u, dt, A, B, C, Dv, z, st_tri, cu, slots)
    assert y_tri.dtype == dtype and st_tri.dtype == torch.float32
    _close(y_tri.float(), y_ref.float(), **_tol(dtype))
    _close(st_tri, st_ref)  # float32 state whatever the inputs
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots[torch.tensor(MIXED["lens"]) > 0]] = False
    assert torch.equal(st_tri[untouched], st[untouched])  # other slots and empty rows' slots left alone


@pytest.mark.parametrize("N", [16, 5])  # 5: state width not a power of two
def test_scan_tiling_without_D_and_z(small_blocks, N):
    D = 200
    cu, slots, T = _mixed_rows(seed=6)
    u, dt, A, B, C, _, _, st = _scan_inputs(T, D, N, S, seed=7)
    st_ref, st_tri = st.clone(), st.clone()
    y_ref = reference.selective_scan_varlen_ref(u, dt, A, B, C, None, None, st_ref, cu, slots)
    y_tri = triton_gpu.selective_scan_varlen_triton(u, dt, A, B, C, None, None, st_tri, cu, slots)
    _close(y_tri, y_ref)
    _close(st_tri, st_ref)


def test_scan_extreme_time_steps():
    # Large delta*A underflows exp to ~0 (state forgotten), tiny delta keeps it.
    D, N = 64, 16
    cu, slots = _rows([6], 2, seed=8)
    u, dt, A, B, C, Dv, z, st = _scan_inputs(6, D, N, 2, seed=9)
    dt[0, : D // 2] = 200.0
    dt[1, D // 2:] = 1e-6
    st_ref, st_tri = st.clone(), st.clone()
    _close(triton_gpu.selective_scan_varlen_triton(u, dt, A, B, C, Dv, z, st_tri, cu, slots),
           reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, st_ref, cu, slots))
    _close(st_tri, st_ref)


# --- snapshots: the state in the middle of a call (see tests/test_scan.py) --------------------
# Rows: decode, fresh prompt, empty, prompt and 2-token row on top of stored state; snapshots at
# first, middle and last tokens of rows, and among a row's first K-2 tokens. Small widths with
# small blocks: several programs per row, partial blocks.


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_snapshots(small_blocks, K, dtype):
    check_conv_snapshots(triton_gpu.causal_conv1d_varlen_triton, *_conv_snap_inputs(72, K, dtype, seed=50 + K))


@pytest.mark.parametrize("N", [16, 5])
def test_scan_snapshots(small_blocks, N):
    check_scan_snapshots(triton_gpu.selective_scan_varlen_triton, *_scan_snap_inputs(72, N, seed=52 + N))


def test_scan_snapshots_match_numba(small_blocks):
    from stages.kernels import numba_cpu

    args, st, cu, slots, tok, dst = _scan_snap_inputs(72, 16, seed=54)
    args = args[:5] + (None, None)  # also without D and z
    h_tri, h_cpu = st.clone(), st.clone()
    _close(triton_gpu.selective_scan_varlen_triton(*args, h_tri, cu, slots, tok, dst),
           numba_cpu.selective_scan_varlen_cpu(*args, h_cpu, cu, slots, tok, dst))
    _close(h_tri, h_cpu)
    _close(h_tri[dst], _scan_solo(args, st, cu, slots, tok))


def test_bad_snapshots_rejected():
    x, w, b, st, cu, slots, _, _ = _conv_snap_inputs(8, 4, torch.float32, seed=55)
    args, hst, _, _, _, _ = _scan_snap_inputs(8, 4, seed=55)
    for tok, dst, msg in bad_snapshot_requests(cu, slots):
        c, h = st.clone(), hst.clone()
        with pytest.raises(ValueError, match=msg):
            triton_gpu.causal_conv1d_varlen_triton(x, w, b, c, cu, slots, tok, dst)
        with pytest.raises(ValueError, match=msg):
            triton_gpu.selective_scan_varlen_triton(*args, h, cu, slots, tok, dst)
        assert torch.equal(c, st) and torch.equal(h, hst)


# --- chunked prefill, then decode steps == the full forward ---------------------------------


def test_chunks_then_decode_match_one_pass(monkeypatch):
    """A 12-token sequence fed as chunks of 5 and 3, then 4 decode steps through the decode entry
    point, each call beside another sequence's row, equals one reference pass over all 12."""
    monkeypatch.setenv("JAMBA_KERNELS", "triton")
    D, N, K, T_row = 1024, D_STATE, D_CONV, 12
    x, w, b, cst0 = _conv_inputs(T_row, D, K, 4, seed=10)
    u, dt, A, B, C, Dv, z, hst0 = _scan_inputs(T_row, D, N, 4, seed=11)
    ox, _, _, _ = _conv_inputs(3, D, K, 4, seed=12)  # the other sequence's tokens
    ou, odt, _, oB, oC, _, oz, _ = _scan_inputs(3, D, N, 4, seed=13)

    c_ref, h_ref = cst0.clone(), hst0.clone()
    one = torch.tensor([0, T_row])
    y_conv_ref = reference.causal_conv1d_varlen_ref(x, w, b, c_ref, one, torch.tensor([2]))
    y_scan_ref = reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, h_ref, one, torch.tensor([2]))

    c, h = cst0.clone(), hst0.clone()
    convs, scans, pos = [], [], 0
    for n in (5, 3):  # prompt chunks, the other sequence's row first
        cu, slots = torch.tensor([0, 1, 1 + n]), torch.tensor([0, 2])
        cat = lambda o, a: torch.cat([o[:1], a[pos:pos + n]])  # noqa: E731
        convs.append(kernels.causal_conv1d_varlen(cat(ox, x), w, b, c, cu, slots)[1:])
        scans.append(kernels.selective_scan_varlen(cat(ou, u), cat(odt, dt), A, cat(oB, B), cat(oC, C), Dv,
                                                   cat(oz, z), h, cu, slots)[1:])
        pos += n
    for t in range(pos, T_row):  # decode: one token per row, our sequence second
        slots = torch.tensor([0, 2])
        pair = lambda o, a: torch.stack([o[0], a[t]])  # noqa: E731
        convs.append(kernels.causal_conv1d_varlen(pair(ox, x), w, b, c, torch.tensor([0, 1, 2]), slots)[1:])
        scans.append(kernels.selective_state_update(h, slots, pair(ou, u), pair(odt, dt), A, pair(oB, B),
                                                    pair(oC, C), Dv, pair(oz, z))[1:])
    _close(torch.cat(convs), y_conv_ref)
    _close(c[2], c_ref[2], atol=0, rtol=0)
    _close(torch.cat(scans), y_scan_ref)
    _close(h[2], h_ref[2])


# --- the model end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_lm(tmp_path_factory):
    from stages.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo") / "lm")


PROMPTS = [[1, 17, 4, 99, 250, 3, 7], [1, 5], [1] + list(range(30, 70))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_with_triton_matches_cpu_path(monkeypatch, demo_lm, dtype):
    """Scores (chunked prefill: 16-token budget) and greedy tokens (decode steps mixed with prompt
    chunks) through the Triton kernels match the numba path."""
    from cluster.runtime.local import LocalRunner
    from stages.loading import load_stage
    from stages.sequence import SamplingParams

    stage, _ = load_stage(demo_lm, dtype=dtype)
    runner = LocalRunner(stage, num_slots=2, max_batch_tokens=16)
    params = [SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, logprobs=True) for _ in PROMPTS]
    results = {}
    for backend in ("numba", "triton"):
        monkeypatch.setenv("JAMBA_KERNELS", backend)
        results[backend] = runner.score(PROMPTS), runner.generate(PROMPTS, params)
    (s_cpu, g_cpu), (s_tri, g_tri) = results["numba"], results["triton"]
    atol = 1e-4 if dtype == "float32" else 5e-2
    for a, b in zip(s_cpu, s_tri):
        assert a[0] is None and b[0] is None
        torch.testing.assert_close(torch.tensor(b[1:]), torch.tensor(a[1:]), atol=atol, rtol=0)
    for a, b in zip(g_cpu, g_tri):
        assert b.output_ids == a.output_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=atol, rtol=0)


def test_cli_score_with_triton(monkeypatch, demo_lm, tmp_path, capsys):
    """`jamba score` (the single-process entry point) with JAMBA_KERNELS=triton, against numba."""
    import json

    from cluster.cli.main import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS[:2]))
    out = {}
    for backend in ("numba", "triton"):
        monkeypatch.setenv("JAMBA_KERNELS", backend)
        assert main(["score", "--model", str(demo_lm), "--input", str(rows), "--output", str(tmp_path / backend)]) == 0
        out[backend] = [json.loads(line) for line in (tmp_path / backend).read_text().splitlines()]
    for a, b in zip(out["numba"], out["triton"]):
        torch.testing.assert_close(torch.tensor(b["token_logprobs"][1:]), torch.tensor(a["token_logprobs"][1:]),
                                   atol=1e-4, rtol=0)

"""Tests for stages/kernels: the numba kernels vs the torch references, varlen/slot handling,
chunked prefill, dtypes, the JAMBA_KERNELS dispatcher, the optional mamba-ssm decode plumbing,
and agreement with transformers' Jamba scan. The Triton kernels: tests/test_triton_kernels.py."""

import pytest
import torch
import torch.nn.functional as F

from stages import kernels
from stages.kernels import mamba_ssm, numba_cpu, reference

ATOL, RTOL = 1e-5, 1e-4  # fast vs reference: float32 rounding differences only

LENS = [1, 2, 3, 7, 50]  # decode rows, rows shorter than the conv state, prefill rows


def _rows(lens, S, seed):
    """cu_seqlens (B+1,) and distinct slots (B,) drawn from a pool of S, out of order."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0)
    slots = torch.randperm(S, generator=g)[: len(lens)]
    return cu, slots


def _conv_inputs(T, D, K, S, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    weight = torch.randn(D, K, generator=g) * 0.5
    bias = torch.randn(D, generator=g)
    conv_states = torch.randn(S, D, K - 1, generator=g).to(dtype)  # nonzero: mid-sequence
    return x, weight, bias, conv_states


def _scan_inputs(T, D, N, S, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(T, D, generator=g)
    delta = F.softplus(torch.randn(T, D, generator=g) - 1.0)  # final time step, > 0
    A = -torch.exp(torch.randn(D, N, generator=g) * 0.5)  # negative, like -exp(A_log)
    B = torch.randn(T, N, generator=g)
    C = torch.randn(T, N, generator=g)
    Dskip = torch.randn(D, generator=g)
    z = torch.randn(T, D, generator=g)
    ssm_states = torch.randn(S, D, N, generator=g)  # nonzero: mid-sequence
    return u, delta, A, B, C, Dskip, z, ssm_states


def _close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# --- fast vs reference --------------------------------------------------------


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("D", [40, 160])  # partial channel blocks; several blocks
def test_conv_fast_matches_ref(K, D):
    S = 11
    cu, slots = _rows(LENS, S, seed=K)
    x, w, b, st = _conv_inputs(int(cu[-1]), D, K, S, seed=D + K)
    st_ref, st_fast = st.clone(), st.clone()
    y_ref = reference.causal_conv1d_varlen_ref(x, w, b, st_ref, cu, slots)
    y_fast = numba_cpu.causal_conv1d_varlen_cpu(x, w, b, st_fast, cu, slots)
    _close(y_fast, y_ref)
    _close(st_fast, st_ref)
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(st_fast[untouched], st[untouched])  # other slots are left alone


def test_conv_no_bias_and_empty_row():
    K, D, S = 4, 24, 6
    lens = [3, 0, 1]  # an empty row keeps its state
    cu, slots = _rows(lens, S, seed=1)
    x, w, _, st = _conv_inputs(int(cu[-1]), D, K, S, seed=2)
    st_ref, st_fast = st.clone(), st.clone()
    y_ref = reference.causal_conv1d_varlen_ref(x, w, None, st_ref, cu, slots)
    y_fast = numba_cpu.causal_conv1d_varlen_cpu(x, w, None, st_fast, cu, slots)
    _close(y_fast, y_ref)
    _close(st_fast, st_ref)
    assert torch.equal(st_fast[slots[1]], st[slots[1]])


def test_conv_ref_matches_plain_conv1d():
    # One row from a stored state == F.conv1d over [state, x] + SiLU; the state becomes
    # the last K-1 inputs, including the case of fewer new tokens than K-1.
    K, D, S = 4, 8, 3
    for L in (1, 2, 9):
        x, w, b, st = _conv_inputs(L, D, K, S, seed=L)
        inp = torch.cat([st[2], x.t()], dim=1)  # (D, K-1+L)
        expect = F.silu(F.conv1d(inp[None], w[:, None, :], b, groups=D))[0].t()
        st2 = st.clone()
        y = reference.causal_conv1d_varlen_ref(x, w, b, st2, torch.tensor([0, L]), torch.tensor([2]))
        _close(y, expect, atol=1e-6, rtol=1e-6)
        assert torch.equal(st2[2], inp[:, -(K - 1):])


@pytest.mark.parametrize("N", [16, 5])
@pytest.mark.parametrize("D", [40, 160])
def test_scan_fast_matches_ref(N, D):
    S = 9
    cu, slots = _rows(LENS, S, seed=N)
    u, dt, A, B, C, Dv, z, st = _scan_inputs(int(cu[-1]), D, N, S, seed=D + N)
    st_ref, st_fast = st.clone(), st.clone()
    y_ref = reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, st_ref, cu, slots)
    y_fast = numba_cpu.selective_scan_varlen_cpu(u, dt, A, B, C, Dv, z, st_fast, cu, slots)
    _close(y_fast, y_ref)
    _close(st_fast, st_ref)
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(st_fast[untouched], st[untouched])


def test_scan_without_D_and_z_and_empty_row():
    N, D, S = 16, 24, 5
    cu, slots = _rows([4, 0, 1], S, seed=3)
    u, dt, A, B, C, _, _, st = _scan_inputs(int(cu[-1]), D, N, S, seed=4)
    st_ref, st_fast = st.clone(), st.clone()
    y_ref = reference.selective_scan_varlen_ref(u, dt, A, B, C, None, None, st_ref, cu, slots)
    y_fast = numba_cpu.selective_scan_varlen_cpu(u, dt, A, B, C, None, None, st_fast, cu, slots)
    _close(y_fast, y_ref)
    _close(st_fast, st_ref)
    assert torch.equal(st_fast[slots[1]], st[slots[1]])


def test_scan_extreme_time_steps():
    # Large delta*A underflows exp to ~0 (state forgotten), tiny delta keeps it.
    N, D, S = 16, 32, 2
    cu, slots = _rows([6], S, seed=5)
    u, dt, A, B, C, Dv, z, st = _scan_inputs(6, D, N, S, seed=6)
    dt[0, : D // 2] = 200.0
    dt[1, D // 2:] = 1e-6
    st_ref, st_fast = st.clone(), st.clone()
    y_ref = reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, st_ref, cu, slots)
    y_fast = numba_cpu.selective_scan_varlen_cpu(u, dt, A, B, C, Dv, z, st_fast, cu, slots)
    _close(y_fast, y_ref)
    _close(st_fast, st_ref)


# --- chunked prefill then decode == one pass ----------------------------------

CHUNKS = [5, 1, 1, 13]


def _chunked_calls(fn_call, T_row, other_len=3):
    """Feed a row (slot 4) in CHUNKS; each call also carries another sequence's chunk
    (slot 1) before it, so the row is never at offset 0 of the packed batch."""
    outs, pos = [], 0
    for n in CHUNKS:
        outs.append(fn_call(pos, n, other_len))
        pos += n
    assert pos == T_row
    return torch.cat(outs)


@pytest.mark.parametrize("impl", ["ref", "cpu"])
@pytest.mark.parametrize("K", [3, 4])
def test_conv_chunking_invariance(impl, K):
    fn = getattr(numba_cpu if impl == "cpu" else reference, f"causal_conv1d_varlen_{impl}")
    D, S, T_row = 40, 6, sum(CHUNKS)
    x, w, b, st0 = _conv_inputs(T_row, D, K, S, seed=7)
    other = torch.randn(3, D)

    st_one = st0.clone()
    y_one = fn(x, w, b, st_one, torch.tensor([0, T_row]), torch.tensor([4]))

    st_chunk = st0.clone()

    def call(pos, n, m):
        xx = torch.cat([other[:m], x[pos:pos + n]])
        y = fn(xx, w, b, st_chunk, torch.tensor([0, m, m + n]), torch.tensor([1, 4]))
        return y[m:]

    y_chunk = _chunked_calls(call, T_row)
    if impl == "cpu":  # same operations in the same order: bit-identical
        assert torch.equal(y_chunk, y_one) and torch.equal(st_chunk[4], st_one[4])
    else:
        _close(y_chunk, y_one, atol=1e-6, rtol=1e-6)
        _close(st_chunk[4], st_one[4], atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_scan_chunking_invariance(impl):
    fn = getattr(numba_cpu if impl == "cpu" else reference, f"selective_scan_varlen_{impl}")
    D, N, S, T_row = 40, 16, 6, sum(CHUNKS)
    u, dt, A, B, C, Dv, z, st0 = _scan_inputs(T_row, D, N, S, seed=8)
    ou, odt, _, oB, oC, _, oz, _ = _scan_inputs(3, D, N, S, seed=9)

    st_one = st0.clone()
    y_one = fn(u, dt, A, B, C, Dv, z, st_one, torch.tensor([0, T_row]), torch.tensor([4]))

    st_chunk = st0.clone()

    def call(pos, n, m):
        cat = lambda o, a: torch.cat([o[:m], a[pos:pos + n]])  # noqa: E731
        y = fn(cat(ou, u), cat(odt, dt), A, cat(oB, B), cat(oC, C), Dv, cat(oz, z), st_chunk,
               torch.tensor([0, m, m + n]), torch.tensor([1, 4]))
        return y[m:]

    y_chunk = _chunked_calls(call, T_row)
    if impl == "cpu":
        assert torch.equal(y_chunk, y_one) and torch.equal(st_chunk[4], st_one[4])
    else:
        _close(y_chunk, y_one, atol=1e-6, rtol=1e-5)
        _close(st_chunk[4], st_one[4], atol=1e-6, rtol=1e-5)


# --- reduced-precision inputs --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_low_precision(dtype):
    K, D, S = 4, 40, 7
    cu, slots = _rows(LENS, S, seed=10)
    x, w, b, st = _conv_inputs(int(cu[-1]), D, K, S, seed=11, dtype=dtype)
    # The float32 computation on the same (already rounded) values.
    st32 = st.float()
    y32 = reference.causal_conv1d_varlen_ref(x.float(), w, b, st32, cu, slots)
    for fn in (numba_cpu.causal_conv1d_varlen_cpu, reference.causal_conv1d_varlen_ref):
        st_lp = st.clone()
        y = fn(x, w, b, st_lp, cu, slots)
        assert y.dtype == dtype and st_lp.dtype == dtype
        _close(y.float(), y32, atol=2e-2, rtol=2e-2)
        assert torch.equal(st_lp.float(), st32)  # states hold inputs: exact


def test_scan_bf16():
    N, D, S = 16, 40, 7
    cu, slots = _rows(LENS, S, seed=12)
    u, dt, A, B, C, Dv, z, st = _scan_inputs(int(cu[-1]), D, N, S, seed=13)
    u, B, C, z = (t.bfloat16() for t in (u, B, C, z))
    st32 = st.clone()
    y32 = reference.selective_scan_varlen_ref(u.float(), dt, A, B.float(), C.float(), Dv, z.float(), st32, cu, slots)
    for fn in (numba_cpu.selective_scan_varlen_cpu, reference.selective_scan_varlen_ref):
        st_b = st.clone()
        y = fn(u, dt, A, B, C, Dv, z, st_b, cu, slots)
        assert y.dtype == torch.bfloat16 and st_b.dtype == torch.float32
        _close(y.float(), y32, atol=3e-2, rtol=2e-2)  # output rounding to bf16 only
        _close(st_b, st32)  # states computed in float32


# --- agreement with transformers' Jamba scan ----------------------------------


def test_ref_scan_matches_transformers():
    modeling_jamba = pytest.importorskip("transformers.models.jamba.modeling_jamba")
    T, D, N = 37, 48, 16
    u, dt, A, B, C, Dv, z, _ = _scan_inputs(T, D, N, 1, seed=14)
    # transformers: (batch, D, L) / (batch, N, L) layout, scan from a zero state.
    y_hf, h_hf = modeling_jamba.mamba_selective_scan(
        u.t()[None], dt.t()[None], A, B.t()[None], C.t()[None], Dv, z.t()[None],
        delta_bias=None, delta_softplus=False, return_last_state=True,
    )
    for fn in (reference.selective_scan_varlen_ref, numba_cpu.selective_scan_varlen_cpu):
        st = torch.zeros(1, D, N)
        y = fn(u, dt, A, B, C, Dv, z, st, torch.tensor([0, T]), torch.tensor([0]))
        _close(y, y_hf[0].t(), atol=1e-5, rtol=1e-5 if fn is reference.selective_scan_varlen_ref else RTOL)
        _close(st[0], h_hf[0], atol=1e-5, rtol=1e-5 if fn is reference.selective_scan_varlen_ref else RTOL)


# --- dispatcher ---------------------------------------------------------------


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("JAMBA_KERNELS", raising=False)
    assert kernels.backend("cpu") == "numba" and kernels.backend("cuda") == "triton"  # auto
    for value, want in (("torch", "torch"), ("ref", "torch"), (" Numba ", "numba"), ("", "numba")):
        monkeypatch.setenv("JAMBA_KERNELS", value)
        assert kernels.backend("cpu") == want
    monkeypatch.setenv("JAMBA_KERNELS", "triton")
    assert kernels.backend("cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.backend("cpu") == "triton"


def test_backend_errors(monkeypatch):
    monkeypatch.setenv("JAMBA_KERNELS", "fast")
    with pytest.raises(ValueError, match="JAMBA_KERNELS='fast' is not one of auto, triton, numba, torch"):
        kernels.backend("cpu")
    monkeypatch.setenv("JAMBA_KERNELS", "numba")
    with pytest.raises(ValueError, match="CPU tensors only"):
        kernels.backend("cuda")
    monkeypatch.setenv("JAMBA_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.backend("cpu")


def test_dispatcher_uses_numba_on_cpu(monkeypatch):
    monkeypatch.delenv("JAMBA_KERNELS", raising=False)
    calls = []
    monkeypatch.setattr(numba_cpu, "causal_conv1d_varlen_cpu", lambda *a: calls.append("conv") or "conv")
    monkeypatch.setattr(numba_cpu, "selective_scan_varlen_cpu", lambda *a: calls.append("scan") or "scan")
    x = torch.zeros(1, 4)
    assert kernels.causal_conv1d_varlen(x, None, None, None, None, None) == "conv"
    assert kernels.selective_scan_varlen(x, *[None] * 9) == "scan"
    assert calls == ["conv", "scan"]


def test_env_var_selects_reference(monkeypatch):
    def boom(*a):
        raise AssertionError("fast path used")

    monkeypatch.setenv("JAMBA_KERNELS", "torch")
    monkeypatch.setattr(numba_cpu, "causal_conv1d_varlen_cpu", boom)
    monkeypatch.setattr(numba_cpu, "selective_scan_varlen_cpu", boom)
    cu, slots = _rows([2, 3], 4, seed=15)
    x, w, b, st = _conv_inputs(5, 8, 4, 4, seed=16)
    st2 = st.clone()
    _close(kernels.causal_conv1d_varlen(x, w, b, st, cu, slots),
           reference.causal_conv1d_varlen_ref(x, w, b, st2, cu, slots), atol=0, rtol=0)
    u, dt, A, B, C, Dv, z, hs = _scan_inputs(5, 8, 4, 4, seed=17)
    hs2 = hs.clone()
    _close(kernels.selective_scan_varlen(u, dt, A, B, C, Dv, z, hs, cu, slots),
           reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, hs2, cu, slots), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_state_update_matches_scan(monkeypatch, backend):
    # The decode entry point == the varlen scan over rows of one token, states at their slots.
    monkeypatch.setenv("JAMBA_KERNELS", backend)
    S, D, N = 7, 40, 16
    cu, slots = _rows([1, 1, 1], S, seed=24)
    u, dt, A, B, C, Dv, z, hs = _scan_inputs(3, D, N, S, seed=25)
    hs_ref = hs.clone()
    y = kernels.selective_state_update(hs, slots, u, dt, A, B, C, Dv, z)
    _close(y, reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, hs_ref, cu, slots))
    _close(hs, hs_ref)


def test_bad_rows_rejected():
    x, w, b, st = _conv_inputs(4, 8, 4, 4, seed=18)
    with pytest.raises(ValueError):  # duplicate slot
        numba_cpu.causal_conv1d_varlen_cpu(x, w, b, st, torch.tensor([0, 2, 4]), torch.tensor([1, 1]))
    with pytest.raises(ValueError):  # slot outside the pool
        numba_cpu.causal_conv1d_varlen_cpu(x, w, b, st, torch.tensor([0, 4]), torch.tensor([4]))
    with pytest.raises(ValueError):  # lengths don't add up to T
        numba_cpu.causal_conv1d_varlen_cpu(x, w, b, st, torch.tensor([0, 3]), torch.tensor([0]))


# --- optional mamba-ssm decode kernels, checked on CPU with stand-ins ------------------
# JAMBA_KERNELS=mamba_ssm: decode steps go to the packages' kernels, prompts to Triton
# (interpreted here: conftest sets TRITON_INTERPRET=1).


def _fake_causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    # causal_conv1d's documented semantics: conv_state (B, D, state_len >= K-1) becomes the
    # last state_len columns of [conv_state, x]; output = silu(conv over the last K).
    K = weight.shape[1]
    full = torch.cat([conv_state, x[:, :, None]], dim=-1)
    conv_state.copy_(full[:, :, -conv_state.shape[-1]:])
    out = (full[:, :, -K:] * weight).sum(-1) + (0 if bias is None else bias)
    return F.silu(out) if activation == "silu" else out


def _fake_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    # mamba_ssm's selective_state_update_ref for (batch, dim, dstate) states.
    assert dt_bias is None and not dt_softplus
    state.copy_(state * torch.exp(dt[..., None] * A) + dt[..., None] * B[:, None, :] * x[..., None])
    out = (state * C[:, None, :]).sum(-1) + x * D
    return out * F.silu(z)


def test_mamba_ssm_decode_plumbing(monkeypatch):
    monkeypatch.setenv("JAMBA_KERNELS", "mamba_ssm")
    calls = []
    ops = {
        "causal_conv1d_update": lambda *a, **k: calls.append("conv") or _fake_causal_conv1d_update(*a, **k),
        "selective_state_update": lambda *a, **k: calls.append("scan") or _fake_selective_state_update(*a, **k),
    }
    monkeypatch.setattr(mamba_ssm, "_ops", ops)
    S, D, N, K = 9, 16, 4, 4
    for lens, expect_calls in (([1, 1, 1], ["conv", "scan"]), ([2, 1], [])):  # decode / prefill
        calls.clear()
        cu, slots = _rows(lens, S, seed=19)
        T = int(cu[-1])
        x, w, b, st = _conv_inputs(T, D, K, S, seed=20)
        st_ref = st.clone()
        _close(kernels.causal_conv1d_varlen(x, w, b, st, cu, slots),
               reference.causal_conv1d_varlen_ref(x, w, b, st_ref, cu, slots))
        _close(st, st_ref)
        u, dt, A, B, C, Dv, z, hs = _scan_inputs(T, D, N, S, seed=21)
        hs_ref = hs.clone()
        _close(kernels.selective_scan_varlen(u, dt, A, B, C, Dv, z, hs, cu, slots),
               reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, hs_ref, cu, slots))
        _close(hs, hs_ref)
        assert calls == expect_calls


def test_mamba_ssm_failure_falls_back(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("conv_state must have width K")

    monkeypatch.setenv("JAMBA_KERNELS", "mamba_ssm")
    ops = {"causal_conv1d_update": broken}
    monkeypatch.setattr(mamba_ssm, "_ops", ops)
    cu, slots = _rows([1, 1], 5, seed=22)
    x, w, b, st = _conv_inputs(2, 8, 4, 5, seed=23)
    st_ref = st.clone()
    _close(kernels.causal_conv1d_varlen(x, w, b, st, cu, slots),
           reference.causal_conv1d_varlen_ref(x, w, b, st_ref, cu, slots))
    _close(st, st_ref)
    assert "causal_conv1d_update" not in ops  # not retried


def test_numba_warm_up_runs():
    numba_cpu.warm_up()

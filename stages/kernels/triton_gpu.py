"""Triton kernels for the GPU: varlen causal conv1d and the Mamba-1 selective scan over packed rows.

Same arguments and results as stages/kernels/reference.py, to float32 rounding: every row starts
from its slot's stored state and leaves its final state there, so prompt chunks, whole prompts
and decode rows mix in one launch. Arithmetic is float32 whatever the input dtype (bf16 in,
bf16 out, fp32 SSM state).

On CUDA tensors Triton compiles each kernel on first use (and keeps it in TRITON_CACHE_DIR).
With ``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run on CPU
tensors in Triton's interpreter (numpy, slow): that is how CI tests them without a GPU.

Work split (the shapes of Jamba: d_inner 8192 channels, d_state 16, conv width 4):

* conv: one program per (block of packed tokens, block of channels). Each token looks up its
  row, and reads the K-1 inputs before it either from x or, near the start of its row, from
  the row's cached conv state. A second small kernel then writes each row's new state (the last
  K-1 inputs), after every token has read the old one.
* scan: one program per (row, block of channels), holding that block's (BLOCK_D, N) state in
  registers in float32 and walking the row's tokens in order. Channels are independent, so the
  parallelism is rows x d_inner / BLOCK_D programs; a long prompt is a loop of cheap steps
  (a few loads, one exp per state, a sum over N) instead of a dozen torch launches per token.
  A decode step is the same kernel over rows of one token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .snapshots import check_snapshots, conv_snapshots


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _conv1d_varlen_kernel(
    x_ptr,  # (T, D), channels contiguous
    w_ptr,  # (D, K)
    bias_ptr,  # (D,) or unused
    state_ptr,  # (S, D, K-1) read only here
    y_ptr,  # (T, D) output, channels contiguous
    cu_ptr,  # (B+1,) int64
    slot_ptr,  # (B,) int64
    row_ptr,  # (T,) int64 row of each packed token
    T,
    D,
    stride_x_t,
    stride_w_d,
    stride_w_k,
    stride_s_slot,
    stride_s_d,
    stride_s_k,
    stride_y_t,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,) packed token indices
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,) channels
    t_ok = t < T
    d_ok = d < D
    row = tl.load(row_ptr + t, mask=t_ok, other=0)
    start = tl.load(cu_ptr + row, mask=t_ok, other=0)
    slot = tl.load(slot_ptr + row, mask=t_ok, other=0)
    pos = t - start  # (BT,) position of each token inside its row

    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        # Tap k reads the input K-1-k steps back: token p of the row, or state column K-1+p if p < 0.
        p = pos + (k - (K - 1))  # (BT,)
        in_x = p >= 0
        in_state = p < 0
        w = tl.load(w_ptr + d * stride_w_d + k * stride_w_k, mask=d_ok, other=0.0).to(tl.float32)  # (BD,)
        src = tl.where(in_x, t + (k - (K - 1)), 0).to(tl.int64)  # (BT,) clamped: masked lanes stay in bounds
        xv = tl.load(x_ptr + src[:, None] * stride_x_t + d[None, :],
                     mask=(t_ok & in_x)[:, None] & d_ok[None, :], other=0.0)
        col = tl.where(in_state, p + (K - 1), 0)
        sv = tl.load(state_ptr + slot[:, None] * stride_s_slot + d[None, :] * stride_s_d + col[:, None] * stride_s_k,
                     mask=(t_ok & in_state)[:, None] & d_ok[None, :], other=0.0)
        acc += w[None, :] * (xv.to(tl.float32) + sv.to(tl.float32))  # one of xv, sv is 0
    y = acc / (1.0 + tl.exp(-acc))  # SiLU (tl.sigmoid is the same, but a slow nested call when interpreted)
    tl.store(y_ptr + t.to(tl.int64)[:, None] * stride_y_t + d[None, :], y.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _conv_state_kernel(
    x_ptr,  # (T, D), channels contiguous
    state_ptr,  # (S, D, K-1) updated in place
    cu_ptr,  # (B+1,) int64
    slot_ptr,  # (B,) int64
    D,
    stride_x_t,
    stride_s_slot,
    stride_s_d,
    stride_s_k,
    K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,  # K-1 rounded up to a power of two
):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    j = tl.arange(0, BLOCK_W)  # (BW,) state column
    start = tl.load(cu_ptr + b)
    L = tl.load(cu_ptr + b + 1) - start
    slot = tl.load(slot_ptr + b)
    # New column j is entry L+j of concat(old state, row's x): still old state if L+j < K-1.
    src = L + j  # (BW,)
    from_state = src < K - 1
    ok = (d < D)[:, None] & (j < K - 1)[None, :]  # (BD, BW)
    base = state_ptr + slot * stride_s_slot + d[:, None] * stride_s_d  # (BD, 1)
    old = tl.load(base + tl.where(from_state, src, 0)[None, :] * stride_s_k, mask=ok & from_state[None, :], other=0.0)
    tok = tl.where(from_state, 0, start + src - (K - 1))  # (BW,) packed token index
    xv = tl.load(x_ptr + tok[None, :] * stride_x_t + d[:, None], mask=ok & (src >= K - 1)[None, :], other=0.0)
    new = tl.where(from_state[None, :], old, xv.to(state_ptr.dtype.element_ty))
    tl.store(base + j[None, :] * stride_s_k, new, mask=ok)  # an empty row writes back its old state, bit for bit


@triton.jit(do_not_specialize=["n_snap"])
def _selective_scan_varlen_kernel(
    u_ptr,  # (T, D)
    delta_ptr,  # (T, D)
    A_ptr,  # (D, N)
    B_ptr,  # (T, N)
    C_ptr,  # (T, N)
    D_ptr,  # (D,) or unused
    z_ptr,  # (T, D) or unused
    state_ptr,  # (S, D, N) float32, updated in place
    y_ptr,  # (T, D) output
    cu_ptr,  # (B+1,) int64
    slot_ptr,  # (B,) int64
    snap_tok_ptr,  # (K',) int64 ascending packed token indices, or unused
    snap_dst_ptr,  # (K',) int64 slots the snapshots go to, or unused
    snap_first_ptr,  # (B,) int64 index of each row's first snapshot (K' if none after its start), or unused
    n_snap,
    Dm,
    N,
    stride_u_t,
    stride_dt_t,
    stride_A_d,
    stride_B_t,
    stride_C_t,
    stride_z_t,
    stride_s_slot,
    stride_s_d,
    stride_y_t,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SNAP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    n = tl.arange(0, BLOCK_N)  # (BN,)
    d_ok = d < Dm
    n_ok = n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]  # (BD, BN)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    slot = tl.load(slot_ptr + b)

    A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :], mask=dn_ok, other=0.0).to(tl.float32)  # (BD, BN)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + slot * stride_s_slot + d[:, None] * stride_s_d + n[None, :]
    h = tl.load(s_ptrs, mask=dn_ok, other=0.0).to(tl.float32)  # (BD, BN) the row's state so far
    if HAS_SNAP:  # the row's next snapshot: its token (-1: none left) and destination slot
        s_off = d[:, None] * stride_s_d + n[None, :]  # (BD, BN)
        k = tl.load(snap_first_ptr + b)
        snap_t = tl.load(snap_tok_ptr + k, mask=k < n_snap, other=-1)
        snap_s = tl.load(snap_dst_ptr + k, mask=k < n_snap, other=0)
    # Pointers to the row's first token; each step moves them on by one token.
    dt_p = delta_ptr + start * stride_dt_t + d  # (BD,)
    u_p = u_ptr + start * stride_u_t + d
    z_p = z_ptr + start * stride_z_t + d
    y_p = y_ptr + start * stride_y_t + d
    B_p = B_ptr + start * stride_B_t + n  # (BN,)
    C_p = C_ptr + start * stride_C_t + n
    for t in range(start, end):
        dt = tl.load(dt_p, mask=d_ok, other=0.0).to(tl.float32)  # (BD,)
        ut = tl.load(u_p, mask=d_ok, other=0.0).to(tl.float32)
        Bt = tl.load(B_p, mask=n_ok, other=0.0).to(tl.float32)  # (BN,)
        Ct = tl.load(C_p, mask=n_ok, other=0.0).to(tl.float32)
        # h = exp(delta*A) * h + delta*u*B ;  y = h @ C (+ D*u) (* silu(z))
        h = tl.exp(dt[:, None] * A) * h + (dt * ut)[:, None] * Bt[None, :]
        yt = tl.sum(h * Ct[None, :], axis=1)  # (BD,)
        if HAS_D:
            yt += ut * Dv
        if HAS_Z:
            zt = tl.load(z_p, mask=d_ok, other=0.0).to(tl.float32)
            yt = yt * (zt / (1.0 + tl.exp(-zt)))  # silu(z)
        tl.store(y_p, yt.to(y_ptr.dtype.element_ty), mask=d_ok)
        if HAS_SNAP:
            if snap_t == t:  # h after token t is the row's next snapshot
                tl.store(state_ptr + snap_s * stride_s_slot + s_off, h.to(state_ptr.dtype.element_ty), mask=dn_ok)
                k += 1
                snap_t = tl.load(snap_tok_ptr + k, mask=k < n_snap, other=-1)
                snap_s = tl.load(snap_dst_ptr + k, mask=k < n_snap, other=0)
        dt_p += stride_dt_t
        u_p += stride_u_t
        z_p += stride_z_t
        y_p += stride_y_t
        B_p += stride_B_t
        C_p += stride_C_t
    tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=dn_ok)


# ---------------------------------------------------------------------------
# Wrappers: torch tensors in and out
# ---------------------------------------------------------------------------

# Block sizes. On a GPU small blocks give many programs (a single long prompt still spreads over
# d_inner / 32 programs). The interpreter runs programs one after another in Python, so there
# one program covers up to 8192 channels (and 64 tokens of the conv), trimmed to the problem;
# results do not depend on the block sizes.
_GPU = dict(conv_t=16, conv_d=128, scan_d=32, scan_warps=1)
_INTERPRETER = dict(conv_t=64, conv_d=8192, scan_d=8192, scan_warps=1)


def _blocks(t: torch.Tensor, T: int, D: int) -> dict:
    if t.is_cuda:
        return _GPU
    b = _INTERPRETER
    T2, D2 = triton.next_power_of_2(max(T, 1)), triton.next_power_of_2(D)
    return dict(b, conv_t=min(b["conv_t"], T2), conv_d=min(b["conv_d"], D2), scan_d=min(b["scan_d"], D2))


def _kernel_out(t: torch.Tensor, shape) -> torch.Tensor:
    """The kernel's output buffer: t's dtype on a GPU. Interpreted, float32, rounded by torch
    afterwards: the interpreter's float32 -> bf16 cast truncates, where a GPU rounds to nearest even."""
    return torch.empty(shape, device=t.device, dtype=t.dtype if t.is_cuda else torch.float32)


def _rows_last(t: torch.Tensor) -> torch.Tensor:
    """t with a unit stride along its last axis (the kernels index channels directly)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _index(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int64).contiguous()


def causal_conv1d_varlen_triton(x, weight, bias, conv_states, cu_seqlens, slots, snap_tok=None, snap_dst=None
                                ) -> torch.Tensor:
    """Triton version of `causal_conv1d_varlen_ref`; same arguments."""
    T, D = x.shape
    K = weight.shape[1]
    if weight.shape[0] != D or K < 2:
        raise ValueError(f"weight must be (D={D}, K>=2), got {tuple(weight.shape)}")
    if conv_states.dim() != 3 or conv_states.shape[1:] != (D, K - 1):
        raise ValueError(f"conv_states must be (S, {D}, {K - 1}), got {tuple(conv_states.shape)}")
    x = _rows_last(x)
    cu, sl = _index(cu_seqlens, x.device), _index(slots, x.device)
    snaps = check_snapshots(snap_tok, snap_dst, T, conv_states.shape[0], slots)
    if T == 0:
        return torch.empty_like(x)
    if snaps is not None:  # from the rows' stored states, before the kernels update them
        snap = conv_snapshots(x, conv_states, cu, sl, snaps[0])
    y = _kernel_out(x, (T, D))
    # Row of each packed token: how many row ends lie at or before it (empty rows included).
    tok = torch.arange(T, device=x.device, dtype=torch.int64)
    row = torch.searchsorted(cu[1:], tok, right=True)  # (T,)
    blk = _blocks(x, T, D)
    has_bias = bias is not None
    _conv1d_varlen_kernel[(triton.cdiv(T, blk["conv_t"]), triton.cdiv(D, blk["conv_d"]))](
        x, weight, bias if has_bias else weight, conv_states, y, cu, sl, row,
        T, D, x.stride(0), weight.stride(0), weight.stride(1),
        conv_states.stride(0), conv_states.stride(1), conv_states.stride(2), y.stride(0),
        K=K, HAS_BIAS=has_bias, BLOCK_T=blk["conv_t"], BLOCK_D=blk["conv_d"],
    )
    # After every token has read the old states (same stream, so in order).
    _conv_state_kernel[(sl.shape[0], triton.cdiv(D, blk["conv_d"]))](
        x, conv_states, cu, sl, D, x.stride(0),
        conv_states.stride(0), conv_states.stride(1), conv_states.stride(2),
        K=K, BLOCK_D=blk["conv_d"], BLOCK_W=triton.next_power_of_2(K - 1),
    )
    if snaps is not None:
        conv_states.index_copy_(0, snaps[1].to(conv_states.device), snap)
    return y.to(x.dtype)


def selective_scan_varlen_triton(u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots, snap_tok=None, snap_dst=None
                                 ) -> torch.Tensor:
    """Triton version of `selective_scan_varlen_ref`; same arguments."""
    T, Dm = u.shape
    N = A.shape[1]
    if A.shape[0] != Dm or delta.shape != u.shape or B.shape != (T, N) or C.shape != (T, N):
        raise ValueError("shape mismatch: need u, delta (T, D); A (D, N); B, C (T, N)")
    if z is not None and z.shape != u.shape:
        raise ValueError("z must have u's shape (T, D)")
    if ssm_states.dim() != 3 or ssm_states.shape[1:] != (Dm, N) or ssm_states.stride(2) != 1:
        raise ValueError(f"ssm_states must be (S, {Dm}, {N}) with unit last stride, got {tuple(ssm_states.shape)}")
    u, delta, A, B, C = (_rows_last(t) for t in (u, delta, A, B, C))
    z = None if z is None else _rows_last(z)
    cu, sl = _index(cu_seqlens, u.device), _index(slots, u.device)
    snaps = check_snapshots(snap_tok, snap_dst, T, ssm_states.shape[0], slots)
    nrows = sl.shape[0]
    if nrows == 0 or T == 0:
        return torch.empty_like(u)
    if snaps is None:
        snap_tok_d = snap_dst_d = snap_first = sl  # not read
        n_snap = 0
    else:
        snap_tok_d, snap_dst_d = (s.to(u.device) for s in snaps)
        snap_first = torch.searchsorted(snap_tok_d, cu[:-1])  # (B,) first snapshot at or after each row's start
        n_snap = snap_tok_d.shape[0]
    y = _kernel_out(u, (T, Dm))
    blk = _blocks(u, T, Dm)
    _selective_scan_varlen_kernel[(nrows, triton.cdiv(Dm, blk["scan_d"]))](
        u, delta, A, B, C, u if D is None else D, u if z is None else z, ssm_states, y, cu, sl,
        snap_tok_d, snap_dst_d, snap_first, n_snap,
        Dm, N, u.stride(0), delta.stride(0), A.stride(0), B.stride(0), C.stride(0),
        0 if z is None else z.stride(0), ssm_states.stride(0), ssm_states.stride(1), y.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_SNAP=snaps is not None,
        BLOCK_D=blk["scan_d"], BLOCK_N=triton.next_power_of_2(N), num_warps=blk["scan_warps"],
    )
    return y.to(u.dtype)


def selective_state_update_triton(ssm_states, slots, u, delta, A, B, C, D, z) -> torch.Tensor:
    """One decode step per row (u (B, D)), state indexed by slot: the scan over rows of one token."""
    cu = torch.arange(u.shape[0] + 1, device=u.device, dtype=torch.int64)
    return selective_scan_varlen_triton(u, delta, A, B, C, D, z, ssm_states, cu, slots)

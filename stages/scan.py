"""Mamba-1 mixer kernels for Jamba: causal depthwise conv1d and the selective scan.

Both kernels work on *packed variable-length rows*, the layout vLLM calls
"varlen".  One forward call processes B rows (sequences) whose tokens are
concatenated along the first axis into T tokens::

    x          (T, D)       row b owns tokens cu_seqlens[b] : cu_seqlens[b+1]
    cu_seqlens (B+1,) int64 cumulative row lengths, cu_seqlens[0] = 0, cu_seqlens[B] = T
    slots      (B,)   int64 row b's recurrent state lives at index slots[b] of a state pool

A row may be one token (decode) or many (a prefill chunk), and rows of
different lengths mix freely in one call.  The recurrent states sit in fixed
pools of S slots and are updated in place, so a sequence can be fed in chunks
over several calls (chunked prefill, then decode) and every call is exactly
equivalent to processing each row alone, in one pass, from its stored state.
Slots must be distinct within a call (two rows writing the same state would
be a scheduling bug).

The state pools::

    conv_states (S, D, K-1)  the last K-1 conv *inputs* of the sequence so far,
                             oldest first, same dtype as x (zeros when fresh)
    ssm_states  (S, D, N)    the SSM hidden state h, float32

The file reads top to bottom:

1. reference implementations in plain torch (Python loops over rows and
   time); they define the semantics and are what the tests trust;
2. numba kernels for the CPU (parallel over channel blocks);
3. the public dispatchers ``causal_conv1d_varlen`` / ``selective_scan_varlen``
   which pick numba on CPU, the mamba_ssm / causal_conv1d CUDA kernels for
   the decode case on GPU when those packages are importable, and the
   reference otherwise.  ``JAMBA_KERNELS=ref`` forces the reference.

All arithmetic is float32 whatever the input dtype (bf16/fp16 inputs are
upcast); outputs come back in the input's dtype.

numba compiles each kernel on its first call (seconds) and caches the machine
code in stages/__pycache__; call ``warmup()`` at worker start.  The kernels use
min(torch.get_num_threads(), NUMBA_NUM_THREADS) threads.  numba's OpenMP pool
and torch's are separate runtimes: if both spin on a small machine, setting
OMP_WAIT_POLICY=PASSIVE for the worker process avoids them starving each other.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

try:  # a declared dependency; importing it compiles nothing.  Without it we use the reference.
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - exercised only on broken installs
    numba = None
    prange = range

logger = logging.getLogger(__name__)

__all__ = [
    "causal_conv1d_varlen",
    "causal_conv1d_varlen_ref",
    "causal_conv1d_varlen_cpu",
    "selective_scan_varlen",
    "selective_scan_varlen_ref",
    "selective_scan_varlen_cpu",
    "warmup",
]


# ---------------------------------------------------------------------------
# 1. Reference implementations (plain torch, obviously correct, slow)
# ---------------------------------------------------------------------------


def causal_conv1d_varlen_ref(
    x: torch.Tensor,  # (T, D)
    weight: torch.Tensor,  # (D, K)
    bias: torch.Tensor | None,  # (D,)
    conv_states: torch.Tensor,  # (S, D, K-1), updated in place
    cu_seqlens: torch.Tensor,  # (B+1,) int64
    slots: torch.Tensor,  # (B,) int64
) -> torch.Tensor:  # (T, D), x's dtype
    """Causal depthwise conv of width K followed by SiLU, per row, from the stored state.

    For row b the conv input is concat(conv_states[slots[b]], x[row]) along
    time, and y[t] = silu(bias + sum_k weight[:, k] * input[t + k]) for every
    new token t -- i.e. ``F.conv1d(input, weight.unsqueeze(1), bias, groups=D)``
    with no padding.  The state becomes the last K-1 entries of that input.
    """
    T, D = x.shape
    K = weight.shape[1]
    assert K >= 2, "conv width must be at least 2"
    w = weight.float().unsqueeze(1)  # (D, 1, K): depthwise filters for F.conv1d
    b_ = None if bias is None else bias.float()
    y = torch.empty_like(x)
    cu = cu_seqlens.tolist()
    for b, slot in enumerate(slots.tolist()):
        start, end = cu[b], cu[b + 1]
        if end == start:  # an empty row leaves its state alone
            continue
        inp = torch.cat([conv_states[slot].float(), x[start:end].float().t()], dim=1)  # (D, K-1+L)
        out = F.conv1d(inp.unsqueeze(0), w, b_, groups=D)[0]  # (D, L)
        y[start:end] = F.silu(out).t().to(x.dtype)
        conv_states[slot] = inp[:, -(K - 1):].to(conv_states.dtype)
    return y


def selective_scan_varlen_ref(
    u: torch.Tensor,  # (T, D) conv output
    delta: torch.Tensor,  # (T, D) final time step (softplus + bias already applied)
    A: torch.Tensor,  # (D, N) negative
    B: torch.Tensor,  # (T, N)
    C: torch.Tensor,  # (T, N)
    D: torch.Tensor | None,  # (D,) skip
    z: torch.Tensor | None,  # (T, D) gate
    ssm_states: torch.Tensor,  # (S, D, N) float32, updated in place
    cu_seqlens: torch.Tensor,  # (B+1,) int64
    slots: torch.Tensor,  # (B,) int64
) -> torch.Tensor:  # (T, D), u's dtype
    """Mamba-1 selective scan, token by token, from the stored state.

    Same arithmetic as transformers' ``mamba_selective_scan`` recurrent path
    (Jamba slow path), plus an initial state and varlen rows::

        h      = exp(delta[t] * A) * h + (delta[t] * B[t]) * u[t]     # (D, N)
        y[t]   = h @ C[t] + D * u[t]
        y[t]  *= silu(z[t])
    """
    A = A.float()
    Dv = None if D is None else D.float()
    y = torch.empty_like(u)
    cu = cu_seqlens.tolist()
    for b, slot in enumerate(slots.tolist()):
        h = ssm_states[slot].float().clone()  # (D, N)
        for t in range(cu[b], cu[b + 1]):
            dt = delta[t].float()  # (D,)
            ut = u[t].float()  # (D,)
            dA = torch.exp(dt[:, None] * A)  # (D, N) discretized A
            dBu = (dt[:, None] * B[t].float()[None, :]) * ut[:, None]  # (D, N) discretized B times input
            h = dA * h + dBu
            yt = h @ C[t].float()  # (D,)
            if Dv is not None:
                yt = yt + ut * Dv
            if z is not None:
                yt = yt * F.silu(z[t].float())
            y[t] = yt.to(u.dtype)
        ssm_states[slot] = h.to(ssm_states.dtype)
    return y


# ---------------------------------------------------------------------------
# 2. numba CPU kernels
#
# Both kernels parallelise over blocks of channels (prange) and loop over the
# rows and tokens inside a block.  Every block does the same work for every
# row, so threads stay balanced whatever the mix of prefill and decode rows,
# and no two threads ever touch the same state entries.  The innermost loops
# run over the contiguous channels of one token (1-D slices of the (T, D)
# arrays), which LLVM vectorises; that is why the SSM state of a block is
# kept transposed, (N, block), in a local array.
#
# Cost: the scan needs T*D*N exponentials.  np.exp in a numba loop is a
# scalar libm call that blocks vectorisation, so `_exp2` below is a float32
# 2**y made of plain arithmetic and a bit cast, which vectorises; the scan
# feeds it A * log2(e) (precomputed) so that exp(delta*A) = 2**(delta * A2).
# fastmath stays off (no reassociation: results are deterministic and sums
# run in the reference's order); fused multiply-adds are written explicitly
# with `_fma` where we want them (they round once, so they are at least as
# accurate as the separate multiply and add of the reference).
# ---------------------------------------------------------------------------


def _njit(**kwargs):
    """numba.njit if numba is installed, else identity (the dispatcher then uses the reference)."""
    if numba is None:  # pragma: no cover
        return lambda f: f
    return numba.njit(**kwargs)


# error_model="numpy": float division without Python's ZeroDivisionError checks,
# which would otherwise stop the loops from vectorising.
_INLINE_OPTS = dict(inline="always", fastmath=False, cache=True, error_model="numpy")
_KERNEL_OPTS = dict(parallel=True, fastmath=False, cache=True, nogil=True, error_model="numpy")

if numba is not None:
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _fma(typingctx, a, b, c):
        """a * b + c with a single rounding (llvm.fma; one vfmadd instruction)."""
        if not (a == b == c and isinstance(a, numba.types.Float)):
            return None

        def codegen(context, builder, sig, args):
            return builder.fma(*args)

        return a(a, b, c), codegen

else:  # pragma: no cover

    def _fma(a, b, c):
        return a * b + c


# Constants are np.float32 so numba keeps the arithmetic in float32 (a Python
# float literal would promote to float64 and halve the vector width).
_F32 = np.float32
_ONE = _F32(1.0)
_ZERO = _F32(0.0)
_LOG2E = _F32(1.4426950408889634)  # log2(e): exp(x) = 2**(x * log2(e))
# 2**f = exp(f ln2) for |f| <= 1/2 by its Taylor polynomial of degree 6 (error < 2e-7 relative).
_P0, _P1, _P2, _P3, _P4, _P5, _P6 = (_F32(math.log(2) ** k / math.factorial(k)) for k in range(7))
# Adding 1.5 * 2**23 to |y| < 2**22 rounds y to the nearest integer n (round-to-nearest-even,
# the default FP mode) and leaves n in the low mantissa bits of the sum.
_ROUND_MAGIC = _F32(12582912.0)
# Clamp y so that 2**n stays a normal float32: 2**-126 ~ 1.2e-38 instead of a denormal or 0,
# 2**126 ~ 8.5e37 instead of inf.  Far below / above anything that matters after
# multiplying by a state or adding 1 in silu.
_EXP2_LO = _F32(-126.0)
_EXP2_HI = _F32(126.0)
_I127 = np.int32(127)
_I23 = np.int32(23)


@_njit(**_INLINE_OPTS)
def _exp2(y):
    """float32 2**y, vectorisable, relative error ~2e-7 (1-2 ulp)."""
    y = min(max(y, _EXP2_LO), _EXP2_HI)
    k = y + _ROUND_MAGIC  # the one rounding step: k's low mantissa bits hold n = round(y)
    f = y - (k - _ROUND_MAGIC)  # k - MAGIC == n and y - n are exact: y = n + f, |f| <= 1/2
    p = _fma(_fma(_fma(_fma(_fma(_fma(_P6, f, _P5), f, _P4), f, _P3), f, _P2), f, _P1), f, _P0)  # 2**f
    # 2**n as float32 bits: exponent field n + 127.  Shifting by 23 also drops the magic
    # number's own exponent bits, so k's bit pattern can be used directly.
    two_n = np.int32((np.float32(k).view(np.int32) + _I127) << _I23).view(np.float32)
    return p * two_n


@_njit(**_INLINE_OPTS)
def _silu(x):
    return x / (_ONE + _exp2(-x * _LOG2E))


@_njit(cache=True, error_model="numpy")
def _check_rows(cu, slots, T, S):
    """Validate cu_seqlens / slots once per call (the kernels do no bounds checks)."""
    nrows = slots.shape[0]
    if cu.shape[0] != nrows + 1:
        raise ValueError("cu_seqlens must have len(slots) + 1 entries")
    if cu[0] != 0 or cu[nrows] != T:
        raise ValueError("cu_seqlens must start at 0 and end at the number of tokens")
    seen = np.zeros(S, np.bool_)
    for b in range(nrows):
        if cu[b + 1] < cu[b]:
            raise ValueError("cu_seqlens must be non-decreasing")
        s = slots[b]
        if s < 0 or s >= S:
            raise ValueError("slot index out of range of the state pool")
        if seen[s]:
            raise ValueError("slots must be distinct within a call")
        seen[s] = True


@_njit(**_KERNEL_OPTS)
def _conv_varlen_kernel(x, weight, bias, states, cu, slots, y, block):
    """Causal conv + SiLU over packed rows; float32 everywhere.

    x (T, D), weight (D, K), bias (D,), states (S, D, K-1) in place, cu (B+1,),
    slots (B,), y (T, D) output, block = channels per parallel task.
    """
    T, D = x.shape
    K = weight.shape[1]
    W = K - 1  # state width
    nrows = slots.shape[0]
    nblocks = (D + block - 1) // block
    for c in prange(nblocks):
        d0 = c * block
        nd = min(block, D - d0)
        # Per-task scratch, allocated once and reused for all rows and tokens.
        acc = np.empty(nd, np.float32)  # (block,) conv accumulator for one token
        wT = np.empty((K, nd), np.float32)  # (K, block) this block's taps, channels contiguous
        for k in range(K):
            for j in range(nd):
                wT[k, j] = weight[d0 + j, k]
        bias_c = bias[d0:d0 + nd]
        for b in range(nrows):
            start = cu[b]
            L = cu[b + 1] - start
            st = states[slots[b], d0:d0 + nd]  # (block, K-1) this row's state for these channels
            # (a) the first min(L, K-1) tokens: their window reaches back into the stored
            #     state.  Window position p < 0 means state column W + p.  Decode rows live
            #     entirely here.
            for t in range(min(L, W)):
                for j in range(nd):
                    acc[j] = bias_c[j]
                for k in range(K):
                    p = t + k - W
                    wk = wT[k]
                    if p < 0:
                        col = W + p
                        for j in range(nd):
                            acc[j] = _fma(wk[j], st[j, col], acc[j])
                    else:
                        xp = x[start + p, d0:d0 + nd]
                        for j in range(nd):
                            acc[j] = _fma(wk[j], xp[j], acc[j])
                yt = y[start + t, d0:d0 + nd]
                for j in range(nd):
                    yt[j] = _silu(acc[j])
            # (b) the rest of the row: the window lies inside x; vectorised over channels.
            for t in range(W, L):
                first = start + t - W  # token index of the oldest input in the window
                for j in range(nd):
                    acc[j] = bias_c[j]
                for k in range(K):
                    xk = x[first + k, d0:d0 + nd]
                    wk = wT[k]
                    for j in range(nd):
                        acc[j] = _fma(wk[j], xk[j], acc[j])
                yt = y[start + t, d0:d0 + nd]
                for j in range(nd):
                    yt[j] = _silu(acc[j])
            # (c) new state = last K-1 entries of concat(state, x_row).  Entry q of the
            #     concatenation is state[q] if q < W else x[start + q - W].  Going i upward
            #     only reads state columns q = L + i >= i not yet overwritten (shift left).
            for i in range(W):
                q = L + i
                if q < W:
                    for j in range(nd):
                        st[j, i] = st[j, q]
                else:
                    xq = x[start + q - W, d0:d0 + nd]
                    for j in range(nd):
                        st[j, i] = xq[j]


@_njit(**_KERNEL_OPTS)
def _scan_varlen_kernel(u, delta, A, B, C, Dskip, z, gate, states, cu, slots, y, block):
    """Selective scan over packed rows; float32 everywhere.

    u, delta, z, y (T, D); A (D, N); B, C (T, N); Dskip (D,); gate: multiply by silu(z)
    or not; states (S, D, N) in place; cu (B+1,), slots (B,); block = channels per task.
    """
    T, D = u.shape
    N = A.shape[1]
    nrows = slots.shape[0]
    nblocks = (D + block - 1) // block
    for c in prange(nblocks):
        d0 = c * block
        nd = min(block, D - d0)
        # Per-task scratch, allocated once and reused for every row and token.
        h = np.empty((N, nd), np.float32)  # (N, block) state of one row, channels contiguous
        acc = np.empty(nd, np.float32)  # (block,) y accumulator for one token
        dtu = np.empty(nd, np.float32)  # (block,) delta * u for one token
        a2 = np.empty((N, nd), np.float32)  # (N, block) A * log2(e): exp(delta*A) = 2**(delta*a2)
        for j in range(nd):
            for n in range(N):
                a2[n, j] = A[d0 + j, n] * _LOG2E
        D_c = Dskip[d0:d0 + nd]
        for b in range(nrows):
            start = cu[b]
            end = cu[b + 1]
            if end == start:
                continue
            st = states[slots[b], d0:d0 + nd]  # (block, N) this row's state for these channels
            for n in range(N):  # load it transposed
                hn = h[n]
                for j in range(nd):
                    hn[j] = st[j, n]
            for t in range(start, end):
                dt_t = delta[t, d0:d0 + nd]
                u_t = u[t, d0:d0 + nd]
                for j in range(nd):
                    dtu[j] = dt_t[j] * u_t[j]
                    acc[j] = _ZERO
                for n in range(N):
                    Bn = B[t, n]
                    Cn = C[t, n]
                    hn = h[n]
                    a2n = a2[n]
                    for j in range(nd):  # vectorised: one lane per channel
                        # h = exp(delta*A) * h + delta*u*B ;  y += h * C  (n in order 0..N-1)
                        hv = _fma(_exp2(dt_t[j] * a2n[j]), hn[j], dtu[j] * Bn)
                        hn[j] = hv
                        acc[j] = _fma(hv, Cn, acc[j])
                y_t = y[t, d0:d0 + nd]
                if gate:
                    z_t = z[t, d0:d0 + nd]
                    for j in range(nd):
                        y_t[j] = (acc[j] + u_t[j] * D_c[j]) * _silu(z_t[j])
                else:
                    for j in range(nd):
                        y_t[j] = acc[j] + u_t[j] * D_c[j]
            for n in range(N):  # store it back
                hn = h[n]
                for j in range(nd):
                    st[j, n] = hn[j]


# ---------------------------------------------------------------------------
# 3. CPU wrappers and dispatchers
# ---------------------------------------------------------------------------


def _np32(t: torch.Tensor) -> np.ndarray:
    """A float32, C-contiguous numpy view of t; copies only if t is not already so."""
    if t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad:
        return t.numpy()  # shares memory, ~1 us
    return t.detach().to(torch.float32).contiguous().numpy()


def _np64(t: torch.Tensor) -> np.ndarray:
    """An int64 numpy view of an index tensor (cu_seqlens, slots)."""
    if t.dtype == torch.int64 and t.is_cpu and t.is_contiguous():
        return t.detach().numpy()
    return t.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()


# Below this many inner-loop element updates (~30 us of work on one core) a call runs on
# the calling thread only: waking the thread pool would cost more than it saves.
_MIN_PARALLEL_WORK = 1 << 16


def _set_numba_threads(work: int) -> int:
    # Follow torch's thread setting so the two runtimes don't oversubscribe the cores.
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if work < _MIN_PARALLEL_WORK:
        n = 1
    numba.set_num_threads(n)
    return n


def _block_size(D: int, nthreads: int) -> int:
    """Channels per parallel task: a multiple of 16 (vector width), about two tasks per
    thread, at most 256 (then a (16, 256) float32 state block and A block fill L1)."""
    block = D // (2 * nthreads)
    return max(16, min(256, block - block % 16))


class _PoolView:
    """The state pool as a float32 contiguous numpy array the kernel may write to.

    If the pool already is float32 and contiguous the kernel writes into it directly.
    Otherwise (e.g. bf16 conv states) the rows' slots are gathered into a float32
    scratch pool indexed 0..B-1 and written back, rounded to the pool's dtype, by commit().
    """

    def __init__(self, pool: torch.Tensor, slots: np.ndarray):
        self.pool = pool
        self.direct = pool.dtype == torch.float32 and pool.is_contiguous() and not pool.requires_grad
        if self.direct:
            self.array = pool.numpy()
            self.slots = slots
        else:
            self.idx = torch.from_numpy(slots)
            self.scratch = pool.detach().index_select(0, self.idx).to(torch.float32).contiguous()
            self.array = self.scratch.numpy()
            self.slots = np.arange(len(slots), dtype=np.int64)

    def commit(self) -> None:
        if not self.direct:
            with torch.no_grad():
                self.pool.index_copy_(0, self.idx, self.scratch.to(self.pool.dtype))


def causal_conv1d_varlen_cpu(x, weight, bias, conv_states, cu_seqlens, slots) -> torch.Tensor:
    """numba version of `causal_conv1d_varlen_ref` (CPU tensors only); same arguments."""
    T, D = x.shape
    K = weight.shape[1]
    if weight.shape[0] != D or K < 2:
        raise ValueError(f"weight must be (D={D}, K>=2), got {tuple(weight.shape)}")
    if conv_states.dim() != 3 or conv_states.shape[1:] != (D, K - 1):
        raise ValueError(f"conv_states must be (S, {D}, {K - 1}), got {tuple(conv_states.shape)}")
    nthreads = _set_numba_threads(T * D * K)
    cu, sl = _np64(cu_seqlens), _np64(slots)
    _check_rows(cu, sl, T, conv_states.shape[0])

    bias_np = np.zeros(D, np.float32) if bias is None else _np32(bias)  # (D,)
    pool = _PoolView(conv_states, sl)
    y = torch.empty((T, D), dtype=torch.float32)
    _conv_varlen_kernel(_np32(x), _np32(weight), bias_np, pool.array, cu, pool.slots, y.numpy(),
                        _block_size(D, nthreads))
    pool.commit()
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def selective_scan_varlen_cpu(u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots) -> torch.Tensor:
    """numba version of `selective_scan_varlen_ref` (CPU tensors only); same arguments."""
    T, Dm = u.shape
    N = A.shape[1]
    if A.shape[0] != Dm or delta.shape != u.shape or B.shape != (T, N) or C.shape != (T, N):
        raise ValueError("shape mismatch: need u, delta (T, D); A (D, N); B, C (T, N)")
    if z is not None and z.shape != u.shape:
        raise ValueError("z must have u's shape (T, D)")
    if ssm_states.dim() != 3 or ssm_states.shape[1:] != (Dm, N):
        raise ValueError(f"ssm_states must be (S, {Dm}, {N}), got {tuple(ssm_states.shape)}")
    nthreads = _set_numba_threads(T * Dm * N)
    cu, sl = _np64(cu_seqlens), _np64(slots)
    _check_rows(cu, sl, T, ssm_states.shape[0])

    u_np = _np32(u)  # (T, D)
    D_np = np.zeros(Dm, np.float32) if D is None else _np32(D)  # (D,)
    gate = z is not None
    z_np = _np32(z) if gate else u_np  # (T, D); not read when gate is False
    pool = _PoolView(ssm_states, sl)
    y = torch.empty((T, Dm), dtype=torch.float32)
    _scan_varlen_kernel(u_np, _np32(delta), _np32(A), _np32(B), _np32(C), D_np, z_np, gate,
                        pool.array, cu, pool.slots, y.numpy(), _block_size(Dm, nthreads))
    pool.commit()
    return y if u.dtype == torch.float32 else y.to(u.dtype)


# --- CUDA: optional mamba_ssm / causal_conv1d kernels, imported lazily --------

_cuda_ops: dict | None = None


def _load_cuda_ops() -> dict:
    """Import the optional CUDA kernels once; missing ones are simply absent."""
    global _cuda_ops
    if _cuda_ops is None:
        ops = {}
        try:
            from causal_conv1d import causal_conv1d_update

            ops["causal_conv1d_update"] = causal_conv1d_update
        except Exception as e:  # ImportError, or a broken CUDA extension
            logger.info("causal_conv1d unavailable (%s); using the torch reference on CUDA", e)
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update

            ops["selective_state_update"] = selective_state_update
        except Exception as e:
            logger.info("mamba_ssm unavailable (%s); using the torch reference on CUDA", e)
        _cuda_ops = ops
    return _cuda_ops


def _all_rows_single_token(cu_seqlens: torch.Tensor, T: int) -> bool:
    B = cu_seqlens.shape[0] - 1
    if T != B:
        return False
    # T == B still allows a 0-length row next to a 2-token one, so check exactly.
    return bool(torch.equal(cu_seqlens.to("cpu", torch.int64), torch.arange(B + 1, dtype=torch.int64)))


def _call_cuda_op(name: str, *args, **kwargs):
    """Run an optional CUDA kernel; None if it is missing or rejects the call.

    A rejection (e.g. an older causal_conv1d that wants a width-K conv_state) is logged
    once and the op is dropped, so later calls go straight to the reference.  Callers
    pass copies of the states, so a failed call leaves the pools untouched.
    """
    fn = _load_cuda_ops().get(name)
    if fn is None:
        return None
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        logger.warning("%s failed (%s); falling back to the torch reference on CUDA", name, e)
        _load_cuda_ops().pop(name, None)
        return None


def _conv_cuda(x, weight, bias, conv_states, cu_seqlens, slots) -> torch.Tensor:
    # Only the pure decode step goes to causal_conv1d_update: x (B, D), conv_state
    # (B, D, state_len >= K-1) shifted in place.  We gather our rows' states into a copy,
    # let it update the copy and scatter back.  The CUDA kernel wants a single dtype.
    one_dtype = weight.dtype == x.dtype == conv_states.dtype and (bias is None or bias.dtype == x.dtype)
    usable = "causal_conv1d_update" in _load_cuda_ops() and one_dtype
    if usable and _all_rows_single_token(cu_seqlens, x.shape[0]):
        idx = slots.to(conv_states.device, torch.int64)
        st = conv_states.index_select(0, idx)  # (B, D, K-1) copy
        y = _call_cuda_op("causal_conv1d_update", x.contiguous(), st, weight.contiguous(), bias,
                          activation="silu")
        if y is not None:
            conv_states.index_copy_(0, idx, st)
            return y
    return causal_conv1d_varlen_ref(x, weight, bias, conv_states, cu_seqlens, slots)


def _scan_cuda(u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots) -> torch.Tensor:
    # Only the pure decode step goes to selective_state_update (state (B, D, N) updated in
    # place, delta used as given: dt_bias=None, dt_softplus=False).  Prefill falls back to
    # the reference: selective_scan_fn cannot start from a stored state.
    if "selective_state_update" in _load_cuda_ops() and _all_rows_single_token(cu_seqlens, u.shape[0]):
        idx = slots.to(ssm_states.device, torch.int64)
        st = ssm_states.index_select(0, idx)  # (B, D, N) copy
        y = _call_cuda_op("selective_state_update", st, u, delta, A, B, C, D=D, z=z,
                          dt_bias=None, dt_softplus=False)
        if y is not None:
            ssm_states.index_copy_(0, idx, st)
            return y
    return selective_scan_varlen_ref(u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots)


# --- public dispatchers ------------------------------------------------------


def _force_ref() -> bool:
    # Read on every call so tests / debugging sessions can flip it at runtime.
    return os.environ.get("JAMBA_KERNELS", "").strip().lower() == "ref"


def causal_conv1d_varlen(
    x: torch.Tensor,  # (T, D)
    weight: torch.Tensor,  # (D, K)
    bias: torch.Tensor | None,  # (D,)
    conv_states: torch.Tensor,  # (S, D, K-1), updated in place
    cu_seqlens: torch.Tensor,  # (B+1,) int64
    slots: torch.Tensor,  # (B,) int64
) -> torch.Tensor:  # (T, D)
    """Causal depthwise conv1d + SiLU over packed rows (see module docstring)."""
    if _force_ref():
        return causal_conv1d_varlen_ref(x, weight, bias, conv_states, cu_seqlens, slots)
    if x.is_cuda:
        return _conv_cuda(x, weight, bias, conv_states, cu_seqlens, slots)
    if numba is None or x.device.type != "cpu":
        return causal_conv1d_varlen_ref(x, weight, bias, conv_states, cu_seqlens, slots)
    return causal_conv1d_varlen_cpu(x, weight, bias, conv_states, cu_seqlens, slots)


def selective_scan_varlen(
    u: torch.Tensor,  # (T, D)
    delta: torch.Tensor,  # (T, D)
    A: torch.Tensor,  # (D, N)
    B: torch.Tensor,  # (T, N)
    C: torch.Tensor,  # (T, N)
    D: torch.Tensor | None,  # (D,)
    z: torch.Tensor | None,  # (T, D)
    ssm_states: torch.Tensor,  # (S, D, N) float32, updated in place
    cu_seqlens: torch.Tensor,  # (B+1,) int64
    slots: torch.Tensor,  # (B,) int64
) -> torch.Tensor:  # (T, D)
    """Mamba-1 selective scan over packed rows (see module docstring)."""
    if _force_ref():
        return selective_scan_varlen_ref(u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots)
    if u.is_cuda:
        return _scan_cuda(u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots)
    if numba is None or u.device.type != "cpu":
        return selective_scan_varlen_ref(u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots)
    return selective_scan_varlen_cpu(u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots)


def warmup() -> None:
    """Compile (or load from numba's on-disk cache) the CPU kernels for float32.

    The first call of a numba kernel compiles it, which takes seconds; call this at
    worker start so the first request doesn't pay for it.
    """
    if numba is None:
        return
    T, D, N, K, S = 6, 16, 4, 4, 3
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 1, T], dtype=torch.int64)
    slots = torch.tensor([2, 0], dtype=torch.int64)
    x = torch.randn(T, D, generator=g)
    causal_conv1d_varlen_cpu(x, torch.randn(D, K, generator=g), torch.randn(D, generator=g),
                             torch.zeros(S, D, K - 1), cu, slots)
    selective_scan_varlen_cpu(x, torch.rand(T, D, generator=g), -torch.rand(D, N, generator=g),
                              torch.randn(T, N, generator=g), torch.randn(T, N, generator=g),
                              torch.randn(D, generator=g), torch.randn(T, D, generator=g),
                              torch.zeros(S, D, N), cu, slots)

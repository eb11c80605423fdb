"""numba kernels for the CPU: causal conv1d and the selective scan over packed rows.

Same arguments and results as stages/kernels/reference.py, to float32 rounding.
numba compiles each kernel on its first call (seconds); with ``cache=True`` the machine code is
kept on disk (``NUMBA_CACHE_DIR``, which stages/kernels/warmup.py points at the kernel cache
before this module is imported), so later processes only load it. The kernels use
min(torch.get_num_threads(), NUMBA_NUM_THREADS) threads. numba's OpenMP pool and torch's are
separate runtimes: if both spin long on a small machine they starve each other, hence the
short spin of stages/openmp.py.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import prange
from numba.extending import intrinsic

from .snapshots import check_snapshots

# ---------------------------------------------------------------------------
# Kernels
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


# error_model="numpy": float division without Python's ZeroDivisionError checks,
# which would otherwise stop the loops from vectorising.
_INLINE_OPTS = dict(inline="always", fastmath=False, cache=True, error_model="numpy")
_KERNEL_OPTS = dict(parallel=True, fastmath=False, cache=True, nogil=True, error_model="numpy")
_njit = numba.njit


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with a single rounding (llvm.fma; one vfmadd instruction)."""
    if not (a == b == c and isinstance(a, numba.types.Float)):
        return None

    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


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
def _conv_varlen_kernel(x, weight, bias, states, cu, slots, snap_tok, snap_dst, y, block):
    """Causal conv + SiLU over packed rows; float32 everywhere.

    x (T, D), weight (D, K), bias (D,), states (S, D, K-1) in place, cu (B+1,),
    slots (B,), snap_tok, snap_dst (K',) snapshots (ascending tokens; empty for none):
    states[snap_dst[k]] = the row's state right after token snap_tok[k]; y (T, D)
    output, block = channels per parallel task.
    """
    T, D = x.shape
    K = weight.shape[1]
    W = K - 1  # state width
    nrows = slots.shape[0]
    nsnap = snap_tok.shape[0]
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
        nxt = 0  # next snapshot: tokens ascend with the rows, so one pointer serves them all
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
            # (s) snapshots after token p of the row: entries p+1 .. p+W of concat(state, x_row),
            #     read (like (c)) before (c) overwrites the stored state.
            while nxt < nsnap and snap_tok[nxt] < start + L:
                p = snap_tok[nxt] - start
                sn = states[snap_dst[nxt], d0:d0 + nd]
                for i in range(W):
                    q = p + 1 + i
                    if q < W:
                        for j in range(nd):
                            sn[j, i] = st[j, q]
                    else:
                        xq = x[start + q - W, d0:d0 + nd]
                        for j in range(nd):
                            sn[j, i] = xq[j]
                nxt += 1
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
def _scan_varlen_kernel(u, delta, A, B, C, Dskip, z, gate, states, cu, slots, snap_tok, snap_dst, y, block):
    """Selective scan over packed rows; float32 everywhere.

    u, delta, z, y (T, D); A (D, N); B, C (T, N); Dskip (D,); gate: multiply by silu(z)
    or not; states (S, D, N) in place; cu (B+1,), slots (B,); snap_tok, snap_dst (K',)
    snapshots (ascending tokens; empty for none): states[snap_dst[k]] = h after token
    snap_tok[k]; block = channels per task.
    """
    T, D = u.shape
    N = A.shape[1]
    nrows = slots.shape[0]
    nsnap = snap_tok.shape[0]
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
        nxt = 0  # next snapshot: tokens ascend with the rows, so one pointer serves them all
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
                if nxt < nsnap and snap_tok[nxt] == t:  # a snapshot of h after this token
                    sn = states[snap_dst[nxt], d0:d0 + nd]
                    for n in range(N):
                        hn = h[n]
                        for j in range(nd):
                            sn[j, n] = hn[j]
                    nxt += 1
            for n in range(N):  # store it back
                hn = h[n]
                for j in range(nd):
                    st[j, n] = hn[j]


# ---------------------------------------------------------------------------
# Wrappers: torch tensors in and out
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
    threads = torch.get_num_threads()
    n = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if work < _MIN_PARALLEL_WORK:
        n = 1
    numba.set_num_threads(n)
    # numba's OpenMP layer shares the process's libgomp with torch, and numba.set_num_threads
    # resets the calling thread's OpenMP thread count to numba's pool size (measured: torch's
    # count 1 before, 2 after). Unrestored, a stage configured for one thread ran torch's ops on
    # every core after its first Mamba layer, and the compiled decode step's guards saw it change.
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return n


def _block_size(D: int, nthreads: int) -> int:
    """Channels per parallel task: a multiple of 16 (vector width), about two tasks per
    thread, at most 256 (then a (16, 256) float32 state block and A block fill L1)."""
    block = D // (2 * nthreads)
    return max(16, min(256, block - block % 16))


_NO_SNAPSHOTS = np.zeros(0, np.int64)


class _PoolView:
    """The state pool as a float32 contiguous numpy array the kernel may write to.

    If the pool already is float32 and contiguous the kernel writes into it directly.
    Otherwise (e.g. bf16 conv states) the rows' slots, then the snapshots' (`snap_dst`),
    are gathered into a float32 scratch pool indexed 0..B-1, B..B+K'-1 and written back,
    rounded to the pool's dtype, by commit().
    """

    def __init__(self, pool: torch.Tensor, slots: np.ndarray, snap_dst: np.ndarray = _NO_SNAPSHOTS):
        self.pool = pool
        self.direct = pool.dtype == torch.float32 and pool.is_contiguous() and not pool.requires_grad
        if self.direct:
            self.array = pool.numpy()
            self.slots = slots
            self.snap_dst = snap_dst
        else:
            self.idx = torch.from_numpy(np.concatenate([slots, snap_dst]))
            self.scratch = pool.detach().index_select(0, self.idx).to(torch.float32).contiguous()
            self.array = self.scratch.numpy()
            self.slots = np.arange(len(slots), dtype=np.int64)
            self.snap_dst = np.arange(len(slots), len(slots) + len(snap_dst), dtype=np.int64)

    def commit(self) -> None:
        if not self.direct:
            with torch.no_grad():
                self.pool.index_copy_(0, self.idx, self.scratch.to(self.pool.dtype))


def causal_conv1d_varlen_cpu(x, weight, bias, conv_states, cu_seqlens, slots, snap_tok=None, snap_dst=None
                             ) -> torch.Tensor:
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
    snaps = check_snapshots(snap_tok, snap_dst, T, conv_states.shape[0], sl)
    snap_tok_np, snap_dst_np = (_NO_SNAPSHOTS, _NO_SNAPSHOTS) if snaps is None else (s.numpy() for s in snaps)

    bias_np = np.zeros(D, np.float32) if bias is None else _np32(bias)  # (D,)
    pool = _PoolView(conv_states, sl, snap_dst_np)
    y = torch.empty((T, D), dtype=torch.float32)
    _conv_varlen_kernel(_np32(x), _np32(weight), bias_np, pool.array, cu, pool.slots, snap_tok_np, pool.snap_dst,
                            y.numpy(), _block_size(D, nthreads))
    pool.commit()
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def selective_scan_varlen_cpu(u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots, snap_tok=None, snap_dst=None
                              ) -> torch.Tensor:
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
    snaps = check_snapshots(snap_tok, snap_dst, T, ssm_states.shape[0], sl)
    snap_tok_np, snap_dst_np = (_NO_SNAPSHOTS, _NO_SNAPSHOTS) if snaps is None else (s.numpy() for s in snaps)

    u_np = _np32(u)  # (T, D)
    D_np = np.zeros(Dm, np.float32) if D is None else _np32(D)  # (D,)
    gate = z is not None
    z_np = _np32(z) if gate else u_np  # (T, D); not read when gate is False
    pool = _PoolView(ssm_states, sl, snap_dst_np)
    y = torch.empty((T, Dm), dtype=torch.float32)
    _scan_varlen_kernel(u_np, _np32(delta), _np32(A), _np32(B), _np32(C), D_np, z_np, gate,
                            pool.array, cu, pool.slots, snap_tok_np, pool.snap_dst, y.numpy(), _block_size(Dm, nthreads))
    pool.commit()
    return y if u.dtype == torch.float32 else y.to(u.dtype)



def warm_up() -> None:
    """Compile (or load from the on-disk cache) both kernels for float32 inputs.

    Every dtype reaches the kernels as float32 numpy arrays, so one signature covers all.
    """
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

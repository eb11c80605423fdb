"""numba kernel for the CPU: weight-only int8 matmul for skinny inputs (decode steps), and the
same for float32 weights.

    out[t, o] = scale[o] * sum_k x[t, k] * q[o, k]      x (T, K) float32, q (N, K) int8, scale (N,)

Same result as stages.linear.int8_linear_reference (dequantize, then matmul) to float32 rounding;
tests/test_quant.py compares them. With float32 weights (`float_matmul_cpu`, no scale) it is
what stages.linear.linear runs for up to 8 tokens: MKL's sgemm/sgemv for so few rows streams the
weights at 10-40 GB/s here, this kernel at 35-77 GB/s (1.6-5.5x faster, 1 to 8 tokens; from 16
tokens MKL is as fast or faster).

Decode is memory-bound: the point is to stream the weights as int8, a quarter of float32's
bytes. Work splits over blocks of output rows (prange). Each task takes four weight rows at a
time and dots them with every token's input, widening int8 to float32 in registers (a
widening buffer in memory measured 2-3x slower); the four rows share each load of x, and x
(T, K) stays in L2 across rows, while each weight row comes from memory once. The dot products are
reductions over k, which LLVM vectorises only if it may reassociate the sum: the kernel has
fastmath's `reassoc` (and `contract`, for FMAs), so its sums run in a different order from the
reference's (still deterministic from run to run; the difference is float32 rounding).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from .numba_cpu import _set_numba_threads

_ROWS = 4  # output rows sharing one pass over x


@numba.njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True, error_model="numpy")
def _int8_matmul_kernel(x, q, scale, out, block):  # pragma: no cover - compiled
    T, K = x.shape
    N = q.shape[0]
    n_blocks = (N + block - 1) // block
    for b in prange(n_blocks):
        lo = b * block
        hi = min(N, lo + block)
        n0 = lo
        while n0 + _ROWS <= hi:
            for t in range(T):
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for k in range(K):
                    xv = x[t, k]
                    a0 += xv * np.float32(q[n0, k])
                    a1 += xv * np.float32(q[n0 + 1, k])
                    a2 += xv * np.float32(q[n0 + 2, k])
                    a3 += xv * np.float32(q[n0 + 3, k])
                out[t, n0] = a0 * scale[n0]
                out[t, n0 + 1] = a1 * scale[n0 + 1]
                out[t, n0 + 2] = a2 * scale[n0 + 2]
                out[t, n0 + 3] = a3 * scale[n0 + 3]
            n0 += _ROWS
        for n in range(n0, hi):  # the last rows of the block
            for t in range(T):
                a = np.float32(0.0)
                for k in range(K):
                    a += x[t, k] * np.float32(q[n, k])
                out[t, n] = a * scale[n]


def int8_matmul_cpu(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (T, K) any float dtype, qweight (N, K) int8, scale (N,) -> (T, N) float32 (no bias)."""
    T, K = x.shape
    N = qweight.shape[0]
    xf = x.detach().to(torch.float32).contiguous()
    q = qweight.detach().contiguous()
    s = scale.detach().to(torch.float32).contiguous()
    out = torch.empty(T, N, dtype=torch.float32)
    if T == 0 or N == 0:
        return out
    threads = _set_numba_threads(T * N * K)
    # About four tasks per thread, a multiple of _ROWS rows each.
    block = max(_ROWS, -(-N // (4 * threads)))
    block += -block % _ROWS
    _int8_matmul_kernel(xf.numpy(), q.numpy(), s.numpy(), out.numpy(), block)
    return out


def float_matmul_cpu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (T, K) float32, weight (N, K) float32 -> x @ weight.T (T, N) float32, for small T."""
    return int8_matmul_cpu(x, weight, torch.ones(weight.shape[0]))

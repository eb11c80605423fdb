"""Matrix products of the model: the float linear with a faster shape for decode steps on CPU,
and the weight-only int8 one (stages/quant.py says how weights are quantized).

`int8_linear` is a torch custom operator (torch.library): its CPU kernel is numba, which
torch.compile cannot trace, so the compiler sees one opaque op with a known output shape
instead of a graph break (stages/decode.py compiles whole decode steps).
"""

from __future__ import annotations

import os
from typing import Optional  # torch.library reads the annotations: no `X | None` there

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with a faster GEMM shape for the skinny inputs of decode steps on CPU.

    MKL's sgemm for x (T, in) @ W.T runs 2-3x below memory speed when T is 8..128 (measured
    on 2 cores; see BENCHMARKS.md); W @ x.T computes the same products and streams W at full speed.
    """
    if x.device.type == "cpu" and x.dim() == 2 and 8 <= x.shape[0] <= 128:
        out = (weight @ x.t()).t()
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., out, in) int8, scale (..., out) -> q * scale in `dtype` (computed in float32)."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def int8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The semantics: dequantize to x's dtype, then the model's ordinary linear. x (T, in) -> (T, out)."""
    return linear(x, dequantize_int8(qweight, scale, x.dtype), bias)


# ---------------------------------------------------------------------------
# Fast paths
# ---------------------------------------------------------------------------

# Up to this many tokens the numba kernel (weights read once, as int8) beats dequantize + sgemm;
# beyond it the GEMM is compute-bound and MKL's blocking wins.
_CPU_SKINNY_MAX_T = 32
# Output rows dequantized at a time on the prefill path: 1024 rows of a 4096-wide input. Large
# enough that the few ops per block (widen, scale, GEMM) are not dominated by waking the thread pool.
_CPU_DEQUANT_BYTES = 16 << 20


@torch.library.custom_op("jamba::int8_linear", mutates_args=())
def int8_linear(
    x: torch.Tensor,  # (T, in) float32 / bf16 / fp16
    qweight: torch.Tensor,  # (out, in) int8
    scale: torch.Tensor,  # (out,) float32
    bias: Optional[torch.Tensor] = None,  # (out,)
) -> torch.Tensor:  # (T, out), x's dtype
    """x @ (qweight * scale[:, None]).T + bias, without a full-precision copy of the weight."""
    return _int8_linear(x, qweight, scale, bias).contiguous()  # contiguous, as the compiler is told below


def _int8_linear(x, qweight, scale, bias):
    if x.device.type == "cuda" or (x.device.type == "cpu" and os.environ.get("JAMBA_INT8_KERNEL") == "triton"):
        from .kernels import triton_int8

        return triton_int8.int8_linear_triton(x, qweight, scale, bias)
    if x.device.type != "cpu" or x.dim() != 2:
        return int8_linear_reference(x, qweight, scale, bias)
    T = x.shape[0]
    if T <= _CPU_SKINNY_MAX_T:
        from .kernels import numba_int8

        out = numba_int8.int8_matmul_cpu(x, qweight, scale)  # (T, out) float32
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    return _int8_linear_blocked(x, qweight, scale, bias)


@int8_linear.register_fake
def _(x, qweight, scale, bias=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _int8_linear_blocked(x, qweight, scale, bias):
    """Prefill on CPU: dequantize a block of output rows, sgemm it, next block. (T, in) -> (T, out)."""
    N, K = qweight.shape
    rows = max(64, _CPU_DEQUANT_BYTES // (4 * K))
    out = torch.empty(x.shape[0], N, dtype=x.dtype)
    for lo in range(0, N, rows):
        # = dequantize_int8 (float32 products, then x's dtype), in two ops and one allocation for fp32
        w = qweight[lo : lo + rows].float().mul_(scale[lo : lo + rows, None]).to(x.dtype)  # (rows, in)
        b = None if bias is None else bias[lo : lo + rows]
        out[:, lo : lo + rows] = linear(x, w, b)
    return out



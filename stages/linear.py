"""Matrix products of the model: the float linear with a faster shape for decode steps on CPU,
and the weight-only int8 one (stages/quant.py says how weights are quantized).

`int8_linear` and `skinny_linear` are torch custom operators (`custom_op` below): their CPU
kernels are numba, which torch.compile cannot trace, so the compiler sees one opaque op with a
known output shape instead of a graph break (stages/decode.py compiles whole decode steps).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional  # torch.library reads the annotations: no `X | None` there

import torch
import torch.nn.functional as F


def custom_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: registers the function as the custom operator `jamba::name` (torch.library),
    with `fake` giving its output's shape, strides and dtype. Under torch.compile a call is that
    one opaque operator; eager calls run the function itself. Through the dispatcher an eager call
    cost 27 us more (measured here, on a 36 us call), and the first one imports torch._dynamo,
    1.5 s in a stage process that never compiles. The operator is `.op` (for torch.library.opcheck)."""
    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"jamba::{name}", fn, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)

        call.op = op
        return call

    return register


# Float32 inputs of up to this many tokens go through a numba kernel (stages/kernels/numba_int8.py:
# 1.6-5.5x MKL's speed for 1-8 tokens on this machine). Both skinny paths are for weights of at
# least this many elements: below, a call's fixed cost is more than MKL takes.
SKINNY_MAX_T = 8
SKINNY_MIN_WEIGHT = 1 << 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with faster paths for the skinny inputs of decode steps on CPU (`skinny_linear`)."""
    if (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= 128 and weight.numel() >= SKINNY_MIN_WEIGHT
            and (x.shape[0] >= 8 or _numba_fits(x, weight))):
        out = skinny_linear(x, weight)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def _numba_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.shape[0] <= SKINNY_MAX_T and x.dtype == weight.dtype == torch.float32 and weight.numel() >= SKINNY_MIN_WEIGHT


def _skinny_linear_fake(x, weight):
    if _numba_fits(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])
    return x.new_empty(weight.shape[0], x.shape[0]).t()  # the transpose of W @ x.T, as computed


@custom_op("skinny_linear", _skinny_linear_fake)
def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (T, in) @ weight (out, in).T for up to 128 tokens on CPU, by the fastest path measured:

    - up to SKINNY_MAX_T float32 tokens, a numba kernel (stages/kernels/numba_int8.py);
    - otherwise W @ x.T, transposed back: MKL's sgemm for x @ W.T runs 2-3x below memory speed
      when T is 8..128 (measured on 2 cores; see BENCHMARKS.md), and W @ x.T computes the same
      products streaming W at full speed.

    A custom operator, so that torch.compile neither traces into numba nor rewrites W @ x.T back
    into the slow orientation (it did: the compiled decode step at batch 32 ran slower than eager).
    """
    if _numba_fits(x, weight):
        from .kernels import numba_int8  # numba is imported on first use (stages/warmup.py)

        return numba_int8.float_matmul_cpu(x, weight)
    return (weight @ x.t()).t()


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


@custom_op("int8_linear", lambda x, qweight, scale, bias=None: x.new_empty(*x.shape[:-1], qweight.shape[0]))
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



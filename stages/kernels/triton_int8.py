"""Triton kernel for the GPU: weight-only int8 matmul, dequantized inside the matmul.

    y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]  (+ bias[n])      x (M, K), q (N, K) int8, scale (N,)

Same result as stages.quant.int8_linear_reference (dequantize, then matmul) to float32 rounding
(fp32 inputs) or to the input dtype's rounding (bf16 / fp16 inputs); tests/test_quant.py compares
them in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py).

One program per (BLOCK_M tokens, BLOCK_N output channels) tile, looping over K. Each int8 tile of
the weight is loaded (a quarter of fp32's bytes, half of bf16's) and widened to x's dtype in
registers; that is exact, |q| <= 127 fits bf16's and fp16's mantissa, so the tensor-core dot sees
exactly the int8 values and accumulates in fp32. The per-channel scale factors out of the sum
over k and is applied once to the fp32 accumulator at the end, with the bias. fp32 inputs use
IEEE fp32 dots (not TF32), to keep the fp32 path to fp32 rounding.

Decode steps have M of 1..a few dozen: the tile is then 16 tokens (tl.dot's minimum) by 64
channels, so a (4096, 4096) layer spreads over 64 programs and the kernel streams the weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _int8_matmul_kernel(
    x_ptr,  # (M, K)
    q_ptr,  # (N, K) int8
    s_ptr,  # (N,) float32
    b_ptr,  # (N,) or unused
    y_ptr,  # (M, N)
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) tokens
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output channels
    m_ok = m < M
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_ok = k < K
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        w = tl.load(q_ptr + k[:, None] * stride_qk + n[None, :] * stride_qn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0)  # (BK, BN) int8, W transposed
        if IEEE:  # fp32 inputs, or any input in the interpreter (whose bf16 dot is broken)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            w = w.to(x.dtype)  # exact for |q| <= 127
            acc = tl.dot(x, w, acc)
    acc = acc * tl.load(s_ptr + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _blocks(M: int, N: int, K: int, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K). Decode (few tokens): thin tiles over many channels; prefill:
    square-ish 64x64 tiles. The interpreter runs programs one after another, so there tiles are
    as large as the problem allows (the result does not depend on the tiling)."""
    p2 = triton.next_power_of_2
    if not cuda:
        return max(16, min(64, p2(M))), max(16, min(128, p2(N))), max(16, min(128, p2(K)))
    return (16 if M <= 16 else 32 if M <= 32 else 64), 64, 128 if M <= 32 else 64


def int8_linear_triton(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) @ (qweight (N, K) int8 * scale (N,)[:, None]).T + bias -> (..., N), x's dtype."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], qweight.shape[0]
    # Interpreted: the output in float32, rounded by torch afterwards (the interpreter's
    # float32 -> bf16 cast truncates, where a GPU rounds to nearest even; see triton_gpu._kernel_out).
    out_dtype = x.dtype if x.is_cuda else torch.float32
    y = torch.empty(M, N, device=x.device, dtype=out_dtype)
    if M and N:
        q = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
        s = scale.to(torch.float32).contiguous()
        b = bias.contiguous() if bias is not None else s
        BM, BN, BK = _blocks(M, N, K, x.is_cuda)
        grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
        _int8_matmul_kernel[grid](
            x2, q, s, b, y, M, N, K,
            x2.stride(0), x2.stride(1), q.stride(0), q.stride(1), y.stride(0),
            HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32 or not x.is_cuda,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        )
    return y.to(x.dtype).reshape(*lead, N)

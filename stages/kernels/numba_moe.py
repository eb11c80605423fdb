"""numba kernel for the CPU: the experts of a MoE layer for a few tokens (decode steps), in one call.

    out[t] = sum_c weights[t, c] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = experts[t, c]

Same result as stages.ops.moe_experts' grouped torch path (one matmul per expert over its tokens)
to float32 rounding; tests/test_decode.py compares them, for float32 and int8 weights.

Why: the grouped torch path costs a handful of ops per expert (gather, two matmuls, SiLU, scale,
scatter), ~0.5 ms a layer of host work at 8 experts whatever the sizes, and it reads the expert
counts back to the host. Here the whole layer is one call: the (token, choice) pairs are sorted
by expert inside the kernel, then each task takes a block of one expert's weight rows and dots
every row with each of that expert's tokens, so every expert's weights are read once, as in the
grouped GEMMs, and only the chosen experts' weights are read at all. int8 weights (stages/quant.py)
are widened in registers, as in numba_int8.py. Sums run in fastmath's reassociated order.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from .numba_cpu import _set_numba_threads

MAX_TOKENS = 32  # up to here this kernel beats the grouped GEMMs (bench/overhead.py); longer inputs use them


@numba.njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True, error_model="numpy")
def _moe_kernel(x, experts, weights, gate_up, gate_up_scale, down, down_scale, scaled, out, act, y, rows):  # pragma: no cover - compiled
    T, H = x.shape
    k = experts.shape[1]
    E, I2, _ = gate_up.shape
    I = I2 // 2
    P = T * k
    # Counting sort of the pairs p = t * k + c by expert: pairs of expert e are order[start[e]:start[e + 1]].
    start = np.zeros(E + 1, np.int64)
    for p in range(P):
        start[experts[p // k, p % k] + 1] += 1
    for e in range(E):
        start[e + 1] += start[e]
    fill = start[:E].copy()
    order = np.empty(P, np.int64)
    for p in range(P):
        e = experts[p // k, p % k]
        order[fill[e]] = p
        fill[e] += 1
    # act[p, i] = silu(gate) * up: tasks are (expert, block of intermediate rows).
    n1 = (I + rows - 1) // rows
    for job in prange(E * n1):
        e = job // n1
        lo = (job % n1) * rows
        hi = min(I, lo + rows)
        for i in range(lo, hi):
            for j in range(start[e], start[e + 1]):
                p = order[j]
                t = p // k
                g = np.float32(0.0)
                u = np.float32(0.0)
                for h in range(H):
                    xv = x[t, h]
                    g += xv * np.float32(gate_up[e, i, h])
                    u += xv * np.float32(gate_up[e, I + i, h])
                if scaled:
                    g *= gate_up_scale[e, i]
                    u *= gate_up_scale[e, I + i]
                act[p, i] = g / (np.float32(1.0) + np.exp(-g)) * u
    # y[p, h] = weight of the pair * down row h . act[p]: tasks are (expert, block of output rows).
    n2 = (H + rows - 1) // rows
    for job in prange(E * n2):
        e = job // n2
        lo = (job % n2) * rows
        hi = min(H, lo + rows)
        for h in range(lo, hi):
            for j in range(start[e], start[e + 1]):
                p = order[j]
                a = np.float32(0.0)
                for i in range(I):
                    a += act[p, i] * np.float32(down[e, h, i])
                if scaled:
                    a *= down_scale[e, h]
                y[p, h] = a * weights[p // k, p % k]
    for t in prange(T):
        for h in range(H):
            acc = np.float32(0.0)
            for c in range(k):
                acc += y[t * k + c, h]
            out[t, h] = acc


_NO_SCALE = np.ones((1, 1), np.float32)


def moe_experts_cpu(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, gate_up_scale: torch.Tensor | None, down_scale: torch.Tensor | None
                    ) -> torch.Tensor:
    """stages.ops.moe_experts for float32 or int8 weights on CPU tensors; (T, H) in x's dtype."""
    T, H = x.shape
    k = experts.shape[1]
    E, I2, _ = gate_up.shape
    out = torch.empty(T, H, dtype=torch.float32)
    if T == 0:
        return out.to(x.dtype)
    threads = _set_numba_threads(T * k * 3 * (I2 // 2) * H)
    rows = max(4, -(-max(I2 // 2, H) // (4 * threads)))  # about four tasks per thread and expert
    scaled = gate_up_scale is not None
    _moe_kernel(
        x.detach().float().contiguous().numpy(), experts.contiguous().numpy(), weights.detach().float().contiguous().numpy(),
        gate_up.detach().numpy(), gate_up_scale.numpy() if scaled else _NO_SCALE,
        down.detach().numpy(), down_scale.numpy() if scaled else _NO_SCALE, scaled,
        out.numpy(), np.empty((T * k, I2 // 2), np.float32), np.empty((T * k, H), np.float32), rows,
    )
    return out.to(x.dtype)

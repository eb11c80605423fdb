"""numba kernel for the CPU: decode attention over a paged KV cache, each row to its own length.

    out[b, h] = softmax(q[b, h] . K[b, :L_b]^T * scale) @ V[b, :L_b],   L_b = positions[b] + 1

where row b's key j lives in block tables[b, j // block_size] at offset j % block_size, and query
head h reads KV head h // (n_heads / n_kv) (grouped-query attention). Same result as
stages.ops.paged_decode_attention_torch to float32 rounding; tests/test_decode.py compares them.

Why: written in torch the step is a dozen ops (gather the blocks, two batched matmuls, a mask, a
softmax), ~150 us of host work here for a few microseconds of arithmetic, and every row pays for
the longest row's blocks. One call here, one task per (row, KV head), reads each row's own keys
once. Float32 caches only (bf16 caches take the torch path).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from .numba_cpu import _set_numba_threads


@numba.njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True, error_model="numpy")
def _attention_kernel(q, k_cache, v_cache, tables, positions, scale, out):  # pragma: no cover - compiled
    B, H, D = q.shape
    BS, KV = k_cache.shape[1], k_cache.shape[2]
    G = H // KV
    for job in prange(B * KV):
        b = job // KV
        kv = job % KV
        L = positions[b] + 1
        scores = np.empty((G, L), np.float32)
        for j in range(L):
            blk = tables[b, j // BS]
            off = j % BS
            for g in range(G):
                h = kv * G + g
                s = np.float32(0.0)
                for d in range(D):
                    s += q[b, h, d] * k_cache[blk, off, kv, d]
                scores[g, j] = s * scale
        for g in range(G):
            h = kv * G + g
            m = scores[g, 0]
            for j in range(1, L):
                m = max(m, scores[g, j])
            total = np.float32(0.0)
            for j in range(L):
                e = np.exp(scores[g, j] - m)
                scores[g, j] = e
                total += e
            for d in range(D):
                out[b, h, d] = 0.0
            for j in range(L):
                p = scores[g, j] / total
                blk = tables[b, j // BS]
                off = j % BS
                for d in range(D):
                    out[b, h, d] += p * v_cache[blk, off, kv, d]


def paged_decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """stages.ops.paged_decode_attention for float32 q and caches on the CPU; (B, n_heads, hd)."""
    B, H, D = q.shape
    out = torch.empty(B, H, D, dtype=torch.float32)
    _set_numba_threads(int(positions.sum()) * H * D * 2)
    _attention_kernel(q.detach().contiguous().numpy(), k_cache.detach().numpy(), v_cache.detach().numpy(),
                      block_tables.contiguous().numpy(), positions.contiguous().numpy(), np.float32(D**-0.5),
                      out.numpy())
    return out

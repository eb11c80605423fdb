"""The model's custom operators: the two steps whose work depends on the data.

    moe_experts             which experts a token goes to decides which weights are read
    paged_decode_attention  how long each row's context is decides how many KV blocks are read

Written as plain torch, both need the data on the host (`.tolist()` of the expert counts, the
longest row's length) and so could not sit inside a compiled graph: torch.compile would break the
graph there, and a CUDA graph cannot hold a host sync at all. Registered with torch.library as
custom operators with "fake" implementations (output shapes from input shapes), they are single
opaque nodes of fixed shape to the compiler, and stages/decode.py compiles a stage's whole decode
step with `fullgraph=True` (tests/test_decode.py checks there is no break). vLLM registers its
fused MoE and attention the same way, for the same reason.

On CUDA tensors neither reads anything back to the host, so both may be captured in a CUDA graph:
the experts run every token (a weight of zero for the experts a token did not choose) and the
attention reads each row's block table to its full width (masked). On the CPU, where reading a
value costs nothing, they do the least work: each expert runs only its tokens (a numba kernel for
the few tokens of a decode step, stages/kernels/numba_moe.py; one GEMM per expert for prefill),
and the attention reads each row's own blocks (a numba kernel, stages/kernels/numba_attention.py).
"""

from __future__ import annotations

from typing import Optional  # torch.library reads the annotations: no `X | None` there

import torch
import torch.nn.functional as F

from .linear import custom_op, int8_linear, linear


def _expert_linear(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    return linear(x, weight) if scale is None else int8_linear(x, weight, scale)


@custom_op("moe_experts", lambda x, weights, experts, gate_up, down, gate_up_scale=None, down_scale=None:
           x.new_empty(x.shape))
def moe_experts(
    x: torch.Tensor,  # (T, H)
    weights: torch.Tensor,  # (T, k) router probabilities of the chosen experts, x's dtype
    experts: torch.Tensor,  # (T, k) int64 chosen experts
    gate_up: torch.Tensor,  # (E, 2I, H) gate then up (int8 with gate_up_scale (E, 2I))
    down: torch.Tensor,  # (E, H, I) (int8 with down_scale (E, H))
    gate_up_scale: Optional[torch.Tensor] = None,
    down_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # (T, H)
    """sum over a token's k experts of weight * down(silu(gate(x)) * up(x))."""
    if x.device.type == "cuda":
        return moe_experts_dense(x, weights, experts, gate_up, down, gate_up_scale, down_scale)
    # numba is imported on first use: its on-disk cache is chosen first (stages/warmup.py).
    from .kernels import numba_moe

    if x.shape[0] <= numba_moe.MAX_TOKENS and gate_up.dtype in (torch.float32, torch.int8) and x.device.type == "cpu":
        return numba_moe.moe_experts_cpu(x, weights, experts, gate_up, down, gate_up_scale, down_scale)
    return moe_experts_grouped(x, weights, experts, gate_up, down, gate_up_scale, down_scale)


def _expert(x, e, gate_up, down, gate_up_scale, down_scale) -> torch.Tensor:  # (n, H) -> (n, H)
    gate, up = _expert_linear(x, gate_up[e], None if gate_up_scale is None else gate_up_scale[e]).chunk(2, dim=-1)
    return _expert_linear(F.silu(gate) * up, down[e], None if down_scale is None else down_scale[e])


def moe_experts_grouped(x, weights, experts, gate_up, down, gate_up_scale=None, down_scale=None) -> torch.Tensor:
    """The (token, choice) pairs grouped by expert, one matmul per expert over its tokens: the
    least arithmetic, but a few ops per expert and the counts read on the host. The reference the
    other paths are tested against, and the CPU path for long inputs (prefill)."""
    flat = experts.flatten()  # (T*k,)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    token = order // experts.shape[1]
    w = weights.flatten()[order][:, None]
    out = x.new_zeros(x.shape)
    lo = 0
    for e, n in enumerate(counts):
        if n:
            idx = token[lo:lo + n]
            out.index_add_(0, idx, _expert(x[idx], e, gate_up, down, gate_up_scale, down_scale) * w[lo:lo + n])
            lo += n
    return out


def moe_experts_dense(x, weights, experts, gate_up, down, gate_up_scale=None, down_scale=None) -> torch.Tensor:
    """Every expert over every token, weighted (0 for the experts a token did not choose): no host
    sync, so a CUDA graph can hold it; E/k times the arithmetic of the grouped path."""
    E = gate_up.shape[0]
    dense = x.new_zeros(x.shape[0], E).scatter_(1, experts, weights)  # (T, E)
    out = x.new_zeros(x.shape)
    for e in range(E):
        out += _expert(x, e, gate_up, down, gate_up_scale, down_scale) * dense[:, e:e + 1]
    return out


@custom_op("paged_decode_attention", lambda q, k_cache, v_cache, block_tables, positions: q.new_empty(q.shape))
def paged_decode_attention(
    q: torch.Tensor,  # (B, n_heads, hd) one query per row
    k_cache: torch.Tensor,  # (num_blocks, block_size, n_kv, hd)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, W) int64 each row's blocks
    positions: torch.Tensor,  # (B,) int64 each query's position: it sees keys 0..position
) -> torch.Tensor:  # (B, n_heads, hd), q's dtype
    """Grouped-query attention of one new token per row over its paged prefix (its own key included)."""
    if q.device.type == "cpu" and q.dtype == k_cache.dtype == torch.float32:
        from .kernels import numba_attention  # (numba on first use, as above)

        return numba_attention.paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, positions)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, positions)


def paged_decode_attention_torch(q, k_cache, v_cache, block_tables, positions) -> torch.Tensor:
    """paged_decode_attention in torch ops: the reference the numba kernel is tested against, and
    the path of CUDA tensors and of bf16 caches.

    Written as two batched matmuls over each KV head's group of query heads: SDPA's CPU path for
    this (GQA, a mask, strided keys) expands K and V to every query head, and took 10x longer
    (BENCHMARKS.md, issue 16). In float32 whatever the cache's dtype: the gather copies K and V
    anyway, and bf16 scores would round logits to 8 bits.
    """
    B, n_heads, hd = q.shape
    n_kv, bs = k_cache.shape[2], k_cache.shape[1]
    if q.device.type != "cuda":  # read only the blocks the longest row needs
        block_tables = block_tables[:, : int(positions.max()) // bs + 1]
    keys = k_cache[block_tables].flatten(1, 2).float()  # (B, L, n_kv, hd), L = blocks * block_size
    vals = v_cache[block_tables].flatten(1, 2).float()
    qg = q.float().view(B, n_kv, n_heads // n_kv, hd)  # query head h uses KV head h // G
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)) * hd**-0.5  # (B, n_kv, G, L)
    future = torch.arange(keys.shape[1], device=q.device)[None, :] > positions[:, None]  # (B, L)
    scores = scores.masked_fill(future[:, None, None, :], float("-inf"))
    o = torch.matmul(torch.softmax(scores, dim=-1), vals.transpose(1, 2))  # (B, n_kv, G, hd)
    return o.reshape(B, n_heads, hd).to(q.dtype).contiguous()


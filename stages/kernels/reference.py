"""Plain-torch reference kernels: Python loops over rows and time.

They define the semantics of every other backend (see stages/kernels/__init__.py for the
packed-row layout) and are what the tests trust. They run on any device, slowly: one torch op
per token and per layer, which is why the fast backends exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .snapshots import check_snapshots


def causal_conv1d_varlen_ref(
    x: torch.Tensor,  # (T, D)
    weight: torch.Tensor,  # (D, K)
    bias: torch.Tensor | None,  # (D,)
    conv_states: torch.Tensor,  # (S, D, K-1), updated in place
    cu_seqlens: torch.Tensor,  # (B+1,) int64
    slots: torch.Tensor,  # (B,) int64
    snap_tok: torch.Tensor | None = None,  # (K',) int64 ascending packed token indices
    snap_dst: torch.Tensor | None = None,  # (K',) int64 pool slots, not among `slots`
) -> torch.Tensor:  # (T, D), x's dtype
    """Causal depthwise conv of width K followed by SiLU, per row, from the stored state.

    For row b the conv input is concat(conv_states[slots[b]], x[row]) along
    time, and y[t] = silu(bias + sum_k weight[:, k] * input[t + k]) for every
    new token t -- i.e. ``F.conv1d(input, weight.unsqueeze(1), bias, groups=D)``
    with no padding.  The state becomes the last K-1 entries of that input.
    Snapshot k: conv_states[snap_dst[k]] becomes the K-1 entries of that input
    ending at token snap_tok[k] (the state had the row ended there).
    """
    T, D = x.shape
    K = weight.shape[1]
    assert K >= 2, "conv width must be at least 2"
    snaps = check_snapshots(snap_tok, snap_dst, T, conv_states.shape[0], slots)
    snap = {} if snaps is None else dict(zip(snaps[0].tolist(), snaps[1].tolist()))  # token -> slot
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
        for t in range(start, end):
            if t in snap:  # inp column K-1+p holds token p = t - start of the row
                p = t - start
                conv_states[snap[t]] = inp[:, p + 1:p + K].to(conv_states.dtype)
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
    snap_tok: torch.Tensor | None = None,  # (K',) int64 ascending packed token indices
    snap_dst: torch.Tensor | None = None,  # (K',) int64 pool slots, not among `slots`
) -> torch.Tensor:  # (T, D), u's dtype
    """Mamba-1 selective scan, token by token, from the stored state.

    Same arithmetic as transformers' ``mamba_selective_scan`` recurrent path
    (Jamba slow path), plus an initial state and varlen rows::

        h      = exp(delta[t] * A) * h + (delta[t] * B[t]) * u[t]     # (D, N)
        y[t]   = h @ C[t] + D * u[t]
        y[t]  *= silu(z[t])

    Snapshot k: ssm_states[snap_dst[k]] becomes h right after token snap_tok[k].
    """
    snaps = check_snapshots(snap_tok, snap_dst, u.shape[0], ssm_states.shape[0], slots)
    snap = {} if snaps is None else dict(zip(snaps[0].tolist(), snaps[1].tolist()))  # token -> slot
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
            if t in snap:
                ssm_states[snap[t]] = h.to(ssm_states.dtype)
        ssm_states[slot] = h.to(ssm_states.dtype)
    return y


def causal_conv1d_update_ref(
    x: torch.Tensor,  # (B, D) one token per row
    weight: torch.Tensor,  # (D, K)
    bias: torch.Tensor | None,  # (D,)
    conv_states: torch.Tensor,  # (S, D, K-1), updated in place
    slots: torch.Tensor,  # (B,) int64
) -> torch.Tensor:  # (B, D), x's dtype, SiLU applied
    """One decode step per row: the conv over rows of length 1, written batched (no row loop)."""
    idx = slots.to(conv_states.device, torch.int64)
    window = torch.cat([conv_states.index_select(0, idx), x[:, :, None].to(conv_states.dtype)], dim=-1)  # (B, D, K)
    y = (window.float() * weight.float()).sum(-1)  # (B, D)
    if bias is not None:
        y = y + bias.float()
    conv_states.index_copy_(0, idx, window[:, :, 1:])
    return F.silu(y).to(x.dtype)


def selective_state_update_ref(
    ssm_states: torch.Tensor,  # (S, D, N) float32, updated in place
    slots: torch.Tensor,  # (B,) int64
    u: torch.Tensor,  # (B, D) one token per row
    delta: torch.Tensor,  # (B, D)
    A: torch.Tensor,  # (D, N)
    B: torch.Tensor,  # (B, N)
    C: torch.Tensor,  # (B, N)
    D: torch.Tensor | None,  # (D,)
    z: torch.Tensor | None,  # (B, D)
) -> torch.Tensor:  # (B, D)
    """One decode step per row: the scan over rows of length 1, written batched (no row loop)."""
    idx = slots.to(ssm_states.device, torch.int64)
    h = ssm_states.index_select(0, idx).float()  # (B, D, N)
    dt = delta.float()[:, :, None]  # (B, D, 1)
    h = torch.exp(dt * A.float()) * h + dt * B.float()[:, None, :] * u.float()[:, :, None]
    y = (h * C.float()[:, None, :]).sum(-1)  # (B, D)
    if D is not None:
        y = y + u.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    ssm_states.index_copy_(0, idx, h.to(ssm_states.dtype))
    return y.to(u.dtype)

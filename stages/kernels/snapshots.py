"""Mid-chunk state snapshots: their validation (every backend), and the conv's snapshots in torch ops.

A call may ask for the state of a row right after some of its tokens (``snap_tok``, packed token
indices), written to other slots of the same pool (``snap_dst``); see stages/kernels/__init__.py.
A conv snapshot needs no arithmetic (it is the last K-1 conv inputs up to the token, from x and
the row's stored state), so the Triton backend gathers it with `conv_snapshots` (a dozen small
device ops, no sync) rather than in a kernel; the numba kernels write theirs inside their loops,
where it is nearly free (on the CPU each torch op costs tens of microseconds). The scan's
snapshot needs the recurrence, so every backend stores its h inside its token loop.
"""

from __future__ import annotations

import numpy as np
import torch


def _indices(t: torch.Tensor | None, name: str) -> np.ndarray:
    if t is None:
        return np.zeros(0, np.int64)
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int64 tensor")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer indices (int64), not {t.dtype}")
    return t.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()


def _given(t) -> bool:
    return t is not None and (not isinstance(t, torch.Tensor) or t.numel() > 0)  # not a tensor: rejected later


def wanted(snap_tok: torch.Tensor | None, snap_dst: torch.Tensor | None) -> bool:
    """Whether a call asks for snapshots at all (None and empty tensors ask for none)."""
    return _given(snap_tok) or _given(snap_dst)


def check_snapshots(snap_tok, snap_dst, T: int, S: int, slots) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate a call's snapshot request; returns (snap_tok, snap_dst) as contiguous int64 CPU
    tensors, or None when there are no snapshots (both None or empty).

    snap_tok must be strictly ascending packed token indices in [0, T); snap_dst distinct slots of
    the pool (of S) none of which is one of the call's `slots` (a tensor or an int64 array). Raises
    ValueError otherwise. Tensors on a GPU are copied to the CPU for the checks (a sync), so this
    costs nothing unless snapshots are asked for.
    """
    if not wanted(snap_tok, snap_dst):
        return None
    tok, dst = _indices(snap_tok, "snap_tok"), _indices(snap_dst, "snap_dst")
    if tok.shape[0] != dst.shape[0]:
        raise ValueError(f"snap_tok and snap_dst must have the same length, got {tok.shape[0]} and {dst.shape[0]}")
    if tok[0] < 0 or tok[-1] >= T:
        raise ValueError(f"snap_tok must be packed token indices in [0, {T}), got {tok.tolist()}")
    if tok.shape[0] > 1 and not np.all(tok[1:] > tok[:-1]):
        raise ValueError(f"snap_tok must be strictly ascending, got {tok.tolist()}")
    if dst.min() < 0 or dst.max() >= S:
        raise ValueError(f"snap_dst must be slots of the state pool [0, {S}), got {dst.tolist()}")
    if np.unique(dst).shape[0] != dst.shape[0]:
        raise ValueError(f"snap_dst must be distinct, got {dst.tolist()}")
    sl = slots if isinstance(slots, np.ndarray) else _indices(slots, "slots")
    if np.isin(dst, sl).any():
        raise ValueError(f"snap_dst must not be one of this call's slots: {dst.tolist()} vs {sl.tolist()}")
    return torch.from_numpy(tok), torch.from_numpy(dst)


def conv_snapshots(x: torch.Tensor, conv_states: torch.Tensor, cu_seqlens: torch.Tensor, slots: torch.Tensor,
                   snap_tok: torch.Tensor) -> torch.Tensor:
    """The conv state (S-pool dtype, (K', D, K-1) for K' snapshots) of each snapshot's row right
    after its token: the last K-1 entries of concat(conv_states[slot], x[row start : token + 1]).

    Reads the rows' *stored* states, so call it before the backend updates them. Vectorised: a
    dozen small ops whatever the number of snapshots.
    """
    dev = conv_states.device
    W = conv_states.shape[2]  # K-1
    tok = snap_tok.to(dev)  # (K',)
    cu = cu_seqlens.to(dev, torch.int64)
    row = torch.searchsorted(cu[1:], tok, right=True)  # (K',) row of each token (empty rows skipped)
    j = torch.arange(W, device=dev)
    # Entry j of a snapshot is entry q = pos + 1 + j of concat(stored state, row's x), pos the
    # token's place in its row: state column q if q < W, else token tok - (W - 1) + j of x.
    q = (tok - cu[row] + 1)[:, None] + j  # (K', W)
    # Both sources gathered as (K', W, D), channels contiguous, then one select.
    new = x.to(dev)[(tok[:, None] + (j - (W - 1))).clamp(min=0)].to(conv_states.dtype)
    slot = slots.to(dev, torch.int64)[row]
    old = conv_states[slot[:, None], :, q.clamp(max=W - 1)]  # (K', W, D): stored state column q
    return torch.where((q < W)[:, :, None], old, new).transpose(1, 2)  # (K', D, W)

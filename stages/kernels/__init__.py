"""Mamba-1 mixer kernels for Jamba: causal depthwise conv1d and the selective scan.

Both kernels work on *packed variable-length rows*, the layout vLLM calls "varlen". One call
processes B rows (sequences) whose tokens are concatenated along the first axis into T tokens::

    x          (T, D)       row b owns tokens cu_seqlens[b] : cu_seqlens[b+1]
    cu_seqlens (B+1,) int64 cumulative row lengths, cu_seqlens[0] = 0, cu_seqlens[B] = T
    slots      (B,)   int64 row b's recurrent state lives at index slots[b] of a state pool

A row may be one token (decode), many (a prompt chunk) or none, and rows of different lengths
mix freely in one call. The recurrent states sit in fixed pools of S slots and are updated in
place, so a sequence can be fed in chunks over several calls (chunked prefill, then decode) and
every call is exactly equivalent to processing each row alone, in one pass, from its stored
state. Slots must be distinct within a call (two rows writing the same state would be a
scheduling bug; `stages.cache.HybridCache.begin` rejects it).

The state pools::

    conv_states (S, D, K-1)  the last K-1 conv *inputs* of the sequence so far,
                             oldest first, same dtype as x (zeros when fresh)
    ssm_states  (S, D, N)    the SSM hidden state h, float32

All arithmetic is float32 whatever the input dtype (bf16 inputs are upcast); outputs come back
in the input's dtype.

Backends, one file each, every one checked against the reference in tests/test_scan.py:

    reference.py   plain torch, loops over rows and tokens: the semantics (any device, slow)
    numba_cpu.py   numba, parallel over channel blocks (CPU tensors)
    triton_gpu.py  Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, for tests)
    mamba_ssm.py   optional mamba-ssm / causal-conv1d CUDA kernels for pure decode steps

``JAMBA_KERNELS`` picks one, read on every call so it can be flipped while debugging:

    auto (default)  Triton on CUDA, numba on CPU
    triton          Triton (on CPU tensors only with TRITON_INTERPRET=1)
    numba           numba (CPU tensors only)
    torch           the reference loops (``ref`` is accepted as an old name)
    mamba_ssm       decode steps through mamba-ssm / causal-conv1d, the rest through Triton

An unknown value is an error, as is a backend that cannot run on the tensors' device: a fast
path is never swapped for the per-token loop behind the user's back.

Snapshots. Prefix caching keeps the Mamba state of a sequence at block boundaries (every 64
tokens, say), so a later request sharing that prefix can start from it instead of recomputing
it. A boundary usually falls inside a prefill chunk, so both varlen kernels can also write the
state *in the middle of* a call::

    snap_tok   (K',) int64  strictly ascending packed token indices in [0, T)
    snap_dst   (K',) int64  distinct slots of the same pool, none of them in this call's `slots`

After the call pool[snap_dst[k]] holds the state of the row owning token snap_tok[k] right
after that token: exactly what the row's slot would hold had the call ended there. For the conv
that is the last K-1 conv inputs up to and including the token (reaching back into the row's
stored state for a token among its first K-2), in the pool's dtype; for the scan it is h after
the token, float32. y and the rows' final states are the same, bit for bit, with or without
snapshots. None or empty tensors: no snapshots (the default). They may be on the CPU or the
kernels' device. A bad request (lengths differ, a token out of range or out of order, a
destination out of the pool, repeated or among `slots`) is a ValueError; checking it reads the
indices on the CPU, a device sync when they or `slots` are on a GPU, so only calls that ask for
snapshots pay it (snapshots.py). The numba kernels write snapshots inside their loops; Triton's
scan does too, while its conv gathers them with a few torch ops beforehand (a conv snapshot is a
copy of K-1 inputs, no arithmetic); JAMBA_KERNELS=mamba_ssm sends a call with snapshots to
Triton. `selective_state_update` takes none.
warmup.py compiles every kernel a stage will use before it serves (see `warm_up`).
"""

from __future__ import annotations

import os

import torch

from .reference import causal_conv1d_varlen_ref, selective_scan_varlen_ref, selective_state_update_ref
from .snapshots import wanted as _snapshots_wanted

__all__ = [
    "BACKENDS",
    "backend",
    "causal_conv1d_varlen",
    "causal_conv1d_varlen_ref",
    "selective_scan_varlen",
    "selective_scan_varlen_ref",
    "selective_state_update",
    "selective_state_update_ref",
]

BACKENDS = ("auto", "triton", "numba", "torch", "mamba_ssm")


def backend(device: torch.device | str) -> str:
    """The backend JAMBA_KERNELS selects for tensors on `device`: triton, numba, torch or mamba_ssm."""
    choice = os.environ.get("JAMBA_KERNELS", "").strip().lower() or "auto"
    if choice == "ref":
        choice = "torch"
    if choice not in BACKENDS:
        raise ValueError(f"JAMBA_KERNELS={choice!r} is not one of {', '.join(BACKENDS)}")
    kind = torch.device(device).type
    if choice == "auto":
        return "triton" if kind == "cuda" else "numba" if kind == "cpu" else "torch"
    if choice == "numba" and kind != "cpu":
        raise ValueError(f"JAMBA_KERNELS=numba runs on CPU tensors only, not {kind}")
    if choice in ("triton", "mamba_ssm") and kind != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"JAMBA_KERNELS={choice} needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                         f"Triton interpreter on CPU), not {kind}")
    return choice


# Backends are imported on first use: numba compiles and Triton needs a GPU (or its interpreter).
def _numba():
    from . import numba_cpu

    return numba_cpu


def _triton():
    try:
        from . import triton_gpu
    except ImportError as e:  # CPU-only installs have no triton
        raise ImportError("the Triton kernels need the `triton` package (it ships with CUDA builds "
                          "of torch); install it or pick another JAMBA_KERNELS backend") from e
    return triton_gpu


def causal_conv1d_varlen(
    x: torch.Tensor,  # (T, D)
    weight: torch.Tensor,  # (D, K)
    bias: torch.Tensor | None,  # (D,)
    conv_states: torch.Tensor,  # (S, D, K-1), updated in place
    cu_seqlens: torch.Tensor,  # (B+1,) int64
    slots: torch.Tensor,  # (B,) int64
    snap_tok: torch.Tensor | None = None,  # (K',) int64 ascending packed token indices
    snap_dst: torch.Tensor | None = None,  # (K',) int64 pool slots for the snapshots, not in `slots`
) -> torch.Tensor:  # (T, D), x's dtype, SiLU applied
    """Causal depthwise conv1d + SiLU over packed rows, from and into each row's conv state;
    conv_states[snap_dst[k]] gets the row's conv state right after token snap_tok[k]."""
    kind = backend(x.device)
    if kind == "numba":
        return _numba().causal_conv1d_varlen_cpu(x, weight, bias, conv_states, cu_seqlens, slots, snap_tok, snap_dst)
    if kind == "torch":
        return causal_conv1d_varlen_ref(x, weight, bias, conv_states, cu_seqlens, slots, snap_tok, snap_dst)
    if kind == "mamba_ssm" and not _snapshots_wanted(snap_tok, snap_dst):
        from . import mamba_ssm

        if mamba_ssm.all_rows_single_token(cu_seqlens, x.shape[0]):
            y = mamba_ssm.conv_decode(x, weight, bias, conv_states, slots)
            if y is not None:
                return y
    return _triton().causal_conv1d_varlen_triton(x, weight, bias, conv_states, cu_seqlens, slots, snap_tok, snap_dst)


def selective_scan_varlen(
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
    snap_dst: torch.Tensor | None = None,  # (K',) int64 pool slots for the snapshots, not in `slots`
) -> torch.Tensor:  # (T, D), u's dtype
    """Mamba-1 selective scan over packed rows, from and into each row's SSM state:
    h = exp(delta*A) * h + delta*B*u;  y = (h @ C + D*u) * silu(z).
    ssm_states[snap_dst[k]] gets the row's h right after token snap_tok[k]."""
    kind = backend(u.device)
    args = (u, delta, A, B, C, D, z, ssm_states, cu_seqlens, slots, snap_tok, snap_dst)
    if kind == "numba":
        return _numba().selective_scan_varlen_cpu(*args)
    if kind == "torch":
        return selective_scan_varlen_ref(*args)
    if kind == "mamba_ssm" and not _snapshots_wanted(snap_tok, snap_dst):  # mamba-ssm takes no snapshots
        from . import mamba_ssm

        if mamba_ssm.all_rows_single_token(cu_seqlens, u.shape[0]):
            y = mamba_ssm.scan_decode(u, delta, A, B, C, D, z, ssm_states, slots)
            if y is not None:
                return y
    return _triton().selective_scan_varlen_triton(*args)


def selective_state_update(
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
    """One decode step for B sequences, each row's state at its slot (the scan over 1-token rows)."""
    kind = backend(u.device)
    if kind == "torch":
        return selective_state_update_ref(ssm_states, slots, u, delta, A, B, C, D, z)
    if kind == "triton":
        return _triton().selective_state_update_triton(ssm_states, slots, u, delta, A, B, C, D, z)
    cu = torch.arange(u.shape[0] + 1, device=u.device, dtype=torch.int64)
    return selective_scan_varlen(u, delta, A, B, C, D, z, ssm_states, cu, slots)

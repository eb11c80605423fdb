"""Optional: mamba-ssm's and causal-conv1d's CUDA decode kernels (``JAMBA_KERNELS=mamba_ssm``).

They only take the pure decode step (every row one token): mamba-ssm's ``selective_scan_fn``
cannot start a prompt chunk from a stored state, so prompts always go to our Triton kernels.
The packages are imported on first use; a missing one, or one that rejects a call (e.g. an
older causal_conv1d that wants a width-K conv state), is logged once and dropped, and the
caller falls back. Callers pass copies of the states, so a failed call leaves the pools untouched.

Both functions return None when they did not run; the dispatcher then uses Triton.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_ops: dict | None = None  # name -> function, filled once on first use


def _load_ops() -> dict:
    global _ops
    if _ops is None:
        ops = {}
        try:
            from causal_conv1d import causal_conv1d_update

            ops["causal_conv1d_update"] = causal_conv1d_update
        except Exception as e:  # ImportError, or a broken CUDA extension
            logger.info("causal_conv1d unavailable (%s); decode conv runs on Triton", e)
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update

            ops["selective_state_update"] = selective_state_update
        except Exception as e:
            logger.info("mamba_ssm unavailable (%s); decode scan runs on Triton", e)
        _ops = ops
    return _ops


def all_rows_single_token(cu_seqlens: torch.Tensor, T: int) -> bool:
    B = cu_seqlens.shape[0] - 1
    if T != B:
        return False
    # T == B still allows a 0-length row next to a 2-token one, so check exactly.
    return bool(torch.equal(cu_seqlens.to("cpu", torch.int64), torch.arange(B + 1, dtype=torch.int64)))


def _call(name: str, *args, **kwargs):
    fn = _load_ops().get(name)
    if fn is None:
        return None
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        logger.warning("%s failed (%s); using the Triton kernel from now on", name, e)
        _load_ops().pop(name, None)
        return None


def conv_decode(x, weight, bias, conv_states, slots) -> torch.Tensor | None:
    """causal_conv1d_update on x (B, D): conv_state (B, D, state_len >= K-1) shifted in place.

    We gather our rows' states into a copy, let it update the copy and scatter back. The CUDA
    kernel wants a single dtype.
    """
    one_dtype = weight.dtype == x.dtype == conv_states.dtype and (bias is None or bias.dtype == x.dtype)
    if not one_dtype or "causal_conv1d_update" not in _load_ops():
        return None
    idx = slots.to(conv_states.device, torch.int64)
    st = conv_states.index_select(0, idx)  # (B, D, K-1) copy
    y = _call("causal_conv1d_update", x.contiguous(), st, weight.contiguous(), bias, activation="silu")
    if y is not None:
        conv_states.index_copy_(0, idx, st)
    return y


def scan_decode(u, delta, A, B, C, D, z, ssm_states, slots) -> torch.Tensor | None:
    """selective_state_update: state (B, D, N) updated in place, delta used as given."""
    if "selective_state_update" not in _load_ops():
        return None
    idx = slots.to(ssm_states.device, torch.int64)
    st = ssm_states.index_select(0, idx)  # (B, D, N) copy
    y = _call("selective_state_update", st, u, delta, A, B, C, D=D, z=z, dt_bias=None, dt_softplus=False)
    if y is not None:
        ssm_states.index_copy_(0, idx, st)
    return y

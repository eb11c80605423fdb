"""8-bit weights: symmetric int8 per output channel, weight-only (activations stay in the model's dtype).

A weight W (out, in) is stored as int8 `q` (out, in) and a float32 `scale` (out,), with
scale = max|W[o, :]| / 127 and q = round(W / scale), so W ~= q * scale[:, None] to within
scale / 2 per entry. The scale factors out of every output's dot product, so a linear layer is

    y[t, o] = scale[o] * sum_k x[t, k] * q[o, k]        (+ bias[o])

which is what the fast paths compute: the int8 weights are read (a quarter of float32's bytes,
half of bf16's) and widened inside the matmul, and never exist at full precision in memory.
`int8_linear_reference` (stages/linear.py) is the plain semantics, dequantize then matmul; every fast path is
tested against it (tests/test_quant.py).

Modes (`load_stage(..., quantize=MODE)`):

    int8-experts      the MoE experts only (gate_up_proj (E, 2I, H), down_proj (E, H, I)), per
                      expert and output channel, like vLLM's experts_int8. Experts are most of
                      Jamba's bytes (87% of Jamba-Large's parameters) and run few tokens each.
    int8              every linear layer but the Mamba mixer's, the router and the head: attention
                      q/k/v/o, the dense MLPs and the experts. The Mamba projections feed a
                      recurrence that carries their errors along the whole sequence, the router's
                      errors flip expert choices, and these are a small share of the bytes.
    int8-with-mamba   int8 plus the Mamba in_proj/x_proj/dt_proj/out_proj, for the quality
                      experiment (how much does quantizing Mamba hurt?), not for serving.

Backends for `int8_linear` (stages/linear.py, with its reference `int8_linear_reference`):
    CUDA  Triton kernel (stages/kernels/triton_int8.py): int8 tiles widened in registers, fp32 accumulation.
    CPU   numba kernel for skinny inputs (decode steps, T <= 32): each int8 weight row is widened
          once and dotted with every token; longer inputs (prefill) dequantize a block of output
          rows at a time and run sgemm on it, so the float copy is a few MB whatever the layer.
          JAMBA_INT8_KERNEL=triton sends CPU tensors to the Triton kernel too (with TRITON_INTERPRET=1:
          how tests run the whole model through it). torch's own `torch._weight_int8pack_mm` (fp32 x, int8 W, scales of x's dtype) was
          measured first and is 3-15x *slower* than fp32 sgemm on these shapes (2 cores: 21 vs
          3.9 ms at T=1, 595 vs 32 ms at T=32 for 4096x4096), so it is not used.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import check_quant_mode
from .linear import dequantize_int8, int8_linear
from .model import Experts, JambaStage, Linear

# Leaves of the Linear layers each mode quantizes, by the module holding them (see quantized_param).
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_MAMBA = ("in_proj", "x_proj", "dt_proj", "out_proj")



# ---------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------


# Rows quantized at a time, in float32: bounds the working copies (a few of this many elements)
# whatever the size of the tensor (a fused (E, 2I, H) expert tensor of Jamba-Large is 13 GB in bf16).
QUANT_CHUNK_ELEMS = 1 << 22


def quantize_int8(w: torch.Tensor, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: w (..., out, in) -> q int8 (..., out, in), scale fp32 (..., out),
    on `device` (default w's). Leading dimensions (experts) are independent: each (expert, output
    channel) row has its own scale."""
    device = w.device if device is None else torch.device(device)
    q = torch.empty(w.shape, dtype=torch.int8, device=device)
    scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=device)
    quantize_int8_into(w, q, scale)
    return q, scale


def quantize_int8_into(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """quantize_int8, writing into q (..., out, in) int8 and scale (..., out) float32 (views are fine).

    Works a block of rows at a time: each block is copied to q's device in float32, so a tensor
    read from a memory-mapped checkpoint is never widened whole, on the host or on the GPU."""
    rows_w = w.reshape(-1, w.shape[-1])  # (R, in); a view for contiguous w
    R, C = rows_w.shape
    q_rows, s_rows = q.view(R, C), scale.view(R)
    step = max(1, QUANT_CHUNK_ELEMS // max(C, 1))
    for lo in range(0, R, step):
        blk = rows_w[lo : lo + step].to(device=q.device, dtype=torch.float32)  # (rows, in)
        absmax = blk.abs().amax(dim=-1)  # (rows,)
        # An all-zero row gets scale 1: q = 0 and dequantizes to exact zeros instead of 0/0 = NaN.
        s = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q_rows[lo : lo + step] = torch.round(blk / s[:, None]).clamp_(-127, 127).to(torch.int8)  # not div_: blk may be w itself
        s_rows[lo : lo + step] = s


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 (out, in) with float32 per-row scales `weight_scale` (out,).

    State dict names: `weight` (int8) and `weight_scale` beside the original `bias`."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (see Linear.matmul)."""
        return int8_linear(x, self.weight, self.weight_scale)


class Int8Experts(nn.Module):
    """Experts with int8 weights and a scale per (expert, output channel):
    gate_up_proj (E, 2I, H) + gate_up_proj_scale (E, 2I), down_proj (E, H, I) + down_proj_scale (E, H)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        E, H, I = num_experts, hidden, intermediate
        self.register_buffer("gate_up_proj", torch.empty(E, 2 * I, H, dtype=torch.int8))
        self.register_buffer("gate_up_proj_scale", torch.empty(E, 2 * I, dtype=torch.float32))
        self.register_buffer("down_proj", torch.empty(E, H, I, dtype=torch.int8))
        self.register_buffer("down_proj_scale", torch.empty(E, H, dtype=torch.float32))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate_up, down and their scales, as stages.ops.moe_experts takes them."""
        return self.gate_up_proj, self.down_proj, self.gate_up_proj_scale, self.down_proj_scale


def quantized_param(name: str, mode: str | None) -> bool:
    """Whether parameter `name` (HF naming) is stored int8 under `mode`."""
    if mode is None:
        return False
    parts = name.split(".")
    if ".experts." in name and parts[-1] in ("gate_up_proj", "down_proj"):
        return True
    if mode == "int8-experts" or len(parts) < 3 or parts[-1] != "weight":
        return False
    owner, leaf = parts[-3], parts[-2]  # e.g. self_attn, q_proj
    if owner == "self_attn" and leaf in _ATTENTION or owner == "feed_forward" and leaf in _MLP:
        return True
    return mode == "int8-with-mamba" and owner == "mamba" and leaf in _MAMBA


def quantize_modules(stage: JambaStage, mode: str | None) -> JambaStage:
    """Swap the modules `mode` quantizes for their int8 versions, in place (on a meta-device stage
    before loading, or on a loaded one; the new modules' tensors are empty until loaded)."""
    check_quant_mode(mode)
    if mode is None:
        return stage
    c = stage.config
    for mod_name, mod in list(stage.named_modules()):
        if isinstance(mod, Experts):
            new = Int8Experts(c.num_experts, c.hidden_size, c.intermediate_size)
        elif isinstance(mod, Linear) and quantized_param(f"{mod_name}.weight", mode):
            new = Int8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        else:
            continue
        parent_name, _, leaf = mod_name.rpartition(".")
        new = new.to(mod.gate_up_proj.device if isinstance(mod, Experts) else mod.weight.device)
        setattr(stage.get_submodule(parent_name) if parent_name else stage, leaf, new)
    stage.quantize = mode
    return stage


def quantize_stage(stage: JambaStage, mode: str | None) -> JambaStage:
    """Quantize a loaded full-precision stage in place (tests and tools; load_stage quantizes while loading)."""
    state = {n: t.detach() for n, t in stage.state_dict().items()}
    quantize_modules(stage, mode)
    new_state = {}
    for n, t in state.items():
        if quantized_param(n, mode):
            new_state[n], new_state[scale_name(n)] = quantize_int8(t)
        else:
            new_state[n] = t
    stage.load_state_dict(new_state, assign=True, strict=True)
    return stage


def scale_name(name: str) -> str:
    """The state-dict name of a quantized tensor's scales: `x.weight` -> `x.weight_scale`,
    `experts.gate_up_proj` -> `experts.gate_up_proj_scale`."""
    return name + "_scale"


def dequantized_state(stage: JambaStage) -> dict[str, torch.Tensor]:
    """A quantized stage's weights as a full-precision state dict (int8 * scale), for a plain JambaStage:
    the reference the quantized stage must match to float32 rounding."""
    state = stage.state_dict()
    out = {}
    for n, t in state.items():
        if n.endswith("_scale"):
            continue
        out[n] = dequantize_int8(t, state[scale_name(n)]) if t.dtype == torch.int8 else t
    return out

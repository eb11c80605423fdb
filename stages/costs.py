"""What a Jamba model and its cache cost, from the config alone: parameters, weight bytes, FLOPs
per token and cache bytes, counted exactly as `stages/model.py` builds the layers and
`stages/cache.py` lays out the cache (tests/test_plan.py checks both against the real modules).
No torch here: the planner (cluster/runtime/plan.py) and the service's start-up checks use them
in processes that never compute.

    weights   parameters x dtype bytes; with quantization (stages/quant.py), the quantized weights
              take 1 byte per parameter plus a float32 scale per output channel (per expert, for
              the experts).
    compute   FLOPs per token. A matmul with a (in, out) weight costs 2*in*out per token, so
              every layer costs ~2 x the parameters it touches per token, plus
                attention   QK^T and AV over the context: 2 * 2 * ctx * n_heads * head_dim,
                            at the full context ctx (the last, dearest decode step),
                Mamba       the depthwise conv and the selective scan (~7 FLOPs per channel
                            and state: exp(dt*A), *B*u, dA*h + dBu, C*h and the sum),
                MoE         the router and the top_k experts only, not all of them.
              The embedding is a table lookup (~0 FLOPs); the head costs 2*hidden*vocab per
              sampled token, counted here as per token (prefill tokens skip it, so this slightly
              overweights the last stage, the safe side). Norms and activations are ignored.
    cache     K and V per token on attention layers (paged in blocks), a fixed conv + SSM state
              per sequence on Mamba layers (float32 SSM state), and the same Mamba state again
              for each prefix-cache snapshot.
"""

from __future__ import annotations

from .config import JambaConfig

SCAN_FLOPS_PER_STATE = 7  # selective scan, per token, per (channel, state) pair


# ---- cost of one layer -----------------------------------------------------------------------------
# Parameter counts mirror stages/model.py module by module (tests check them against the meta device).
def _attention_params(c: JambaConfig) -> int:
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return c.hidden_size * q_out + 2 * c.hidden_size * kv_out + q_out * c.hidden_size  # q, k, v, o


def _mamba_matmul_params(c: JambaConfig) -> int:
    """The Mamba mixer's projection weights: what its per-token matmuls read."""
    h, d, n, r = c.hidden_size, c.mamba_d_inner, c.mamba_d_state, c.mamba_dt_rank
    return h * 2 * d + d * (r + 2 * n) + r * d + d * h  # in_proj, x_proj, dt_proj, out_proj


def _mamba_params(c: JambaConfig) -> int:
    h, d, n, r, k = c.hidden_size, c.mamba_d_inner, c.mamba_d_state, c.mamba_dt_rank, c.mamba_d_conv
    total = _mamba_matmul_params(c)
    total += d * k + (d if c.mamba_conv_bias else 0)  # depthwise conv1d
    total += (2 * d + h) if c.mamba_proj_bias else 0  # in_proj and out_proj biases
    total += d  # dt_proj bias
    total += d * n + d  # A_log, D
    total += r + 2 * n  # dt, B, C RMSNorms
    return total


def _mlp_params(c: JambaConfig) -> int:
    return 3 * c.hidden_size * c.intermediate_size  # gate, up, down


def _quantized_params_rows(c: JambaConfig, layer: int, quantize: str | None) -> tuple[int, int]:
    """(parameters stored int8, output channels they have: one float32 scale each) in decoder layer
    `layer` under `quantize` (see stages.quant.quantized_param for which weights each mode takes)."""
    if quantize is None:
        return 0, 0
    h, i = c.hidden_size, c.intermediate_size
    params = rows = 0
    if c.is_moe(layer):  # experts: gate_up (E, 2I, H) and down (E, H, I)
        params, rows = _expert_params(c, layer), c.num_experts * (2 * i + h)
    elif quantize != "int8-experts":  # dense MLP: gate, up (I rows each), down (H rows)
        params, rows = _mlp_params(c), 2 * i + h
    if quantize == "int8-experts":
        return params, rows
    if c.is_attention(layer):
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        params, rows = params + _attention_params(c), rows + q_out + 2 * kv_out + h
    elif quantize == "int8-with-mamba":
        d, n, r = c.mamba_d_inner, c.mamba_d_state, c.mamba_dt_rank
        params, rows = params + _mamba_matmul_params(c), rows + 2 * d + (r + 2 * n) + d + h
    return params, rows


def layer_weight_bytes(c: JambaConfig, layer: int, dtype_bytes: int, quantize: str | None = None) -> int:
    """Bytes of decoder layer `layer`'s weights: dtype_bytes per parameter, int8 + fp32 scales where quantized."""
    qparams, rows = _quantized_params_rows(c, layer, quantize)
    return (layer_params(c, layer) - qparams) * dtype_bytes + qparams + 4 * rows


def _expert_params(c: JambaConfig, layer: int) -> int:
    """Parameters held in experts (all of them), 0 on a dense layer."""
    return c.num_experts * _mlp_params(c) if c.is_moe(layer) else 0


def layer_params(c: JambaConfig, layer: int) -> int:
    """Parameters of decoder layer `layer`: two RMSNorms, its mixer and its feed-forward."""
    mixer = _attention_params(c) if c.is_attention(layer) else _mamba_params(c)
    ff = c.num_experts * c.hidden_size + _expert_params(c, layer) if c.is_moe(layer) else _mlp_params(c)
    return 2 * c.hidden_size + mixer + ff


def layer_flops(c: JambaConfig, layer: int, ctx: int) -> int:
    """FLOPs per token of decoder layer `layer`, attending over `ctx` tokens if it is attention."""
    if c.is_attention(layer):
        mixer = 2 * _attention_params(c) + 2 * 2 * ctx * c.num_attention_heads * c.head_dim
    else:
        d, n = c.mamba_d_inner, c.mamba_d_state
        mixer = 2 * _mamba_matmul_params(c) + 2 * d * c.mamba_d_conv + SCAN_FLOPS_PER_STATE * d * n
    if c.is_moe(layer):
        ff = 2 * c.num_experts * c.hidden_size + c.num_experts_per_tok * 2 * _mlp_params(c)
    else:
        ff = 2 * _mlp_params(c)
    return mixer + ff


def embed_params(c: JambaConfig) -> int:
    return c.vocab_size * c.hidden_size


def head_params(c: JambaConfig) -> int:
    """Final norm plus lm_head (or the classifier's `score`), always a separate weight in a stage."""
    return c.hidden_size + c.hidden_size * _head_outputs(c)


def head_flops(c: JambaConfig) -> int:
    return 2 * c.hidden_size * _head_outputs(c)


def _head_outputs(c: JambaConfig) -> int:
    return c.num_labels if c.is_classifier else c.vocab_size


def count_params(c: JambaConfig) -> tuple[int, int]:
    """(total, active per token): active counts num_experts_per_tok / num_experts of expert weights."""
    layers = range(c.num_hidden_layers)
    total = embed_params(c) + sum(layer_params(c, i) for i in layers) + head_params(c)
    experts = sum(_expert_params(c, i) for i in layers)
    return total, total - experts + experts * c.num_experts_per_tok // c.num_experts


# ---- cost of a stage -------------------------------------------------------------------------------
def stage_params(c: JambaConfig, start: int, end: int) -> int:
    """Parameters of the stage owning layers [start, end), with the embedding and head on the ends."""
    total = sum(layer_params(c, i) for i in range(start, end))
    total += embed_params(c) if start == 0 else 0
    total += head_params(c) if end == c.num_hidden_layers else 0
    return total


def stage_weight_bytes(c: JambaConfig, start: int, end: int, dtype_bytes: int, quantize: str | None = None) -> int:
    """Weight bytes of the stage owning layers [start, end); the embedding and head stay in the dtype."""
    total = sum(layer_weight_bytes(c, i, dtype_bytes, quantize) for i in range(start, end))
    total += embed_params(c) * dtype_bytes if start == 0 else 0
    return total + (head_params(c) * dtype_bytes if end == c.num_hidden_layers else 0)


def stage_flops(c: JambaConfig, start: int, end: int, ctx: int) -> int:
    total = sum(layer_flops(c, i, ctx) for i in range(start, end))
    return total + (head_flops(c) if end == c.num_hidden_layers else 0)


# ---- cache ------------------------------------------------------------------------------------------
def slot_bytes(config, layers, max_seq_len: int, dtype_bytes: int = 2) -> int:
    """One sequence of `max_seq_len` tokens in `layers` (a JambaConfig's): K and V in the attention
    layers, the conv state and the float32 SSM state in the Mamba layers."""
    c, total = config, 0
    for i in layers:
        if c.is_attention(i):
            total += 2 * max_seq_len * c.num_key_value_heads * c.head_dim * dtype_bytes
        else:
            total += c.mamba_d_inner * (c.mamba_d_conv - 1) * dtype_bytes + c.mamba_d_inner * c.mamba_d_state * 4
    return total


def block_bytes(config, layers, block_size: int, dtype_bytes: int = 2) -> int:
    """K and V of one block in every attention layer of `layers`."""
    n_attn = sum(1 for i in layers if config.is_attention(i))
    return n_attn * 2 * block_size * config.num_key_value_heads * config.head_dim * dtype_bytes


def snapshot_bytes(config, layers, dtype_bytes: int = 2) -> int:
    """Conv and SSM states of every Mamba layer of `layers`: one slot's, or one snapshot's."""
    return slot_bytes(config, [i for i in layers if not config.is_attention(i)], 0, dtype_bytes)


def stage_cache_bytes(c: JambaConfig, start: int, end: int, ctx: int, dtype_bytes: int) -> int:
    """Cache bytes one sequence of `ctx` tokens occupies on the stage owning layers [start, end)."""
    return slot_bytes(c, range(start, end), ctx, dtype_bytes)

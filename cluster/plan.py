"""Pipeline partitioning: which GPU runs which layers of a Jamba model.

A pipeline of P stages splits the N decoder layers into P contiguous ranges [start, end); stage 0
also holds the token embedding, the last stage the final norm and the head. Tokens flow through
the stages one after another, and in steady state every stage works on a different micro-batch
at once, so the pipeline delivers tokens at the pace of its *slowest* stage:

    throughput  ~  1 / max_s(time per token of stage s)

Work on the other stages is wasted idle time. The planner therefore balances compute per token,
and reports memory (weights + per-sequence cache) as a constraint that must be met, not as the
quantity to balance. Jamba makes the two differ: a MoE layer stores num_experts expert MLPs but
runs only num_experts_per_tok of them per token (Jamba-Large: 16 stored, 2 run).

The cost model (closed form from the config; shapes in the comments of each function):

    weights   parameters x dtype bytes, counted exactly as `stages.model.JambaStage` builds them;
              with --quantize (stages/quant.py), the quantized weights take 1 byte per parameter
              plus a float32 scale per output channel (per expert, for the experts).
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
    cache     bytes per sequence at context ctx (`stages.paging.slot_bytes`): K and V grow
              with ctx on attention layers only; a Mamba layer's conv + SSM state is fixed.
              The KV cache is paged (stages/cache.py), so a sequence takes only the blocks its
              tokens fill; with --gpu-memory the plan also says how many short sequences fit
              beside one of the full context, after the prefix cache's Mamba snapshots
              (--prefix-snapshots per stage, each one sequence's Mamba state) are set aside.

`partition` finds the contiguous split that minimises the largest stage compute exactly (dynamic
programming over split points), breaks ties by minimising the largest stage's weight bytes, and
can be restricted to splits whose every stage fits a memory budget.

    config = load_config("jamba-large-1.6")          # or a checkpoint directory
    plans = make_plan(config, 16, ctx=4096, gpu_memory=parse_bytes("80GiB"))
    print(format_plan(plans, config, ctx=4096, gpu_memory=parse_bytes("80GiB")))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stages.config import QUANT_MODES, JambaConfig
from stages.paging import block_bytes, slot_bytes

# ---- published model shapes ---------------------------------------------------------------------
# HF `config.json` fields of AI21's 1.6 releases (ai21labs/AI21-Jamba-{Mini,Large}-1.6); fields the
# planner does not need (use_mamba_kernels, router_aux_loss_coef, ...) are left out.
_JAMBA_1_6_COMMON = {
    "model_type": "jamba",
    "architectures": ["JambaForCausalLM"],
    "vocab_size": 65536,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "attn_layer_period": 8,
    "attn_layer_offset": 4,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_dt_rank": "auto",  # ceil(hidden / 16): 256 for Mini, 512 for Large
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
    "max_position_embeddings": 262144,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
PRESETS: dict[str, dict] = {
    # ~52B parameters, ~12B active per token
    "jamba-mini-1.6": {
        **_JAMBA_1_6_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    # ~398B parameters, ~94B active per token
    "jamba-large-1.6": {
        **_JAMBA_1_6_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 24576,
        "num_hidden_layers": 72,
        "num_attention_heads": 64,
    },
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_QUANT_NOTE = {
    "int8-experts": "int8 in the experts (fp32 scale per expert channel)",
    "int8": "int8 in every linear layer but Mamba's, the router and the head (fp32 scale per channel)",
    "int8-with-mamba": "int8 in every linear layer but the router and the head (fp32 scale per channel)",
}
SCAN_FLOPS_PER_STATE = 7  # selective scan, per token, per (channel, state) pair; see module docstring


def load_config(model_or_preset: str) -> JambaConfig:
    """A checkpoint directory (or its config.json), or a preset name such as "jamba-large-1.6".

    An existing path wins over a preset of the same name. Preset names are matched without case
    and with or without the hub prefix, so "ai21labs/AI21-Jamba-Large-1.6" works too.
    """
    path = Path(model_or_preset)
    if path.exists():
        return JambaConfig.from_file(path)
    key = model_or_preset.strip().lower()
    key = key.removeprefix("ai21labs/").removeprefix("ai21-")
    if key in PRESETS:
        return JambaConfig.from_dict(PRESETS[key])
    raise ValueError(
        f"{model_or_preset!r} is neither a checkpoint directory nor a preset; presets: {', '.join(PRESETS)}"
    )


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


def stage_block_bytes(c: JambaConfig, start: int, end: int, block_size: int, dtype_bytes: int) -> int:
    """K and V bytes of one paged block of `block_size` tokens on the stage's attention layers."""
    return block_bytes(c, range(start, end), block_size, dtype_bytes)


def stage_cache_bytes(c: JambaConfig, start: int, end: int, ctx: int, dtype_bytes: int) -> int:
    """Cache bytes one sequence of `ctx` tokens occupies on the stage (the SSM state is float32)."""
    return slot_bytes(c, range(start, end), ctx, dtype_bytes)


# ---- partitioning ----------------------------------------------------------------------------------
def partition(
    config: JambaConfig,
    num_stages: int,
    *,
    ctx: int = 4096,
    dtype_bytes: int = 2,
    memory_per_stage: int | None = None,
    quantize: str | None = None,
) -> list[tuple[int, int]]:
    """Split the layers into `num_stages` contiguous, non-empty ranges [start, end).

    Minimises the largest stage's FLOPs per token (the pipeline's bottleneck) exactly; among the
    splits that reach that minimum, minimises the largest stage's weight bytes.
    memory_per_stage: bytes a stage may use (GPU memory less any reserve). When given, only splits
    whose every stage holds its weights plus the cache of one sequence of `ctx` tokens are
    considered; ValueError if there is none.
    """
    n = config.num_hidden_layers
    if num_stages < 1:
        raise ValueError(f"need at least 1 stage, got {num_stages}")
    if num_stages > n:
        raise ValueError(f"cannot split {n} layers into {num_stages} stages: every stage needs at least one layer")

    # Prefix sums over layers, so a stage's cost is O(1): cost(i, j) = pre[j] - pre[i] (+ ends).
    def prefix(values: list[int]) -> list[int]:
        out = [0]
        for v in values:
            out.append(out[-1] + v)
        return out

    flops_pre = prefix([layer_flops(config, i, ctx) for i in range(n)])
    bytes_pre = prefix([layer_weight_bytes(config, i, dtype_bytes, quantize) for i in range(n)])
    cache_pre = prefix([stage_cache_bytes(config, i, i + 1, ctx, dtype_bytes) for i in range(n)])
    first_params, last_params, last_flops = embed_params(config), head_params(config), head_flops(config)

    def flops(i: int, j: int) -> int:
        return flops_pre[j] - flops_pre[i] + (last_flops if j == n else 0)

    def weight_bytes(i: int, j: int) -> int:
        ends = (first_params if i == 0 else 0) + (last_params if j == n else 0)
        return bytes_pre[j] - bytes_pre[i] + ends * dtype_bytes

    def fits(i: int, j: int) -> bool:
        return memory_per_stage is None or weight_bytes(i, j) + cache_pre[j] - cache_pre[i] <= memory_per_stage

    best_flops, _ = _min_max_split(n, num_stages, flops, fits)
    if best_flops is None:
        raise NoFittingSplitError(
            f"no split of {n} layers into {num_stages} stages fits {memory_per_stage / 2**30:.1f} GiB per stage "
            f"(weights plus one {ctx}-token sequence); use more stages or a smaller dtype"
        )
    _, split = _min_max_split(n, num_stages, weight_bytes, lambda i, j: fits(i, j) and flops(i, j) <= best_flops)
    return split


class NoFittingSplitError(ValueError):
    """`partition` with a memory budget found no split whose every stage fits."""


def _min_max_split(
    n: int, k: int, cost: Callable[[int, int], int], allowed: Callable[[int, int], bool]
) -> tuple[int | None, list[tuple[int, int]]]:
    """Exact min over contiguous k-splits of [0, n) of max(cost(stage)), using only allowed stages.

    best[s][j] = the smallest max-cost of splitting the first j layers into s stages:
        best[s][j] = min over i < j of max(best[s-1][i], cost(i, j))
    O(k * n^2) evaluations; n is at most ~100 layers. Returns (None, []) if nothing is allowed.
    """
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[-1] * (n + 1) for _ in range(k + 1)]  # cut[s][j]: start of the s-th stage in that optimum
    best[0][0] = 0
    for s in range(1, k + 1):
        # s stages need at least s layers, and leave at least k - s for the stages after them.
        for j in range(s, n - (k - s) + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == inf or not allowed(i, j):
                    continue
                value = max(best[s - 1][i], cost(i, j))
                if value < best[s][j]:  # strict: the earliest cut wins ties, so results are deterministic
                    best[s][j], cut[s][j] = value, i
    if best[k][n] == inf:
        return None, []
    split, j = [], n
    for s in range(k, 0, -1):
        split.append((cut[s][j], j))
        j = cut[s][j]
    return best[k][n], split[::-1]


def parse_layer_split(spec: str, num_layers: int) -> list[tuple[int, int]]:
    """A hand-made split: layer counts "9,9,9,9,9,9,9,9" or boundaries "0,9,18,27,36,45,54,63,72".

    A spec that starts with 0 is read as boundaries (a stage cannot have 0 layers); others as counts.
    """
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in items):
        raise ValueError(f"layer split {spec!r}: expected comma-separated integers, e.g. '9,9,9,9' or '0,9,18,27,36'")
    values = []
    for s in items:
        try:
            values.append(int(s))
        except ValueError:
            raise ValueError(f"layer split {spec!r}: {s!r} is not an integer") from None
    if any(v < 0 for v in values):
        raise ValueError(f"layer split {spec!r}: negative numbers are not allowed")

    if values[0] == 0 and len(values) > 1:  # boundaries
        bounds = values
        for a, b in zip(bounds, bounds[1:]):
            if b <= a:
                raise ValueError(f"layer boundaries {spec!r} must be strictly increasing ({a} then {b}): every stage needs a layer")
        if bounds[-1] != num_layers:
            raise ValueError(f"layer boundaries {spec!r} end at {bounds[-1]}, the model has {num_layers} layers")
    else:  # counts
        if any(v == 0 for v in values):
            raise ValueError(f"layer counts {spec!r}: every stage needs at least one layer")
        if sum(values) != num_layers:
            raise ValueError(f"layer counts {spec!r} add up to {sum(values)}, the model has {num_layers} layers")
        bounds = [0]
        for v in values:
            bounds.append(bounds[-1] + v)
    return list(zip(bounds, bounds[1:]))


# ---- plans -----------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """One pipeline stage: layers [start, end) and what they cost."""

    index: int
    start: int
    end: int
    n_attention: int
    n_mamba: int
    n_moe: int
    num_params: int
    weight_bytes: int  # parameters x dtype bytes (int8 + fp32 scales where quantized)
    cache_bytes_per_seq: int  # one sequence at the plan's context
    flops_per_token: int
    kv_bytes_per_block: int = 0  # K and V of one paged block on this stage's attention layers
    snapshot_bytes: int = 0  # one sequence's Mamba states here (a slot's, or a prefix-cache snapshot's)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def max_sequences(self, gpu_memory_bytes: int, reserve_fraction: float = 0.1) -> int:
        """Concurrent sequences whose cache fits beside the weights; 0 if the weights alone don't fit.

        The reserve covers what the plan does not model: activations, workspace, the CUDA context.
        """
        free = int(gpu_memory_bytes * (1 - reserve_fraction)) - self.weight_bytes
        if free <= 0 or self.cache_bytes_per_seq <= 0:
            return 0
        return free // self.cache_bytes_per_seq


def make_plan(
    config: JambaConfig,
    num_stages: int | None,
    layer_split: str | list[tuple[int, int]] | None = None,
    *,
    ctx: int = 4096,
    dtype_bytes: int = 2,
    gpu_memory: int | None = None,
    reserve_fraction: float = 0.1,
    quantize: str | None = None,
    block_size: int = 64,
) -> list[StagePlan]:
    """Plan `num_stages` stages: from `layer_split` if given (a spec or ranges), else by `partition`.

    With `gpu_memory`, the partition keeps to splits where every stage fits (weights plus one
    sequence); if no such split exists it returns the compute-balanced one, and `format_plan`
    marks the stages that do not fit.
    """
    n = config.num_hidden_layers
    if not 1 <= ctx <= config.max_position_embeddings:
        raise ValueError(f"context {ctx} is outside 1..{config.max_position_embeddings}, the model's maximum")
    if layer_split is not None:
        ranges = parse_layer_split(layer_split, n) if isinstance(layer_split, str) else list(layer_split)
        if num_stages is not None and len(ranges) != num_stages:
            raise ValueError(f"the layer split has {len(ranges)} stages but {num_stages} were asked for")
    elif num_stages is None:
        raise ValueError("give the number of stages or a layer split")
    else:
        ranges = partition(config, num_stages, ctx=ctx, dtype_bytes=dtype_bytes, quantize=quantize)
        if gpu_memory is not None:
            usable = int(gpu_memory * (1 - reserve_fraction))
            try:
                ranges = partition(config, num_stages, ctx=ctx, dtype_bytes=dtype_bytes, memory_per_stage=usable,
                                   quantize=quantize)
            except NoFittingSplitError:
                pass  # keep the balanced split; format_plan marks the stages that do not fit

    plans = []
    for index, (start, end) in enumerate(ranges):
        layers = range(start, end)
        params = stage_params(config, start, end)
        plans.append(StagePlan(
            index=index,
            start=start,
            end=end,
            n_attention=sum(config.is_attention(i) for i in layers),
            n_mamba=sum(not config.is_attention(i) for i in layers),
            n_moe=sum(config.is_moe(i) for i in layers),
            num_params=params,
            weight_bytes=stage_weight_bytes(config, start, end, dtype_bytes, quantize),
            cache_bytes_per_seq=stage_cache_bytes(config, start, end, ctx, dtype_bytes),
            flops_per_token=stage_flops(config, start, end, ctx),
            kv_bytes_per_block=stage_block_bytes(config, start, end, block_size, dtype_bytes),
            snapshot_bytes=stage_cache_bytes(config, start, end, 0, dtype_bytes),
        ))
    return plans


def paged_sequences(plans: list[StagePlan], gpu_memory: int, ctx: int, short: int, block_size: int,
                    num_snapshots: int, reserve_fraction: float = 0.1) -> int:
    """With the paged cache: how many `short`-token sequences fit beside one of `ctx` tokens on
    every stage, once weights and `num_snapshots` Mamba snapshots are set aside (-1: not even the
    long one fits). Each sequence takes its blocks plus its slot's Mamba state."""
    fit = []
    for p in plans:
        free = int(gpu_memory * (1 - reserve_fraction)) - p.weight_bytes - num_snapshots * p.snapshot_bytes
        long_seq = -(-ctx // block_size) * p.kv_bytes_per_block + p.snapshot_bytes
        short_seq = -(-short // block_size) * p.kv_bytes_per_block + p.snapshot_bytes
        fit.append(-1 if free < long_seq else (free - long_seq) // max(1, short_seq))
    return min(fit)


def format_plan(
    plans: list[StagePlan],
    config: JambaConfig,
    ctx: int,
    gpu_memory: int | None = None,
    reserve_fraction: float = 0.1,
    quantize: str | None = None,
    dtype_bytes: int = 2,
    also_contexts: tuple[int, ...] = (),
    block_size: int = 64,
    num_snapshots: int = 64,
) -> str:
    """A table of the stages, then a summary: parameters, compute balance, and what fits; with
    `also_contexts`, how many sequences of each of those lengths fit the same split."""
    total_params, active_params = count_params(config)
    total_flops = sum(p.flops_per_token for p in plans)
    header = f"{'stage':>5}  {'layers':<10} {'attn':>4} {'mamba':>5} {'moe':>4}  {'weights GiB':>11}  {'cache MiB/seq':>13}  {'compute':>7}"
    if gpu_memory is not None:
        header += f"  {'sequences':>9}"
        usable = int(gpu_memory * (1 - reserve_fraction))  # what max_sequences leaves for weights and cache
    lines = [
        f"Jamba, {config.num_hidden_layers} layers, {total_params / 1e9:.1f}B parameters ({active_params / 1e9:.1f}B active per token), "
        f"{len(plans)} stages, context {ctx} tokens"
        + (f", {gpu_memory / 2**30:.1f} GiB per GPU ({reserve_fraction:.0%} reserved)" if gpu_memory is not None else "")
        + (f", weights {_QUANT_NOTE[quantize]}" if quantize else ""),
        header,
    ]
    for p in plans:
        row = (f"{p.index:>5}  {f'[{p.start}, {p.end})':<10} {p.n_attention:>4} {p.n_mamba:>5} {p.n_moe:>4}  "
               f"{p.weight_bytes / 2**30:>11.2f}  {p.cache_bytes_per_seq / 2**20:>13.2f}  {p.flops_per_token / total_flops:>7.1%}")
        if gpu_memory is not None:
            seqs = p.max_sequences(gpu_memory, reserve_fraction)
            need = (p.weight_bytes + p.cache_bytes_per_seq) / 2**30
            row += f"  {seqs:>9}" if seqs else f"  DOES NOT FIT: {need:.1f} GiB > {usable / 2**30:.1f} GiB usable"
        lines.append(row)

    mean = total_flops / len(plans)
    slow, fast = max(p.flops_per_token for p in plans), min(p.flops_per_token for p in plans)
    lines.append(
        f"total {sum(p.num_params for p in plans) / 1e9:.1f}B parameters, {sum(p.weight_bytes for p in plans) / 2**30:.1f} GiB of weights; "
        f"{total_flops / 1e9:.1f} GFLOP per token; compute per stage: max {slow / mean - 1:+.1%}, min {fast / mean - 1:+.1%} "
        f"vs the mean (pipeline efficiency {mean / slow:.1%})"
    )
    if gpu_memory is not None:
        seqs = [p.max_sequences(gpu_memory, reserve_fraction) for p in plans]
        if all(seqs):
            lines.append(f"every stage fits; sequences in flight at {ctx} tokens: {min(seqs)} (bounded by the fullest stage)")
            for other in also_contexts:
                fit = []
                for p in plans:
                    at = dataclasses.replace(p, cache_bytes_per_seq=stage_cache_bytes(config, p.start, p.end, other, dtype_bytes))
                    fit.append(at.max_sequences(gpu_memory, reserve_fraction))
                lines.append(f"the same split at {other} tokens: {min(fit)} sequences in flight (bounded by the fullest stage)")
            snaps = max(p.snapshot_bytes for p in plans) * num_snapshots
            longest = max((ctx, *also_contexts))
            paged = paged_sequences(plans, gpu_memory, longest, 512, block_size, num_snapshots, reserve_fraction)
            lines.append(f"paged KV cache ({block_size}-token blocks; {num_snapshots} prefix-cache snapshots per stage, "
                         f"at most {snaps / 2**20:.0f} MiB): one {longest}-token sequence "
                         + (f"and {paged} more of 512 tokens fit at once" if paged >= 0 else "does not fit"))
        else:
            worst = max(plans, key=lambda p: p.weight_bytes)
            lines.append(
                f"{seqs.count(0)} of {len(plans)} stages do NOT fit: usable {usable / 2**30:.1f} GiB per GPU, the largest stage "
                f"has {worst.weight_bytes / 2**30:.1f} GiB of weights; use more stages or a smaller dtype"
            )
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """"80GiB", "80 GB", "512MiB", "1.5GiB", "1000000" -> bytes. GiB = 2**30, GB = 10**9."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 80GiB, 80GB, 512MiB, 512MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def _size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add `plan` to an argparse subparsers object; the parsed args carry func=run_plan."""
    p = subparsers.add_parser(
        "plan",
        help="split a model's layers into pipeline stages",
        description="Split a Jamba model's layers into contiguous pipeline stages, balancing compute per token, "
        "and show each stage's weights, cache per sequence and how many sequences fit.",
    )
    p.add_argument("--model", required=True, help=f"checkpoint directory, or a preset: {', '.join(PRESETS)}")
    p.add_argument("--stages", type=int, help="number of pipeline stages (GPUs)")
    p.add_argument("--layer-split", help="use this split instead: layer counts '9,9,...' or boundaries '0,9,18,...,72'")
    p.add_argument("--gpu-memory", type=_size_arg, help="memory of one GPU, e.g. 80GiB")
    p.add_argument("--max-context", type=int, default=4096, help="tokens per sequence the cache is sized for (default 4096)")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16", help="weight dtype (default bfloat16)")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None,
                   help="plan for int8 weights (int8 + an fp32 scale per output channel), as `jamba serve --quantize`")
    p.add_argument("--also-context", type=int, action="append", default=[], metavar="TOKENS",
                   help="also print how many sequences of this many tokens fit the same split (repeatable)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per paged KV block (default 64)")
    p.add_argument("--prefix-snapshots", type=int, default=64,
                   help="Mamba-state snapshots per stage set aside for the prefix cache (default 64)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args) -> int:
    config = load_config(args.model)
    dtype_bytes = DTYPE_BYTES[args.dtype]
    plans = make_plan(config, args.stages, args.layer_split, ctx=args.max_context, dtype_bytes=dtype_bytes,
                      gpu_memory=args.gpu_memory, quantize=args.quantize, block_size=args.block_size)
    if not args.json:
        print(format_plan(plans, config, args.max_context, args.gpu_memory, quantize=args.quantize,
                          dtype_bytes=dtype_bytes, also_contexts=tuple(args.also_context),
                          block_size=args.block_size, num_snapshots=args.prefix_snapshots))
        return 0
    total_params, active_params = count_params(config)
    total_flops = sum(p.flops_per_token for p in plans)
    stages = []
    for p in plans:
        d = dataclasses.asdict(p)
        d["compute_share"] = p.flops_per_token / total_flops
        if args.gpu_memory is not None:
            d["max_sequences"] = p.max_sequences(args.gpu_memory)
        stages.append(d)
    paged = {"block_size": args.block_size, "prefix_snapshots": args.prefix_snapshots}
    if args.gpu_memory is not None:
        paged["short_sequences_beside_one_long"] = paged_sequences(
            plans, args.gpu_memory, args.max_context, 512, args.block_size, args.prefix_snapshots)
    print(json.dumps({
        "model": args.model,
        "num_layers": config.num_hidden_layers,
        "total_params": total_params,
        "active_params": active_params,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "max_context": args.max_context,
        "gpu_memory": args.gpu_memory,
        "stages": stages,
        "paged": paged,
    }, indent=2))
    return 0

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

The cost model (stages/costs.py: weights, FLOPs per token and cache bytes, in closed form
from the config, counted as the model builds its layers) gives each layer's compute and memory.
The KV cache is paged (stages/cache.py), so a sequence takes only the blocks its tokens fill;
with a GPU memory size the plan also says how many short sequences fit beside one of the full
context, after the prefix cache's Mamba snapshots are set aside.

`partition` finds the contiguous split that minimises the largest stage compute exactly (dynamic
programming over split points), breaks ties by minimising the largest stage's weight bytes, and
can be restricted to splits whose every stage fits a memory budget.

    config = load_config("jamba-large-1.6")          # or a checkpoint directory
    plans = make_plan(config, 16, ctx=4096, gpu_memory=parse_bytes("80GiB"))
    print(format_plan(plans, config, ctx=4096, gpu_memory=parse_bytes("80GiB")))
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stages.config import JambaConfig
from stages.costs import (block_bytes, count_params, embed_params, head_flops, head_params, layer_flops,
                          layer_weight_bytes, stage_cache_bytes, stage_flops, stage_params, stage_weight_bytes)
from stages.paging import DEFAULT_BLOCK_SIZE

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

PLAN_SNAPSHOTS = 64  # prefix-cache snapshots per stage a plan sets aside (PipelineConfig: 2 x num_slots)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_QUANT_NOTE = {
    "int8-experts": "int8 in the experts (fp32 scale per expert channel)",
    "int8": "int8 in every linear layer but Mamba's, the router and the head (fp32 scale per channel)",
    "int8-with-mamba": "int8 in every linear layer but the router and the head (fp32 scale per channel)",
}


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
    block_size: int = DEFAULT_BLOCK_SIZE,
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
            kv_bytes_per_block=block_bytes(config, range(start, end), block_size, dtype_bytes),
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
    block_size: int = DEFAULT_BLOCK_SIZE,
    num_snapshots: int = PLAN_SNAPSHOTS,
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


# ---- sizes as people write them -------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """"80GiB", "80 GB", "512MiB", "1.5GiB", "1000000" -> bytes. GiB = 2**30, GB = 10**9."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 80GiB, 80GB, 512MiB, 512MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])

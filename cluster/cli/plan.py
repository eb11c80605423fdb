"""`jamba plan`: split a model's layers into pipeline stages and show what each costs
(cluster/runtime/plan.py does the work)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from cluster.runtime.plan import (DTYPE_BYTES, PLAN_SNAPSHOTS, PRESETS, format_plan, load_config, make_plan,
                                  paged_sequences, parse_bytes)
from stages.config import QUANT_MODES
from stages.costs import count_params
from stages.paging import DEFAULT_BLOCK_SIZE


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
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"tokens per paged KV block (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--prefix-snapshots", type=int, default=PLAN_SNAPSHOTS,
                   help=f"Mamba-state snapshots per stage set aside for the prefix cache (default {PLAN_SNAPSHOTS})")
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

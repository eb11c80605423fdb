"""`jamba batch`: offline score / classify / generate over large inputs on Ray Data (cluster/batch
says how a job runs); its flags, and the job started on a local or joined Ray cluster.

    jamba batch score --model DIR --input PATH --output DIR [--stages P] [--pipelines N] [--address ADDR]
"""

from __future__ import annotations

import argparse
import logging
import os

from cluster.batch.rows import TASKS

from .args import (OFFLINE_MAX_BATCH_TOKENS, PLACEMENT_STRATEGIES, add_batching_args, add_cache_args, add_model_args,
                   add_pipeline_args, engine_config, resolve_split)
from .ray_log import ray_output_to_log

log = logging.getLogger("jamba.batch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=TASKS, help="score: token_logprobs, sum_logprob; classify: logits, probs, label; "
                   "generate: output_ids, text, finish_reason")
    p.add_argument("--model", help="checkpoint directory, readable on every node; default: the demo model "
                   "(models/, copied to $JAMBA_HOME in fp32 on first use)")
    p.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="JSON Lines or Parquet: a file, a directory or a glob, local or a URI (s3://...); repeatable")
    p.add_argument("--output", required=True, help="output directory (local or a URI); rerun with the same one to resume")
    p.add_argument("--format", dest="input_format", default="auto", choices=["auto", "jsonl", "parquet", "openai"],
                   help="input format (default: by file extension, and JSON Lines of OpenAI batch requests by their "
                        "keys); openai: OpenAI Batch API request files, answered in OUTPUT/output.jsonl and "
                        "errors.jsonl as OpenAI's Batch API does")
    p.add_argument("--pipelines", type=int, default=1, help="pipelines (Ray Data pool actors), each its own stages")
    add_pipeline_args(p, 1, "stages per pipeline")
    p.add_argument("--reserve-cpus", type=float, default=None,
                   help="CPUs kept for Ray Data's reads (default 0.5 up to 4 cluster CPUs, else 1); --cpus-per-stage "
                        "defaults to min(threads, (cluster CPUs - reserve) / (pipelines x stages))")
    p.add_argument("--placement-strategy", default="PACK", choices=PLACEMENT_STRATEGIES)
    add_batching_args(p, OFFLINE_MAX_BATCH_TOKENS)
    add_cache_args(p)
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=256, help="rows per batch, and per committed part file")
    p.add_argument("--calls-per-actor", type=int, default=2, help="batches in flight per pipeline")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, or start a local one)")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--no-count", dest="count", action="store_false",
                   help="do not count the input rows first (saves one read of the input; no ETA)")
    p.set_defaults(func=run_batch)


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """`jamba batch ...` (for cluster/cli/main.py's subparsers)."""
    import cluster.batch

    helptext = "score, classify or generate over large JSON Lines / Parquet inputs on Ray Data; resumable"
    b = subparsers.add_parser("batch", help=helptext, description=cluster.batch.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(b)
    return b


def config_from_args(args):
    """The BatchConfig the flags describe (cluster/batch/job.py)."""
    from cluster.batch.job import BatchConfig

    return BatchConfig(args.task, args.input, args.output, engine_config(args, args.model or ""),
                       input_format=args.input_format, pipelines=args.pipelines, reserve_cpus=args.reserve_cpus,
                       batch_size=args.batch_size, calls_per_actor=args.calls_per_actor,
                       progress_interval=args.progress_interval, count=args.count)


def run_batch(args) -> int:
    import ray

    from cluster.batch.job import preflight, run_job

    if args.model is None:
        from stages.demo import ensure_demo_model

        args.model = str(ensure_demo_model("classification" if args.task == "classify" else "lm"))
        log.info("no --model given: using the demo model at %s", args.model)
    cfg = config_from_args(args)
    mpath, _, _ = preflight(cfg)  # a wrong path fails here, before a cluster is started or joined
    resolve_split(mpath, cfg.engine.num_stages, cfg.engine.layer_split)  # and so does an impossible split
    with ray_output_to_log(f"batch-{cfg.task}", getattr(args, "verbose", False)):
        own = not ray.is_initialized()
        if own:
            if args.address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=args.address, log_to_driver=False)
            else:  # a cluster of this machine alone, on loopback
                ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        try:
            run_job(cfg)
        finally:
            if own:
                ray.shutdown()
    return 0

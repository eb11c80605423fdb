"""`jamba generate|score|classify|eval`: JSON Lines rows through the engine, in this process or
(with --stages) through a pipeline of Ray actor stages; `jamba make-demo-model` and
`jamba warmup`.

Input and output are JSON Lines (cluster/batch/rows.py says the fields). A bad row is reported on
stderr as `FILE:LINE: what is wrong`, its output row carries an `error` field instead of results,
and every other row is still processed; the exit status is then 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from client.cli import chunks, read_lines
from cluster.batch.rows import check_task, run_chunk
from cluster.runtime.config import default
from cluster.runtime.dataplane import TRANSPORTS

from .args import (DTYPES, OFFLINE_MAX_BATCH_TOKENS, PLACEMENT_STRATEGIES, add_batching_args, add_cache_args,
                   add_model_args, add_pipeline_args, engine_config, engine_fields, resolve_split)
from .ray_log import ray_output_to_log

log = logging.getLogger("jamba")

CHUNK_ROWS = 256  # rows read, run and written together; bounds memory on huge inputs
COMMANDS = (
    ("generate", "complete prompts; adds output_ids, text, finish_reason"),
    ("score", "log-likelihood of each row's tokens; adds token_logprobs, sum_logprob"),
    ("classify", "sequence classification; adds logits, probs, label"),
    ("eval", "held-out perplexity of a causal LM over the texts of a JSON Lines file"),
)


def add_parsers(sub) -> None:
    for name, helptext in COMMANDS:
        s = sub.add_parser(name, help=helptext, description=helptext)
        s.add_argument("--model", help="checkpoint directory (HF format, safetensors); default: the demo model")
        s.add_argument("--input", required=True, help="JSON Lines file ('-' for stdin)")
        s.add_argument("--output", default="-", help="JSON Lines output file (default: stdout)")
        add_model_args(s)
        s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        add_batching_args(s, OFFLINE_MAX_BATCH_TOKENS)
        add_cache_args(s)
        g = s.add_argument_group("pipeline (Ray)", "with --stages, rows run through a pipeline of Ray actor stages")
        add_pipeline_args(g, None, "number of pipeline stages (default: one process, no Ray)")
        g.add_argument("--address", help="Ray cluster to join (default: start a local one)")
        g.add_argument("--placement-strategy", default="PACK", choices=PLACEMENT_STRATEGIES)
        g.add_argument("--transport", default="auto", choices=TRANSPORTS,
                       help="how activations go stage to stage: auto = nccl with a GPU per stage, else inline")
        s.set_defaults(func=run_rows, task=name)
        if name == "eval":
            s.set_defaults(func=run_eval)
            s.add_argument("--eval-batch", type=int, default=64, help="rows scored together (default 64)")
            s.add_argument("-q", "--quiet", action="store_true", help="no progress line")
            s.set_defaults(output="-")

    d = sub.add_parser("make-demo-model", help="write a small random-weight Jamba checkpoint (for tests of shapes)",
                       description="Write a small Jamba checkpoint with deterministic RANDOM weights, in HF format.")
    d.add_argument("dir", help="output directory")
    d.add_argument("--task", choices=["lm", "classification"], default="lm")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=make_demo)

    w = sub.add_parser("warmup", help="compile the kernels into $JAMBA_KERNEL_CACHE ahead of time",
                       description="Compile (or load) every kernel a stage runs, for the given dtypes and "
                                   "quantizations, into $JAMBA_KERNEL_CACHE (stages/warmup.py), e.g. while "
                                   "building a container image.")
    w.add_argument("--model", help="checkpoint directory (default: a random-weight demo model in a temporary directory)")
    w.add_argument("--dtype", action="append", choices=DTYPES, help="dtype(s) to warm (default: as stored); repeatable")
    w.add_argument("--device", default="cpu")
    w.add_argument("--quantize", action="append", default=[], metavar="MODE",
                   help="also warm the int8 matmul of a stage quantized with MODE (stages/quant.py); repeatable")
    w.add_argument("--enforce-eager", action="store_true", default=None,
                   help="skip the compiled decode steps (warm only the kernels)")
    add_pipeline_args(w, 1, "the stages to compile decode steps for, as they will be served (default 1: the whole "
                            "model in one stage); the compiled step depends on each stage's layers and cache sizes")
    add_batching_args(w, default("max_batch_tokens"))
    add_cache_args(w)
    w.set_defaults(func=run_warmup)


# ---- the model behind a command -------------------------------------------------------------------
@contextlib.contextmanager
def open_runner(args):
    """The engine behind a command: this process (LocalRunner), or with --stages a Ray pipeline.
    Blocking calls, lists in and out (cluster/runtime/engine.py:SyncEngine)."""
    import torch

    from stages.demo import ensure_demo_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.input != "-" and not Path(args.input).is_file():
        raise FileNotFoundError(f"input file {args.input} does not exist")
    model_dir = args.model
    if model_dir is None:
        model_dir = ensure_demo_model("classification" if args.task == "classify" else "lm")
        log.info("no --model given: using the demo model at %s", model_dir)
    if args.stages:
        with _pipeline_runner(args, str(model_dir)) as pipe:
            yield pipe
        return
    from cluster.runtime.local import LocalRunner
    from stages.loading import load_stage
    from stages.tokenizer import Tokenizer
    from stages.warmup import warm_up

    stage, _ = load_stage(model_dir, dtype=args.dtype, quantize=args.quantize)
    check_task(args.task, stage.config, model_dir)
    warm_up(stage)  # compile the kernels now, not inside the first rows
    try:
        tokenizer = Tokenizer.from_dir(model_dir)
    except FileNotFoundError:
        tokenizer = None
        log.warning("%s has no tokenizer.json: rows must give input_ids", model_dir)
    with LocalRunner(stage, tokenizer, **engine_fields(args)) as runner:
        yield runner


@contextlib.contextmanager
def _pipeline_runner(args, model_dir: str):
    import ray

    from cluster.runtime.pipeline import SyncPipeline
    from cluster.runtime.resources import local_cluster_size, pipeline_need
    from stages.config import JambaConfig

    check_task(args.task, JambaConfig.from_file(model_dir), model_dir)
    resolve_split(model_dir, args.stages, args.layer_split)  # an impossible split fails before Ray starts
    cfg = engine_config(args, model_dir)
    with ray_output_to_log(args.task, args.verbose):
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            # A cluster of this machine alone, sized for the stages: everything, the pipeline's
            # channels too, on loopback.
            cpus = cfg.threads_per_stage if cfg.cpus_per_stage is None else cfg.cpus_per_stage
            need = pipeline_need(cfg.num_stages, cpus, cfg.gpus_per_stage)
            ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                     **local_cluster_size(need, cfg.num_stages * cfg.threads_per_stage))
        pipe = None
        try:
            pipe = SyncPipeline(cfg)
            yield pipe
        finally:
            if pipe is not None:
                pipe.close()
            ray.shutdown()


# ---- the commands -----------------------------------------------------------------------------------
def make_demo(args) -> int:
    from stages.demo import make_demo_model

    path = make_demo_model(args.dir, args.task, args.seed)
    print(f"wrote the demo {args.task} model to {path} (random weights: its outputs are gibberish)", file=sys.stderr)
    return 0


def run_warmup(args) -> int:
    """Compile every kernel, and the decode step of every batch size (stages/decode.py), of each
    stage as `--stages`/`--layer-split` and the cache flags will serve it, into $JAMBA_KERNEL_CACHE."""
    from stages.warmup import use_kernel_cache

    use_kernel_cache()  # before anything imports the numba kernels

    import tempfile

    from cluster.runtime.config import PipelineConfig, plan_pipeline
    from stages.demo import make_demo_model
    from stages.worker import StageWorker

    with tempfile.TemporaryDirectory() as tmp:
        model = str(args.model or make_demo_model(Path(tmp) / "demo-lm"))
        splits = resolve_split(model, args.stages, args.layer_split)
        # (--dtype and --quantize are lists here: every combination is warmed.)
        cfg = PipelineConfig(model, **{k: v for k, v in engine_fields(args).items() if k not in ("dtype", "quantize")})
        paging = plan_pipeline(cfg).paging
        pools = {k: paging[k] for k in ("block_size", "num_blocks", "num_snapshots")}
        for dtype in args.dtype or [None]:
            for quantize in [None, *args.quantize]:
                for start, end in splits:
                    worker = StageWorker.load(model, start, end, cfg.num_slots, paging["max_seq_len"],
                                              dtype=dtype, device=args.device, quantize=quantize, paging=pools,
                                              enforce_eager=bool(args.enforce_eager))
                    info = worker.info()
                    decode = (f", decode steps for batch {'/'.join(map(str, worker.decoder.sizes))} in "
                              f"{info.get('decode_compile_seconds', 0):.1f}s" if worker.decoder else "")
                    print(f"warmed layers [{start}, {end}) of {model} ({dtype or 'as stored'}"
                          f"{', ' + quantize if quantize else ''}, {args.device}): kernels in "
                          f"{info['warmup_seconds']:.1f}s{decode}; cache: "
                          f"{os.environ.get('JAMBA_KERNEL_CACHE') or 'the tools defaults'}", flush=True)
    return 0


def run_rows(args) -> int:
    name = "<stdin>" if args.input == "-" else args.input
    with open_runner(args) as runner:
        return process_file(runner, args.task, args.input, args.output, name)


def process_file(runner, task: str, input_path: str, output_path: str, name: str) -> int:
    t0, rows_done, errors, tokens = time.perf_counter(), 0, 0, 0
    out = sys.stdout if output_path == "-" else open(output_path, "w")
    try:
        for chunk in chunks(read_lines(input_path), CHUNK_ROWS):
            results, n_tok = run_chunk(runner, task, chunk)
            tokens += n_tok
            for (lineno, _), res in zip(chunk, results):
                if res.get("error") is not None:
                    errors += 1
                    print(f"{name}:{lineno}: {res['error']}", file=sys.stderr)
                out.write(json.dumps(res, ensure_ascii=False) + "\n")
            out.flush()
            rows_done += len(chunk)
            log.info("%d rows done (%d failed), %.1f rows/s", rows_done, errors, rows_done / (time.perf_counter() - t0))
    finally:
        if out is not sys.stdout:
            out.close()
    dt = time.perf_counter() - t0
    log.info("%s: %d rows, %d failed, %d tokens in %.2fs (%.0f tokens/s)", task, rows_done, errors, tokens, dt, tokens / dt if dt else 0)
    return 1 if errors else 0


def run_eval(args) -> int:
    """Held-out perplexity: exp(total NLL / total predicted tokens) over the texts of a JSONL file.

    Every row is scored on its own (its first token, BOS for text rows, is context only), so the
    figure is token-weighted over the whole file, as a language-model loss on the same rows is.
    """
    name = "<stdin>" if args.input == "-" else args.input
    total_rows = None if args.input == "-" else sum(1 for _ in read_lines(args.input))
    t0, nll, tokens, rows_done, errors = time.perf_counter(), 0.0, 0, 0, 0
    with open_runner(args) as runner:
        for chunk in chunks(read_lines(args.input), args.eval_batch):
            results, _ = run_chunk(runner, "score", chunk)
            for (lineno, _), res in zip(chunk, results):
                if res.get("error") is not None:
                    errors += 1
                    print(f"{name}:{lineno}: {res['error']}", file=sys.stderr)
                    continue
                lps = res["token_logprobs"][1:]
                nll -= math.fsum(lps)
                tokens += len(lps)
            rows_done += len(chunk)
            if not args.quiet:
                ppl = math.exp(nll / tokens) if tokens else float("nan")
                print(f"\reval: {_bar(rows_done, total_rows)} {rows_done}/{total_rows or '?'} texts, {tokens} tokens, "
                      f"perplexity {ppl:.3f}, {time.perf_counter() - t0:.0f}s", end="", file=sys.stderr, flush=True)
    if not args.quiet:
        print(file=sys.stderr)
    if not tokens:
        raise ValueError(f"{name}: no row had a token to predict (a row needs at least two tokens)")
    summary = {"model": str(args.model or "demo"), "input": name, "texts": rows_done - errors, "failed": errors,
               "tokens": tokens, "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
               "dtype": args.dtype or "as stored", "quantize": args.quantize or "none", "seconds": round(time.perf_counter() - t0, 2)}
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    out.write(json.dumps(summary) + "\n")
    if out is not sys.stdout:
        out.close()
    return 1 if errors else 0


def _bar(done: int, total: int | None, width: int = 24) -> str:
    if not total:
        return ""
    full = round(width * done / total)
    return "[" + "#" * full + "." * (width - full) + "]"

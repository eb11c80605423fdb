"""`jamba`: the command line.

    jamba generate --model DIR --input rows.jsonl [--output out.jsonl]
    jamba score    --model DIR --input rows.jsonl
    jamba classify --model DIR --input rows.jsonl
    jamba eval     --model DIR --input heldout.jsonl      # perplexity, one JSON line
    jamba make-demo-model DIR [--task lm|classification]

Input and output are JSON Lines (see cluster/rows.py for the fields). A bad row is reported on
stderr as `FILE:LINE: what is wrong`, its output row carries an `error` field instead of results,
and every other row is still processed; the exit status is then 1.
Without --model, the embedded demo model (models/, trained on fortune cookies) is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from client.cli import chunks, read_lines

log = logging.getLogger("jamba")

CHUNK_ROWS = 256  # rows read, run and written together; bounds memory on huge inputs


def main(argv: list[str] | None = None) -> int:
    # Before torch or numba load OpenMP: idle OpenMP threads must not spin, or torch's pool and
    # numba's starve each other (see cluster/pipeline.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # setup problems: one line, no traceback
        print(f"jamba: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jamba", description="Serve and run AI21 Jamba models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, helptext in (
        ("generate", "complete prompts; adds output_ids, text, finish_reason"),
        ("score", "log-likelihood of each row's tokens; adds token_logprobs, sum_logprob"),
        ("classify", "sequence classification; adds logits, probs, label"),
        ("eval", "held-out perplexity of a causal LM over the texts of a JSON Lines file"),
    ):
        s = sub.add_parser(name, help=helptext, description=helptext)
        s.add_argument("--model", help="checkpoint directory (HF format, safetensors); default: the demo model")
        s.add_argument("--input", required=True, help="JSON Lines file ('-' for stdin)")
        s.add_argument("--output", default="-", help="JSON Lines output file (default: stdout)")
        s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: as stored)")
        add_quantize_arg(s)
        s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        s.add_argument("--max-batch-tokens", type=int, default=2048, help="token budget of one forward step")
        s.add_argument("--num-slots", type=int, default=32, help="sequences in flight at once")
        add_cache_args(s)
        g = s.add_argument_group("pipeline (Ray)", "with --stages, rows run through a pipeline of Ray actor stages")
        g.add_argument("--stages", type=int, default=None, help="number of pipeline stages (default: one process, no Ray)")
        g.add_argument("--layer-split", help="layers per stage ('9,9,...') or boundaries ('0,9,...,72'); default: balanced")
        g.add_argument("--address", help="Ray cluster to join (default: start a local one)")
        g.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
        g.add_argument("--transport", default="auto", choices=["auto", "inline", "gloo", "nccl"],
                       help="how activations go stage to stage: auto = nccl with a GPU per stage, else inline")
        g.add_argument("--threads-per-stage", type=int, default=1, help="CPU threads of each stage actor")
        g.add_argument("--gpus-per-stage", type=float, default=0, help="GPUs per stage actor (1 on GPU nodes)")
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

    from client.cli import add_client_parser

    from .batch import add_batch_parser
    from .plan import add_plan_parser
    from .service_cli import add_serve_parser

    add_batch_parser(sub)
    add_plan_parser(sub)
    add_serve_parser(sub)
    add_client_parser(sub)
    return p


def add_cache_args(p: argparse.ArgumentParser, max_seq_len: bool = True) -> None:
    """The paged KV cache and the prefix cache (cluster/pipeline.py:PipelineConfig, stages/paging.py)."""
    g = p.add_argument_group("cache", "attention KV in blocks taken as tokens arrive; prompts that share a prefix "
                                      "of whole blocks compute it once (Mamba states restored from snapshots)")
    if max_seq_len:
        g.add_argument("--max-seq-len", type=int, default=None,
                       help="longest prompt + new tokens (default: the model's context, capped by the KV pool)")
    g.add_argument("--block-size", type=int, default=64, help="tokens per KV block and prefix-cache block (default 64)")
    g.add_argument("--kv-blocks", type=int, default=None,
                   help="KV blocks per stage (default: num-slots x min(context, 4096) tokens' worth)")
    g.add_argument("--prefix-snapshots", type=int, default=None,
                   help="Mamba-state snapshots each stage keeps for the prefix cache (default 2 x num-slots)")
    g.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every prompt in full (the answers are the same either way)")


def cache_config(args) -> dict:
    """PipelineConfig's cache fields from the arguments of `add_cache_args`."""
    return {"max_seq_len": getattr(args, "max_seq_len", None), "block_size": args.block_size,
            "num_blocks": args.kv_blocks, "num_snapshots": args.prefix_snapshots, "prefix_cache": args.prefix_cache}


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    from stages.quant import MODES

    p.add_argument("--quantize", choices=MODES, default=None,
                   help="int8 weights with float32 per-channel scales: int8-experts (the MoE experts only), int8 "
                        "(every linear layer but Mamba's, the router and the head), int8-with-mamba (int8 and "
                        "the Mamba projections too, for quality experiments); default: none, as stored")


# ---- commands ---------------------------------------------------------------------------------
def make_demo(args) -> int:
    from stages.demo import make_demo_model

    path = make_demo_model(args.dir, args.task, args.seed)
    print(f"wrote the demo {args.task} model to {path} (random weights: its outputs are gibberish)", file=sys.stderr)
    return 0


def run_rows(args) -> int:
    name = "<stdin>" if args.input == "-" else args.input
    with open_runner(args) as runner:
        return process_file(runner, args.task, args.input, args.output, name)


@contextlib.contextmanager
def open_runner(args):
    """The model behind a command: one process (LocalRunner), or with --stages a Ray pipeline."""
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
    from stages.kernels.warmup import warm_up
    from stages.loading import load_stage
    from stages.runner import LocalRunner
    from stages.tokenizer import Tokenizer

    stage, stats = load_stage(model_dir, dtype=args.dtype, quantize=args.quantize)
    _check_head(args.task, stage.config, model_dir)
    warm_up(stage)  # compile the kernels now, not inside the first rows
    try:
        tokenizer = Tokenizer.from_dir(model_dir)
    except FileNotFoundError:
        tokenizer = None
        log.warning("%s has no tokenizer.json: rows must give input_ids", model_dir)
    yield LocalRunner(stage, tokenizer, num_slots=args.num_slots, max_batch_tokens=args.max_batch_tokens,
                      prefix_cache=args.prefix_cache, block_size=args.block_size)


def _check_head(task: str, config, model_dir) -> None:
    if task == "classify" and not config.is_classifier:
        raise ValueError(f"{model_dir} is a causal LM ({config.architectures}); classify needs a "
                         "JambaForSequenceClassification checkpoint")
    if task != "classify" and config.is_classifier:
        raise ValueError(f"{model_dir} is a sequence classifier; {task} needs a JambaForCausalLM checkpoint")


@contextlib.contextmanager
def _pipeline_runner(args, model_dir: str):
    import ray

    from stages.config import JambaConfig

    from .pipeline import PipelineConfig, SyncPipeline
    from .ray_log import ray_output_to_log
    from .resources import local_cluster_size, pipeline_need, resolve_split

    _check_head(args.task, JambaConfig.from_file(model_dir), model_dir)
    resolve_split(model_dir, args.stages, args.layer_split)  # an impossible split fails before Ray starts
    with ray_output_to_log(args.task, args.verbose):
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            # A cluster of this machine alone, sized for the stages: everything, the pipeline's
            # channels too, on loopback.
            need = pipeline_need(args.stages, args.threads_per_stage, args.gpus_per_stage)
            ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                     **local_cluster_size(need, args.stages * args.threads_per_stage))
        pipe = None
        try:
            pipe = SyncPipeline(PipelineConfig(
                model_dir, num_stages=args.stages, layer_split=args.layer_split, num_slots=args.num_slots,
                max_batch_tokens=args.max_batch_tokens, threads_per_stage=args.threads_per_stage,
                gpus_per_stage=args.gpus_per_stage, placement_strategy=args.placement_strategy, dtype=args.dtype,
                quantize=args.quantize, transport=args.transport, **cache_config(args)))
            yield pipe
        finally:
            if pipe is not None:
                pipe.close()
            ray.shutdown()


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


def run_chunk(runner, task: str, chunk: list[tuple[int, str]]) -> tuple[list[dict[str, Any]], int]:
    """Parse and run one chunk of lines; returns one output row per line, and tokens processed."""
    from . import rows as R

    config, tok = runner.config, runner.tokenizer
    results: list[dict[str, Any] | None] = [None] * len(chunk)
    todo = []  # (index, row, ids, params)
    for k, (lineno, line) in enumerate(chunk):
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise R.RowError(f"malformed JSON: {e.msg} at column {e.colno}") from None
            if any("\udc80" <= ch <= "\udcff" for ch in line):  # surrogateescape marks bad bytes
                raise R.RowError("line is not valid UTF-8")
            ids = R.prompt_ids(row, tok, config, task)
            params = R.sampling_params(row, config.vocab_size) if task == "generate" else None
            R.check_context(ids, params.max_new_tokens if params else 0, runner.max_seq_len)
            todo.append((k, row, ids, params))
        except R.RowError as e:
            results[k] = {"line": lineno, "error": str(e)}
    n_tok = 0
    if todo:
        ids_list = [t[2] for t in todo]
        if task == "generate":
            outs = runner.generate(ids_list, [t[3] for t in todo])
            for (k, row, ids, _), res in zip(todo, outs):
                results[k] = R.generation_row(row, res)
                n_tok += len(ids) + len(res.output_ids)
        elif task == "score":
            for (k, row, ids, _), lp in zip(todo, runner.score(ids_list)):
                results[k] = R.score_row(row, lp)
                n_tok += len(ids)
        else:
            for (k, row, ids, _), logits in zip(todo, runner.classify(ids_list)):
                results[k] = R.classify_row(row, logits, config.id2label)
                n_tok += len(ids)
    return results, n_tok


if __name__ == "__main__":
    sys.exit(main())

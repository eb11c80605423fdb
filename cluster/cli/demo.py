"""`make demo`: the whole stack on this machine, end to end.

    python -m cluster.cli.demo [--model DIR] [--stages 2] [--grpc-port 9000]

Uses the embedded demo checkpoints (models/: a 12.9M-parameter Jamba trained on 2.5 MB of
fortune cookies, and a classifier that tells which fortune file a text comes from), starts a local
Ray cluster, serves a 2-stage pipeline of the LM and a 1-stage classifier behind Ray Serve's gRPC
ingress, then, through the client library: streams a generation, runs a batch generation, a chat,
a generation held to a JSON Schema, a classification and a score, printing results and timings.
Everything is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from stages.openmp import use_openmp_env

HELDOUT = Path(__file__).resolve().parents[2] / "models" / "heldout.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="causal-LM checkpoint (default: the demo model)")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--grpc-port", type=int, default=int(os.environ.get("JAMBA_GRPC_PORT", 9000)))
    args = ap.parse_args(argv)
    use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)
    logging.basicConfig(level=logging.WARNING)

    from cluster.serve.app import limit_message_size
    from stages.demo import ensure_demo_model

    from .ray_log import ray_output_to_log

    lm = args.model or str(ensure_demo_model("lm"))
    cls = str(ensure_demo_model("classification"))
    print(f"Jamba demo: {args.stages}-stage pipeline of {lm} behind Ray Serve's gRPC ingress on port {args.grpc_port}.")
    if not args.model:
        print("The demo model is a toy trained on fortune cookies (models/jamba-demo-lm/README.md), not Jamba:\n"
              "expect text that reads like a fortune file, not knowledge.")
    t0 = time.perf_counter()
    limit_message_size()
    with ray_output_to_log("demo", verbose=False, fds=(1, 2)):  # Ray's own lines go to a log file
        _run(args, lm, cls, t0)
    print(f"\ndone in {time.perf_counter() - t0:.1f}s; everything shut down.")
    return 0


def _run(args, lm: str, cls: str, t0: float) -> None:
    import ray
    from ray import serve

    from client import JambaClient
    from cluster.serve.app import build_app, grpc_options, wait_until_serving

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")  # this machine alone: everything on loopback
    try:
        serve.start(grpc_options=grpc_options(args.grpc_port), http_options={"host": "127.0.0.1", "port": 0},
                    logging_config={"log_level": "WARNING"})
        serve.run(build_app({"model": lm, "name": "lm", "stages": args.stages, "cpus_per_stage": 0.5}),
                  name="lm", route_prefix="/lm")
        serve.run(build_app({"model": cls, "name": "classifier", "stages": 1, "cpus_per_stage": 0.25}),
                  name="classifier", route_prefix="/classifier")
        print("  starting: loading the stages and compiling their decode steps (on a machine's first start "
              "a few minutes; later starts read them from the cache)", flush=True)
        wait_until_serving("lm")
        wait_until_serving("classifier")
        print(f"  service up in {time.perf_counter() - t0:.1f}s")
        address = f"127.0.0.1:{args.grpc_port}"
        with JambaClient(address, application="lm", timeout=120) as c:
            info = c.model_info()
            print(f"  model {info.model_name}: {info.num_layers} layers, stages "
                  + ", ".join(f"[{s.start_layer}, {s.end_layer})" for s in info.stages))

            t = time.perf_counter()
            print("\n-- streaming generation:")
            seed_prompt = "Plants create energy through a process known as"
            print(f"   {seed_prompt!r} ->", end=" ", flush=True)
            stream = c.generate_stream(seed_prompt, max_new_tokens=32)
            first = None
            for delta in stream:
                first = first or time.perf_counter() - t
                print(delta.text, end="", flush=True)
            done = stream.completion
            print(f"\n   {done.completion_tokens} tokens, first after {first * 1000:.0f} ms, "
                  f"all in {(time.perf_counter() - t) * 1000:.0f} ms ({done.finish_reason})")

            t = time.perf_counter()
            prompts = ["The secret of a happy life is", "A computer is", "Love is", "Q: Why did the programmer"]
            outs = c.generate(prompts, max_new_tokens=32, temperature=0.7, top_p=0.9)  # sampled: differs run to run
            print(f"\n-- batch generation: {len(prompts)} prompts in {(time.perf_counter() - t) * 1000:.0f} ms")
            for p, o in zip(prompts, outs):
                print(f"   {p!r} -> {o.text!r}")

            t = time.perf_counter()
            chat = c.chat([{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hello."}],
                          max_new_tokens=24)
            print(f"\n-- chat ({(time.perf_counter() - t) * 1000:.0f} ms): {chat.text!r}")

            t = time.perf_counter()
            fortune = {"type": "object", "additionalProperties": False, "required": ["fortune", "luck", "lucky_numbers"],
                       "properties": {"fortune": {"type": "string", "maxLength": 60},
                                      "luck": {"enum": ["great", "good", "mixed", "bad"]},
                                      "lucky_numbers": {"type": "array", "minItems": 2, "maxItems": 4,
                                                        "items": {"type": "integer", "minimum": 1, "maximum": 99}}}}
            out = c.generate(["Your fortune for today, as JSON:"], json_schema=fortune, max_new_tokens=96,
                             temperature=0.8, seed=7)[0]
            print(f"\n-- structured output ({(time.perf_counter() - t) * 1000:.0f} ms): a JSON Schema (an enum, an "
                  "integer range, an array of 2-4 items) holds even a fortune-cookie model to valid JSON:")
            print(f"   {out.text}")
            try:
                print(f"   parsed: {json.loads(out.text)}")
            except ValueError:  # max_new_tokens ran out first: the text is a prefix of a valid document
                print(f"   (cut at max_new_tokens: {out.finish_reason})")

            t = time.perf_counter()
            scores = c.score(prompts[:2])
            print(f"\n-- score ({(time.perf_counter() - t) * 1000:.0f} ms):")
            for p, s in zip(prompts, scores):
                print(f"   {p!r}: sum log p = {s.sum_logprob:.2f} over {len(s.token_ids)} tokens")
        with JambaClient(address, application="classifier", timeout=60) as c:
            t = time.perf_counter()
            # Held-out fortunes (never trained on): one of each file, then the accuracy over all of them.
            rows = [json.loads(line) for line in open(HELDOUT)]
            labels = list(c.model_info().labels)
            rows = [r for r in rows if r["label"] in labels]
            results = c.classify([r["text"] for r in rows])
            print(f"\n-- classification of {len(rows)} held-out fortunes ({(time.perf_counter() - t) * 1000:.0f} ms):")
            for label in labels:
                i = next(k for k, r in enumerate(rows) if r["label"] == label)
                text = " ".join(rows[i]["text"].split())
                print(f"   {text[:64] + ('...' if len(text) > 64 else '')!r}: {results[i].label} "
                      f"(p={max(results[i].probs):.2f}; from {label})")
            right = sum(res.label == r["label"] for res, r in zip(results, rows))
            majority = max(sum(r["label"] == label for r in rows) for label in labels)
            print(f"   accuracy {right}/{len(rows)} = {right / len(rows):.2f} "
                  f"(always answering the commonest file: {majority / len(rows):.2f})")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

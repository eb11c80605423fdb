"""`make demo`: the whole stack on this machine, end to end.

    python -m cluster.demo [--model DIR] [--stages 2] [--grpc-port 9000]

Writes the demo checkpoints if needed (random weights: the text is gibberish), starts a local
Ray cluster, serves a 2-stage pipeline of the LM and a 1-stage classifier behind Ray Serve's gRPC
ingress, then, through the client library: streams a generation, runs a batch generation, a chat,
a classification and a score, printing results and timings. Everything is shut down at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="causal-LM checkpoint (default: the demo model)")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--grpc-port", type=int, default=int(os.environ.get("JAMBA_GRPC_PORT", 9000)))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see cluster/pipeline.py
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve

    from client import JambaClient
    from stages.demo import ensure_demo_model

    from .service import build_app, grpc_options, limit_message_size

    lm = args.model or str(ensure_demo_model("lm"))
    cls = str(ensure_demo_model("classification"))
    print(f"Jamba demo: {args.stages}-stage pipeline of {lm} behind Ray Serve's gRPC ingress on port {args.grpc_port}.")
    if not args.model:
        print("The demo model's weights are RANDOM: expect gibberish text; the point is the machinery.")
    t0 = time.perf_counter()
    limit_message_size()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")  # this machine alone: everything on loopback
    try:
        serve.start(grpc_options=grpc_options(args.grpc_port), http_options={"host": "127.0.0.1", "port": 0},
                    logging_config={"log_level": "WARNING"})
        serve.run(build_app({"model": lm, "name": "lm", "stages": args.stages, "cpus_per_stage": 0.5}),
                  name="lm", route_prefix="/lm")
        serve.run(build_app({"model": cls, "name": "classifier", "stages": 1, "cpus_per_stage": 0.25}),
                  name="classifier", route_prefix="/classifier")
        print(f"  service up in {time.perf_counter() - t0:.1f}s")
        address = f"127.0.0.1:{args.grpc_port}"
        with JambaClient(address, application="lm", timeout=120) as c:
            info = c.model_info()
            print(f"  model {info.model_name}: {info.num_layers} layers, stages "
                  + ", ".join(f"[{s.start_layer}, {s.end_layer})" for s in info.stages))

            t = time.perf_counter()
            print("\n-- streaming generation:")
            print("   'The weather today is' ->", end=" ", flush=True)
            stream = c.generate_stream("The weather today is", max_new_tokens=24)
            first = None
            for delta in stream:
                first = first or time.perf_counter() - t
                print(delta.text, end="", flush=True)
            done = stream.completion
            print(f"\n   {done.completion_tokens} tokens, first after {first * 1000:.0f} ms, "
                  f"all in {(time.perf_counter() - t) * 1000:.0f} ms ({done.finish_reason})")

            t = time.perf_counter()
            prompts = ["My favourite recipe starts with", "The train to the city", "Computers are", "Once upon a time"]
            outs = c.generate(prompts, max_new_tokens=16, temperature=0.8, top_p=0.95, seed=7)
            print(f"\n-- batch generation: {len(prompts)} prompts in {(time.perf_counter() - t) * 1000:.0f} ms")
            for p, o in zip(prompts, outs):
                print(f"   {p!r} -> {o.text!r}")

            t = time.perf_counter()
            chat = c.chat([{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hello."}],
                          max_new_tokens=12)
            print(f"\n-- chat ({(time.perf_counter() - t) * 1000:.0f} ms): {chat.text!r}")

            t = time.perf_counter()
            scores = c.score(prompts[:2])
            print(f"\n-- score ({(time.perf_counter() - t) * 1000:.0f} ms):")
            for p, s in zip(prompts, scores):
                print(f"   {p!r}: sum log p = {s.sum_logprob:.2f} over {len(s.token_ids)} tokens")
        with JambaClient(address, application="classifier", timeout=60) as c:
            t = time.perf_counter()
            texts = ["I loved this film.", "The service was terrible."]
            results = c.classify(texts)
            print(f"\n-- classification ({(time.perf_counter() - t) * 1000:.0f} ms):")
            for text, r in zip(texts, results):
                print(f"   {text!r}: {r.label} (p={max(r.probs):.2f})")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\ndone in {time.perf_counter() - t0:.1f}s; everything shut down.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

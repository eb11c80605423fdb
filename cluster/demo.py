"""`make demo`: the main jobs on the embedded demo model, with results and timings.

    python -m cluster.demo [--model DIR]

Writes the demo checkpoints if needed (random weights: the text is gibberish), then runs a
batch of generations, scores and classifications through the same code as `jamba generate`,
`jamba score` and `jamba classify`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from stages.demo import ensure_demo_model
from stages.loading import load_stage
from stages.runner import LocalRunner
from stages.tokenizer import Tokenizer

from .cli import run_chunk

PROMPTS = ["The weather today is", "My favourite recipe starts with", "The train to the city", "Computers are"]


def _runner(path) -> LocalRunner:
    stage, stats = load_stage(path)
    print(f"  loaded {path} ({stats.bytes_loaded / 1e6:.1f} MB in {stats.seconds * 1000:.0f} ms)")
    return LocalRunner(stage, Tokenizer.from_dir(path))


def _run(runner, task: str, rows: list[dict]) -> list[dict]:
    t0 = time.perf_counter()
    out, tokens = run_chunk(runner, task, [(i + 1, json.dumps(r)) for i, r in enumerate(rows)])
    dt = time.perf_counter() - t0
    print(f"  {task}: {len(rows)} rows, {tokens} tokens in {dt * 1000:.0f} ms ({tokens / dt:.0f} tokens/s)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="causal-LM checkpoint to use instead of the demo model")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    lm_path = args.model or ensure_demo_model("lm")
    print("Jamba demo (single process). The demo model's weights are RANDOM: expect gibberish text.")
    runner = _runner(lm_path)
    gen = _run(runner, "generate", [{"prompt": p, "max_new_tokens": 12} for p in PROMPTS]
               + [{"prompt": PROMPTS[0], "max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7},
                  {"messages": [{"role": "user", "content": "Say hello."}], "max_new_tokens": 8}])
    for r in gen:
        src = r.get("prompt") or r["messages"][-1]["content"]
        print(f"    {src!r} -> {r['text']!r} ({r['finish_reason']})")
    for r in _run(runner, "score", [{"prompt": p} for p in PROMPTS]):
        print(f"    {r['prompt']!r}: sum log p = {r['sum_logprob']:.2f} over {len(r['token_logprobs'])} tokens")
    cls = _runner(ensure_demo_model("classification"))
    for r in _run(cls, "classify", [{"text": p} for p in PROMPTS]):
        print(f"    {r['text']!r}: {r['label']} (p={max(r['probs']):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

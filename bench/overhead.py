"""Host overhead of a decode step: a config whose arithmetic is negligible, so what is left is
Python, dispatch and thread wake-ups.

    .venv/bin/python bench/overhead.py [--threads 2] [--quick]

Config: hidden 64, 8 layers (1 attention, 7 Mamba; 4 MoE with 8 experts top-2), vocab 512, fp32,
random weights written by transformers. Per-layer time of one decode step at batch 1, 8 and 32
for three paths on the same weights, in one run:

    eager          our stage's eager forward (JAMBA_DECODE=eager, --enforce-eager)
    compiled       the default: the fixed-shape step compiled per batch size (stages/decode.py)
    transformers   JambaForCausalLM with its cache

then the same end to end: `LocalRunner.generate` (what `jamba generate` runs: scheduler, sampling,
detokenizing) with each decode path, 16 rows x 64 new tokens. The OpenMP environment is the
CLI's (stages/openmp.py); --omp PASSIVE reruns the eager rows as the old default had it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.openmp import use_openmp_env  # noqa: E402

use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)
import torch  # noqa: E402

from bench.model_vs_hf import HF, Ours  # noqa: E402

OVERHEAD_CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
    attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
    max_position_embeddings=4096,
)
LAYERS = OVERHEAD_CONFIG["num_hidden_layers"]


def per_layer_ms(impl, batch: int, steps: int, reps: int) -> float:
    ids = torch.randint(3, OVERHEAD_CONFIG["vocab_size"], (batch, 16), generator=torch.Generator().manual_seed(batch))
    run = impl.decode(ids, steps)
    run()
    return min(run() for _ in range(reps)) / steps / LAYERS * 1e3


def end_to_end(model_dir: str, mode: str, threads: int) -> float:
    """Seconds of LocalRunner.generate for 16 rows x 64 tokens, in a child process with
    JAMBA_DECODE=`mode` (after one warm-up call)."""
    child = f"""
import sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
torch.set_num_threads({threads})
from cluster.runtime.local import LocalRunner
from stages.loading import load_stage
from stages.sequence import SamplingParams
stage, _ = load_stage({model_dir!r})
prompts = [[5 + i, 9, 13 + i] for i in range(16)]
params = [SamplingParams(max_new_tokens=64, ignore_eos=True) for _ in prompts]
with LocalRunner(stage, None, num_slots=16) as runner:
    runner.generate(prompts, params)
    best = min((lambda t0: (runner.generate(prompts, params), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(3))
print(best)
"""
    env = dict(os.environ, JAMBA_DECODE=mode, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=1800, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import JambaConfig, JambaForCausalLM

    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    JambaForCausalLM(JambaConfig(**OVERHEAD_CONFIG)).save_pretrained(tmp.name)
    path = Path(tmp.name)
    impls = {"eager": Ours(path, decode="eager"), "compiled": Ours(path), "transformers": HF(path)}
    steps, reps = (16, 2) if args.quick else (32, 3)
    rows = []
    for batch in (1, 8, 32):
        t0 = time.perf_counter()
        res = {name: per_layer_ms(impl, batch, steps, reps) for name, impl in impls.items()}
        rows.append((batch, res))
        print(f"  batch {batch}: " + ", ".join(f"{n} {v:.3f} ms/layer" for n, v in res.items())
              + f" ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    e2e = {mode: end_to_end(str(path), mode, args.threads) for mode in ("eager", "compiled")}
    tmp.cleanup()

    env = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"))
    print(f"\nNegligible-math config (hidden 64, 8 layers, 8 experts top-2), fp32, {args.threads} threads, {env}\n")
    print("| decode batch | eager ms/layer | compiled ms/layer (default) | transformers ms/layer | compiled vs eager | compiled vs transformers |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, r in rows:
        print(f"| {batch} | {r['eager']:.3f} | {r['compiled']:.3f} | {r['transformers']:.3f} | "
              f"**{r['eager'] / r['compiled']:.1f}x** | **{r['transformers'] / r['compiled']:.1f}x** |")
    tokens = 16 * 64
    print(f"\nLocalRunner.generate, 16 rows x 64 tokens: eager {e2e['eager']:.2f}s ({tokens / e2e['eager']:.0f} tok/s), "
          f"compiled {e2e['compiled']:.2f}s ({tokens / e2e['compiled']:.0f} tok/s): "
          f"**{e2e['eager'] / e2e['compiled']:.1f}x**; per layer per step "
          f"{e2e['compiled'] / 64 / LAYERS * 1e3:.3f} ms (compiled) vs {e2e['eager'] / 64 / LAYERS * 1e3:.3f} ms (eager)")
    print()
    for batch, r in rows:
        ok = r["compiled"] <= 0.05
        print(f"- target batch {batch}: <= 0.05 ms/layer: {r['compiled']:.3f}: {'met' if ok else 'NOT met'}; "
              f">= 5x transformers: {r['transformers'] / r['compiled']:.1f}x: {'met' if r['transformers'] >= 5 * r['compiled'] else 'NOT met'}")


if __name__ == "__main__":
    main()

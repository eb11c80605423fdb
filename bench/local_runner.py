"""The single-process engine (LocalRunner: the one scheduler with an in-process `send`) against
another checkout of this repository, in one run: generation tokens/s at batch 1, 8 and 32 and
score rows/s on the trained demo LM (fp32), and the time per decode step of a model whose math
costs next to nothing (the host's work per step), every figure from a fresh process per checkout,
alternating this checkout and the other, round after round; the table gives each checkout's
median and the median of the per-round ratios (this machine is noisy).

    git worktree add ../before <commit>
    .venv/bin/python bench/local_runner.py --vs ../before [--rounds 3] [--threads 2]

What it measures is the whole path a `jamba generate` row takes once the model is loaded: the
intake, the scheduler's microbatches, the stage worker's step, sampling and the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.openmp import OPENMP_ENV  # noqa: E402

# Run in each checkout (its own modules first on sys.path). Before the layout change (issue 25)
# the runner was stages/runner.py.
CHILD = r"""
import json, os, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[1]))
try:
    from cluster.runtime.local import LocalRunner
except ImportError:
    from stages.runner import LocalRunner
from bench.model_vs_hf import best_of
from stages.demo import trained_model_dir, widen_to_fp32
from stages.loading import load_stage
from stages.sequence import SamplingParams

NEW = 64
with tempfile.TemporaryDirectory() as tmp:
    widen_to_fp32(trained_model_dir("lm"), Path(tmp) / "lm")
    stage, _ = load_stage(Path(tmp) / "lm")
runner = LocalRunner(stage, num_slots=32)
g = torch.Generator().manual_seed(0)

def prompts(n, length):
    return [torch.randint(3, stage.config.vocab_size, (length,), generator=g).tolist() for _ in range(n)]

def best(fn, reps=3):
    fn()  # warm-up
    return best_of(fn, reps)

out = {}
for batch in (1, 8, 32):
    ps = prompts(batch, 16)
    params = [SamplingParams(max_new_tokens=NEW, ignore_eos=True) for _ in ps]
    out[f"generate b={batch}"] = batch * NEW / best(lambda: runner.generate(ps, params))
rows = prompts(64, 128)
out["score 64 x 128"] = len(rows) / best(lambda: runner.score(rows))
# The same path on a model whose math costs next to nothing (hidden 64, 8 layers): what is left is
# the host's work per step, the scheduler's included.
from stages.demo import make_demo_model
with tempfile.TemporaryDirectory() as tmp:
    tiny, _ = load_stage(make_demo_model(Path(tmp) / "tiny"))
runner = LocalRunner(tiny, num_slots=32)
for batch in (1, 32):
    ps = [p[:8] for p in prompts(batch, 8)]
    ps = [[t % tiny.config.vocab_size for t in p] for p in ps]
    params = [SamplingParams(max_new_tokens=NEW, ignore_eos=True) for _ in ps]
    out[f"tiny: ms per step b={batch}"] = best(lambda: runner.generate(ps, params)) / NEW * 1000
print(json.dumps(out))
"""


def measure(tree: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), JAMBA_KERNEL_WARMUP="1", **OPENMP_ENV)
    r = subprocess.run([sys.executable, "-c", CHILD, str(threads)], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=1800)
    if r.returncode:
        raise RuntimeError(f"{tree}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vs", required=True, help="another checkout of this repository (e.g. a git worktree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    other = Path(args.vs).resolve()
    runs: dict[str, list[dict]] = {"this": [], "other": []}
    for k in range(args.rounds):
        for name, tree in (("this", ROOT), ("other", other)):
            runs[name].append(measure(tree, args.threads))
            print(f"round {k + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    print(f"\n| LocalRunner, fp32, {args.threads} threads | this checkout | {other.name} | this / {other.name} (median of rounds) |")
    print("|---|---|---|---|")
    for key in runs["this"][0]:
        a = [r[key] for r in runs["this"]]
        b = [r[key] for r in runs["other"]]
        unit = "tok/s" if key.startswith("generate") else "ms" if key.startswith("tiny") else "rows/s"
        ratio = statistics.median(x / y for x, y in zip(a, b))
        print(f"| {key} | {statistics.median(a):.1f} {unit} | {statistics.median(b):.1f} {unit} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

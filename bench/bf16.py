"""bf16 against fp32 on the same weights: how often greedy tokens differ, and by how much log-probs move.

    .venv/bin/python bench/bf16.py [--prompts 8] [--prompt-len 32] [--new 32] [--threads 2]

Models: the demo model (stages/demo.py) and the bench model of bench/model_vs_hf.py (random
transformers init), both stored in fp32 and loaded once as fp32 and once cast to bf16. Runs on
whatever device/backend JAMBA_KERNELS picks for CPU tensors (numba by default).

1. Free-running greedy generation in each dtype: how many sequences come out identical, and
   where the first differing token is.
2. Teacher-forced on the fp32 greedy sequences (so both dtypes see the same context): at every
   generated position, does bf16's argmax equal fp32's? Where it does not, how large was fp32's
   own margin (log-prob gap between its top two tokens)? And |log p_bf16 - log p_fp32| of the
   fp32-chosen token at every position.
A bf16 flip is expected only where fp32's margin is below the size of bf16's perturbation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.openmp import use_openmp_env  # noqa: E402

use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_vs_hf import BENCH_CONFIG  # noqa: E402
from cluster.runtime.local import LocalRunner  # noqa: E402
from stages.loading import load_stage  # noqa: E402
from stages.sequence import SamplingParams  # noqa: E402


def full_logprobs(stage, ids: list[int]) -> torch.Tensor:
    """(L, V) float32 log-probs of the next token at every position, one prefill call."""
    cache = stage.make_cache(1, len(ids))
    out = stage(torch.tensor(ids), cache, [cache.allocate()], [len(ids)], output_index=torch.arange(len(ids)))
    return torch.log_softmax(out.float(), dim=-1)


def compare(path: Path, n_prompts: int, prompt_len: int, new: int) -> dict:
    stages = {d: load_stage(path, dtype=d)[0] for d in ("float32", "bfloat16")}
    params_m = sum(p.numel() for p in stages["float32"].parameters()) / 1e6
    V = stages["float32"].config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (prompt_len,), generator=g).tolist() for _ in range(n_prompts)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True) for _ in prompts]
    outs = {d: LocalRunner(s, num_slots=n_prompts).generate(prompts, params) for d, s in stages.items()}

    identical, first_diff = 0, []
    for a, b in zip(outs["float32"], outs["bfloat16"]):
        diff = [i for i, (x, y) in enumerate(zip(a.output_ids, b.output_ids)) if x != y]
        if diff:
            first_diff.append(diff[0])
        else:
            identical += 1

    agree, total, flip_margins, deltas, margins = 0, 0, [], [], []
    for p, r in zip(prompts, outs["float32"]):
        ids = p + r.output_ids
        lp32 = full_logprobs(stages["float32"], ids)[len(p) - 1 : len(ids) - 1]  # (new, V) at generated positions
        lp16 = full_logprobs(stages["bfloat16"], ids)[len(p) - 1 : len(ids) - 1]
        top2 = lp32.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]  # fp32's own margin at each step
        chosen = torch.tensor(r.output_ids)
        same = lp16.argmax(-1) == lp32.argmax(-1)
        agree += int(same.sum())
        total += len(chosen)
        flip_margins += margin[~same].tolist()
        margins += margin.tolist()
        deltas += (lp16.gather(1, chosen[:, None]) - lp32.gather(1, chosen[:, None])).abs()[:, 0].tolist()
    d = torch.tensor(deltas)
    return dict(
        params_m=params_m, identical=identical, n=n_prompts, first_diff=first_diff, agree=agree, total=total,
        flip_margins=flip_margins, median_margin=float(torch.tensor(margins).median()),
        delta_mean=float(d.mean()), delta_p99=float(d.quantile(0.99)), delta_max=float(d.max()),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=32, help="greedy tokens generated per prompt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import JambaConfig, JambaForCausalLM

    from stages.demo import make_demo_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"demo": make_demo_model(Path(tmp) / "demo")}
        torch.manual_seed(0)
        JambaForCausalLM(JambaConfig(**BENCH_CONFIG)).save_pretrained(Path(tmp) / "bench")
        models["bench"] = Path(tmp) / "bench"
        for name, path in models.items():
            r = compare(path, args.prompts, args.prompt_len, args.new)
            rows.append((name, r))
            print(f"  {name}: {r}", file=sys.stderr)

    print(f"\n{args.prompts} prompts of {args.prompt_len} random tokens, {args.new} greedy tokens each; "
          f"torch {torch.__version__}, {args.threads} threads\n")
    print("| model | identical greedy sequences | first differing token (index) | teacher-forced argmax agreement "
          "| fp32 margin where bf16 flips (max) | fp32 median margin | abs Δ log p mean / p99 / max |")
    print("|---|---:|---|---:|---:|---:|---|")
    for name, r in rows:
        fd = ", ".join(map(str, r["first_diff"])) or "-"
        fm = f"{max(r['flip_margins']):.4f}" if r["flip_margins"] else "-"
        print(f"| {name} ({r['params_m']:.1f}M params) | {r['identical']}/{r['n']} | {fd} | {r['agree']}/{r['total']} "
              f"({100 * r['agree'] / r['total']:.1f}%) | {fm} | {r['median_margin']:.4f} "
              f"| {r['delta_mean']:.4f} / {r['delta_p99']:.4f} / {r['delta_max']:.4f} |")


if __name__ == "__main__":
    main()

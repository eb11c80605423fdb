"""Output quality of the trained demo model under each weight format, on its held-out texts.

    .venv/bin/python bench/quality.py [--texts 721] [--prompts 64] [--modes fp32,bf16,int8-experts,...]

For each mode: held-out perplexity (token-weighted, every text scored on its own, as `jamba eval`),
its change against fp32, and greedy-token agreement with fp32: each of the first `--prompts`
held-out texts cut to its first 16 tokens is continued greedily for 32 tokens, and we count the
tokens produced before the first one that differs from fp32's (and how many continuations are
identical throughout). Modes: fp32 and bf16 casts of the checkpoint; int8-experts, int8 and
int8-with-mamba quantize at load (stages/quant.py), on fp32 activations. With --classifier, the
demo classifier's held-out accuracy in each mode too, beside the majority-class baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.openmp import use_openmp_env  # noqa: E402

use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.runtime.local import LocalRunner  # noqa: E402
from stages.demo import trained_model_dir  # noqa: E402
from stages.loading import load_stage  # noqa: E402
from stages.sequence import SamplingParams  # noqa: E402
from stages.tokenizer import Tokenizer  # noqa: E402

MODES = {  # name -> load_stage arguments
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8-experts": dict(dtype="float32", quantize="int8-experts"),
    "int8": dict(dtype="float32", quantize="int8"),
    "int8-with-mamba": dict(dtype="float32", quantize="int8-with-mamba"),
}
PROMPT_TOKENS, NEW_TOKENS = 16, 32


def perplexity(runner: LocalRunner, texts: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(texts), 64):
        for lp in runner.score(texts[i : i + 64]):
            nll -= math.fsum(lp[1:])
            n += len(lp) - 1
    return math.exp(nll / n)


def greedy(runner: LocalRunner, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True) for _ in prompts]
    return [r.output_ids for r in runner.generate(prompts, params)]


def agreement(got: list[list[int]], want: list[list[int]]) -> tuple[float, float]:
    """(tokens before the first difference / tokens, fraction of identical continuations)."""
    same = total = identical = 0
    for g, w in zip(got, want):
        k = 0
        while k < min(len(g), len(w)) and g[k] == w[k]:
            k += 1
        same += k
        total += len(w)
        identical += g == w
    return same / total, identical / len(want)


def classifier_accuracy(model_dir: Path, rows: list[dict], mode: str) -> tuple[float, float, int]:
    """(held-out accuracy, majority-class baseline, texts) over the rows whose label the classifier has."""
    stage, _ = load_stage(model_dir, **MODES[mode])
    tok = Tokenizer.from_dir(model_dir)
    labels = [stage.config.id2label[i] for i in range(len(stage.config.id2label))]
    rows = [r for r in rows if r.get("label") in labels]
    logits = LocalRunner(stage, tok).classify([tok.encode(r["text"])[:128] for r in rows])  # cut as in training
    right = sum(labels[max(range(len(lg)), key=lg.__getitem__)] == r["label"] for lg, r in zip(logits, rows))
    majority = max(sum(r["label"] == label for r in rows) for label in labels)
    return right / len(rows), majority / len(rows), len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(trained_model_dir("lm")))
    ap.add_argument("--heldout", default=str(ROOT / "models" / "heldout.jsonl"))
    ap.add_argument("--texts", type=int, default=None, help="held-out texts to score (default: all)")
    ap.add_argument("--prompts", type=int, default=64, help="greedy continuations compared with fp32")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--classifier", default=str(trained_model_dir("classification")),
                    help="also measure this classifier's held-out accuracy ('' to skip)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_dir(args.model)
    rows = [json.loads(line) for line in Path(args.heldout).read_text().splitlines()][: args.texts]
    texts = [tok.encode(r["text"]) for r in rows]
    prompts = [t[:PROMPT_TOKENS] for t in texts if len(t) > PROMPT_TOKENS][: args.prompts]
    print(f"model {args.model}: {len(texts)} held-out texts ({sum(len(t) - 1 for t in texts)} predicted tokens), "
          f"{len(prompts)} greedy prompts of {PROMPT_TOKENS} tokens + {NEW_TOKENS} new", flush=True)

    results, base_ppl, base_out = {}, None, None
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        stage, stats = load_stage(args.model, **MODES[mode])
        runner = LocalRunner(stage, tok)
        ppl = perplexity(runner, texts)
        outs = greedy(runner, prompts)
        if base_out is None:
            base_ppl, base_out = ppl, outs
        tok_agree, seq_agree = agreement(outs, base_out)
        weight_mb = sum(t.numel() * t.element_size() for t in list(stage.parameters()) + list(stage.buffers())) / 2**20
        results[mode] = dict(ppl=ppl, delta=ppl / base_ppl - 1, tok_agree=tok_agree, seq_agree=seq_agree, weight_mb=weight_mb)
        print(f"  {mode}: perplexity {ppl:.4f} ({results[mode]['delta'] * 100:+.2f}%), greedy agreement "
              f"{tok_agree * 100:.1f}% of tokens, {seq_agree * 100:.0f}% of continuations, weights {weight_mb:.1f} MiB "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        del stage, runner

    if args.classifier:
        print("\nclassifier (which fortune file a held-out text comes from):")
        for mode in args.modes.split(","):
            acc, majority, n = classifier_accuracy(Path(args.classifier), rows, mode)
            results[mode]["acc"] = acc
            print(f"  {mode}: accuracy {acc:.3f} on {n} texts (majority baseline {majority:.3f})", flush=True)

    print("\n| mode | held-out perplexity | vs fp32 | greedy tokens = fp32 (before first difference) "
          "| continuations identical | LM weights (MiB) | classifier accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        acc = f"{r['acc']:.3f}" if "acc" in r else "-"
        print(f"| {mode} | {r['ppl']:.3f} | {r['delta'] * 100:+.2f}% | {r['tok_agree'] * 100:.1f}% "
              f"| {r['seq_agree'] * 100:.0f}% | {r['weight_mb']:.1f} | {acc} |")


if __name__ == "__main__":
    main()

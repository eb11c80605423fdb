"""This model vs transformers' JambaForCausalLM, side by side in one process, on the same weights.

    .venv/bin/python bench/model_vs_hf.py [--threads 2] [--quick]

Config: ~70M parameters (hidden 512, 8 layers, 8 experts top-2, vocab 8192), fp32.
Measures prefill tokens/s (batch 1) at L=512 and L=2048, decode tokens/s at batch 1, 8 and 32,
and the peak resident memory each measurement added. Prints a Markdown table and the ratios.
The machine is noisy, so each figure is the best of a few repetitions and ratios are what count.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see cluster/pipeline.py
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.loading import load_stage  # noqa: E402

BENCH_CONFIG = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
    attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
    max_position_embeddings=8192,
)


# ---- peak memory: Linux lets a process reset its high-water mark (VmHWM) ------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_added_mb(base_kb: int) -> float:
    return max(0, _status_kb("VmHWM") - base_kb) / 1024


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---- the two implementations ------------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, path: Path) -> None:
        self.stage, _ = load_stage(path)

    def prefill(self, ids: torch.Tensor) -> None:  # ids: (1, L)
        cache = self.stage.make_cache(1, ids.shape[1])
        self.stage(ids[0], cache, [cache.allocate()], [ids.shape[1]])

    def decode(self, ids: torch.Tensor, steps: int):
        """ids: (B, P) prompts. Returns a closure that decodes `steps` tokens per row and returns
        the seconds the decode steps took."""
        B, P = ids.shape
        cache = self.stage.make_cache(B, P + steps + 1)
        slots = [cache.allocate() for _ in range(B)]
        logits = self.stage(ids.flatten(), cache, slots, [P] * B)
        state = {"tok": logits.argmax(-1)}

        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(steps):
                state["tok"] = self.stage(state["tok"], cache, slots, [1] * B).argmax(-1)
            dt = time.perf_counter() - t0
            for s in slots:  # rewind so repetitions decode the same positions
                cache.lengths[s] -= steps
            return dt
        return run


class HF:
    name = "transformers"

    def __init__(self, path: Path) -> None:
        from transformers import JambaForCausalLM

        self.model = JambaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        self.model(ids, use_cache=False, logits_to_keep=1)

    def decode(self, ids: torch.Tensor, steps: int):
        from transformers import DynamicCache

        def run() -> float:
            with torch.no_grad():
                cache = DynamicCache(config=self.model.config)
                out = self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()  # time only the decode steps
                for _ in range(steps):
                    out = self.model(tok, past_key_values=cache, use_cache=True)
                    tok = out.logits[:, -1:].argmax(-1)
                return time.perf_counter() - t0
        return run


def measure(impl, kind: str, arg: int, steps: int, reps: int) -> tuple[float, float]:
    """Returns (tokens per second, peak MB added)."""
    g = torch.Generator().manual_seed(arg)
    base = reset_peak()
    if kind == "prefill":
        ids = torch.randint(3, BENCH_CONFIG["vocab_size"], (1, arg), generator=g)
        impl.prefill(ids)  # warm-up (numba compile, allocator)
        t = best_of(lambda: impl.prefill(ids), reps)
        return arg / t, peak_added_mb(base)
    ids = torch.randint(3, BENCH_CONFIG["vocab_size"], (arg, 32), generator=g)
    run = impl.decode(ids, steps)
    run()  # warm-up
    return arg * steps / min(run() for _ in range(reps)), peak_added_mb(base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and shorter runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import JambaConfig, JambaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ref = JambaForCausalLM(JambaConfig(**BENCH_CONFIG))
        n_params = sum(p.numel() for p in ref.parameters())
        ref.save_pretrained(tmp)
        del ref
        impls = [Ours(Path(tmp)), HF(Path(tmp))]
    reps = 2 if args.quick else 3
    steps = 8 if args.quick else 16
    cases = [("prefill", 512), ("prefill", 2048), ("decode", 1), ("decode", 8), ("decode", 32)]
    rows = []
    for kind, arg in cases:
        res = {impl.name: measure(impl, kind, arg, steps, reps) for impl in impls}
        rows.append((kind, arg, res))
        o, h = res["ours"], res["transformers"]
        print(f"  {kind} {arg}: ours {o[0]:.0f} tok/s, transformers {h[0]:.0f} tok/s, x{o[0] / h[0]:.2f}", file=sys.stderr)

    print(f"\nJamba bench config: {n_params / 1e6:.1f}M parameters, fp32, {args.threads} threads, torch {torch.__version__}\n")
    print("| case | ours tok/s | transformers tok/s | speed-up | ours peak MB | transformers peak MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, arg, res in rows:
        label = f"prefill L={arg}, batch 1" if kind == "prefill" else f"decode batch {arg}"
        o, h = res["ours"], res["transformers"]
        print(f"| {label} | {o[0]:.0f} | {h[0]:.1f} | **{o[0] / h[0]:.1f}x** | {o[1]:.0f} | {h[1]:.0f} |")
    targets = {("prefill", 2048): 5.0, ("decode", 8): 3.0}
    print()
    for kind, arg, res in rows:
        if (kind, arg) in targets:
            ratio = res["ours"][0] / res["transformers"][0]
            goal = targets[(kind, arg)]
            print(f"- target {kind} {arg}: >= {goal}x, measured {ratio:.1f}x: {'met' if ratio >= goal else 'NOT met'}")


if __name__ == "__main__":
    main()

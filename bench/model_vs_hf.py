"""This model vs transformers' JambaForCausalLM, side by side in one process, on the same weights.

    .venv/bin/python bench/model_vs_hf.py [--threads 2] [--quick]

Config: ~70M parameters (hidden 512, 8 layers, 8 experts top-2, vocab 8192), fp32.
Measures prefill tokens/s (batch 1) at L=512 and L=2048, decode tokens/s at batch 1, 8 and 32
(ours: the compiled decode step, the default, and the eager one beside it),
and the peak resident memory each measurement added; then the same for ours with 8-bit weights
(--quantize int8-experts,int8: weights quantized at load from the same checkpoint), with the
weight memory of the experts and of the whole model. Prints a Markdown table and the ratios.
The machine is noisy, so each figure is the best of a few repetitions and ratios are what count.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.openmp import use_openmp_env  # noqa: E402

use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)
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
    """Our stage called directly. Decode steps go through the compiled fixed-shape step
    (stages/decode.py, the default) or, with decode="eager", through the eager forward."""

    def __init__(self, path: Path, quantize: str | None = None, decode: str = "compiled") -> None:
        self.name = " ".join(["ours"] + [m for m in (quantize, "eager" if decode == "eager" else None) if m])
        self.decode_mode = decode
        self.stage, _ = load_stage(path, quantize=quantize)

    def weight_mb(self, part: str = "") -> float:
        """MiB of the stage's weights (int8 values and their scales included) whose name contains `part`."""
        tensors = list(self.stage.named_parameters()) + list(self.stage.named_buffers())
        return sum(t.numel() * t.element_size() for n, t in tensors if part in n) / 2**20

    def prefill(self, ids: torch.Tensor) -> None:  # ids: (1, L)
        cache = self.stage.make_cache(1, ids.shape[1])
        self.stage(ids[0], cache, [cache.allocate()], [ids.shape[1]])

    def decode(self, ids: torch.Tensor, steps: int):
        """ids: (B, P) prompts. Returns a closure that decodes `steps` tokens per row and returns
        the seconds the decode steps took."""
        from stages.decode import DecodeRunner

        B, P = ids.shape
        cache = self.stage.make_cache(B, P + steps + 1)
        slots = [cache.allocate() for _ in range(B)]
        logits = self.stage(ids.flatten(), cache, slots, [P] * B)
        state = {"tok": logits.argmax(-1)}
        if self.decode_mode == "eager":
            def step(tok):
                return self.stage(tok, cache, slots, [1] * B)
        else:
            step = lambda tok: runner(tok, slots)  # noqa: E731
            runner = DecodeRunner(self.stage, cache, sizes=[B])
            runner.warm_up()  # compiled (or loaded from inductor's cache) before timing

        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(steps):
                state["tok"] = step(state["tok"]).argmax(-1)
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
    ap.add_argument("--llama-cpp", metavar="DIR", help="a built llama.cpp tree (see bench/llama_cpp.py): adds its F32 column")
    ap.add_argument("--quantize", default="int8-experts,int8",
                    help="also run ours with these --quantize modes, comma-separated ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import JambaConfig, JambaForCausalLM

    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    ref = JambaForCausalLM(JambaConfig(**BENCH_CONFIG))
    n_params = sum(p.numel() for p in ref.parameters())
    ref.save_pretrained(tmp.name)
    del ref
    modes = [m for m in args.quantize.split(",") if m]
    impls = [Ours(Path(tmp.name)), HF(Path(tmp.name)), Ours(Path(tmp.name), decode="eager")] + [Ours(Path(tmp.name), m) for m in modes]
    reps = 2 if args.quick else 3
    steps = 8 if args.quick else 16
    cases = [("prefill", 512), ("prefill", 2048), ("decode", 1), ("decode", 8), ("decode", 32)]
    rows = []
    for kind, arg in cases:
        res = {impl.name: measure(impl, kind, arg, steps, reps) for impl in impls}
        rows.append((kind, arg, res))
        print(f"  {kind} {arg}: " + ", ".join(f"{n} {r[0]:.0f} tok/s" for n, r in res.items()), file=sys.stderr)
    llama = None
    if args.llama_cpp:
        from bench.llama_cpp import measure as llama_measure

        llama = llama_measure(Path(tmp.name), Path(args.llama_cpp), args.threads, reps)
        print("  llama.cpp F32: " + ", ".join(f"{k} {a} {v:.0f} tok/s" for (k, a), v in llama.items()), file=sys.stderr)
    tmp.cleanup()

    print(f"\nJamba bench config: {n_params / 1e6:.1f}M parameters, fp32, {args.threads} threads, torch {torch.__version__}\n")
    print("| case | ours tok/s | ours, eager decode tok/s | transformers tok/s | speed-up | ours peak MB | transformers peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, arg, res in rows:
        label = f"prefill L={arg}, batch 1" if kind == "prefill" else f"decode batch {arg}"
        o, e, h = res["ours"], res["ours eager"], res["transformers"]
        print(f"| {label} | {o[0]:.0f} | {e[0]:.0f} | {h[0]:.1f} | **{o[0] / h[0]:.1f}x** | {o[1]:.0f} | {h[1]:.0f} |")
    targets = {("prefill", 2048): 5.0, ("decode", 8): 3.0}
    print()
    for kind, arg, res in rows:
        if (kind, arg) in targets:
            ratio = res["ours"][0] / res["transformers"][0]
            goal = targets[(kind, arg)]
            print(f"- target {kind} {arg}: >= {goal}x, measured {ratio:.1f}x: {'met' if ratio >= goal else 'NOT met'}")
    if not modes:
        return
    # 8-bit weights: each mode against our fp32 and transformers', in the same run.
    quant = [impl for impl in impls if impl.name.startswith("ours ") and impl.name != "ours eager"]
    peer = " | llama.cpp F32 tok/s" if llama else ""
    print("\n| case | transformers fp32 tok/s | ours fp32 tok/s | "
          + " | ".join(f"ours {q.name[5:]} tok/s (vs ours fp32, vs transformers)" for q in quant) + peer + " |")
    print("|---|---:|---:|" + "---:|" * (len(quant) + bool(llama)))
    for kind, arg, res in rows:
        label = f"prefill L={arg}, batch 1" if kind == "prefill" else f"decode batch {arg}"
        o, h = res["ours"][0], res["transformers"][0]
        cells = [f"{res[q.name][0]:.0f} ({res[q.name][0] / o:.2f}x, {res[q.name][0] / h:.2f}x)" for q in quant]
        if llama:
            cells.append(f"{llama.get((kind, arg), float('nan')):.0f}")
        print(f"| {label} | {h:.0f} | {o:.0f} | " + " | ".join(cells) + " |")
    if llama:
        print()
        for kind, arg, res in rows:
            if (kind, arg) in llama and kind == "decode":
                ref = llama[(kind, arg)]
                print(f"- decode batch {arg}: ours fp32 {res['ours'][0] / ref:.2f}x llama.cpp F32"
                      + "".join(f", {q.name[5:]} {res[q.name][0] / ref:.2f}x" for q in quant))
    fp32 = impls[0]
    print("\n| weights (MiB) | ours fp32 | " + " | ".join(q.name[5:] for q in quant) + " |")
    print("|---|---:|" + "---:|" * len(quant))
    for label, part in (("experts", "experts"), ("all", "")):
        print(f"| {label} | {fp32.weight_mb(part):.1f} | "
              + " | ".join(f"{q.weight_mb(part):.1f} ({fp32.weight_mb(part) / q.weight_mb(part):.2f}x smaller)" for q in quant) + " |")
    if "ours int8-experts" in rows[0][2]:
        for kind, arg, res in rows:
            if (kind, arg) == ("decode", 8):
                q = res["ours int8-experts"][0]
                for base, goal in (("ours", 2.0), ("transformers", 3.0)):
                    ratio = q / res[base][0]
                    print(f"- target int8-experts decode batch 8 >= {goal}x {base} fp32: measured {ratio:.2f}x: "
                          f"{'met' if ratio >= goal else 'NOT met'}")


if __name__ == "__main__":
    main()

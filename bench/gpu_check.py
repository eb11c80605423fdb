"""One-shot GPU check: kernel parity on CUDA, prefill / decode speed, decode HBM bandwidth, and a
2-stage pipeline sharing the GPU. Meant to finish in under 8 minutes on one H100 / H200.

    python bench/gpu_check.py [--quick] [--skip-pipeline] [--peak-gbs 4800]
    python bench/gpu_check.py --smoke     # the same code path on CPU, tiny sizes, Triton interpreted

Needs a CUDA build of torch (which brings triton) and the project (`pip install -e .`); nothing
else. Prints progress on stderr and a Markdown summary on stdout, ready for BENCHMARKS.md.

1. Parity: the Triton kernels (stages/kernels/triton_gpu.py) against the torch references on
   CUDA, at Jamba-Mini widths (d_inner 8192, d_state 16, conv 4), on one call mixing fresh
   prompts, chunks on top of cached state, decode rows and empty rows, fp32 and bf16, taking
   mid-chunk state snapshots (prefix caching) as well, with the same outputs bit for bit as
   without; and a sequence fed as chunks then decode steps against one reference pass.
2. A random ~1.5B-parameter Jamba in bf16 (hidden 2048, 16 layers: 2 attention, 14 Mamba with
   d_inner 4096; 4 experts top-2 on every other layer): prefill tokens/s at 2K and 32K tokens (one
   sequence), against the reference loop (JAMBA_KERNELS=torch, measured at 2K tokens: the loop
   costs the same per token at any length, so its tokens/s stands for 32K too); decode tokens/s at
   batch 1, 32 and 128 after 128-token prompts.
3. Decode's achieved HBM bandwidth: bytes of weights one step reads (every non-expert weight but
   the embedding table, plus the experts the step's tokens were routed to, counted with hooks) /
   step time, as a fraction of the card's peak (by name, or --peak-gbs) and of a measured
   device-to-device copy.
4. A 2-stage Ray pipeline of the same model on the one GPU (0.5 GPU per stage) against the
   single-process runner on the same requests.
5. The pipeline's data plane between GPU stages (issue 11), when the machine has 2 or more GPUs
   (NCCL cannot put two ranks on one device): per-hop cost of a decode microbatch (32 tokens of
   the model's hidden size, bf16) through identity stages, activations over NCCL (GPU to GPU) and
   inline (through host memory); and a 2-stage pipeline of the model with a GPU per stage over
   NCCL, against the single-process runner. Run with NCCL_DEBUG=INFO to see which NCCL transport
   the stages' pairs use (P2P/NVLink, or SHM when they cannot see each other's device). With
   --smoke, gloo on CPU stands in for NCCL.

6. 8-bit weights (issue 14): the Triton dequantize-in-the-matmul kernel (stages/kernels/triton_int8.py)
   against the dequantize-then-matmul reference on CUDA (bf16 activations; T = 1, 16, 512 tokens
   against 4096x4096 and 14336x4096 weights), its time against bf16 `F.linear` on the same shapes
   (decode is bandwidth-bound: int8 reads half of bf16's bytes), and decode tokens/s of the
   section-2 model with int8 experts against bf16, with the same greedy tokens over 8 steps.

7. The decode step without host overhead (issue 22): stages/decode.py's DecodeRunner on the
   section-2 model, the fixed-shape step compiled and captured in a CUDA graph per batch size
   (1 and 32; 3 rows padded to 4 too), against the eager step from the same cache state: greedy
   tokens identical and log-probs within 1e-4 (fp32 copy of the model, 16 steps) and the time per
   step of each in bf16. On CPU (--smoke) the same runner compiles without capture.

Targets (issue 12): decode at batch 1 >= 60% of peak HBM bandwidth; 32K-token prefill >= 50x the
reference loop. Any section that fails prints its error and the script goes on.

--smoke runs every section on the CPU (TRITON_INTERPRET=1, a tiny model, short lengths) so the
script itself can be checked without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from array import array
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.runtime.local import LocalRunner  # noqa: E402
from stages.config import JambaConfig  # noqa: E402
from stages.openmp import use_openmp_env  # noqa: E402
from stages.kernels import reference  # noqa: E402
from stages.model import JambaStage, SparseMoE  # noqa: E402
from stages.sequence import SamplingParams  # noqa: E402

DEV = "cuda"  # "cpu" with --smoke
MODEL = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
    attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
    max_position_embeddings=40000, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
SMOKE_MODEL = dict(MODEL, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
# Sizes of each section: on a GPU / with --smoke.
SIZES = {"cuda": dict(d_inner=8192, long_row=2048, prefill=(2048, 32768), prompt=128, batches=(1, 32, 128)),
         "cpu": dict(d_inner=256, long_row=64, prefill=(64, 256), prompt=16, batches=(1, 4, 8))}
PEAK_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
            "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935}
summary: list[str] = []


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 3) -> float:
    """Best wall time of `reps` calls, with the GPU synchronised around each."""
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def section(name: str):
    def wrap(fn):
        def run(*a, **k):
            log(f"== {name}")
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            except Exception as e:  # report and go on: one broken part must not hide the others
                traceback.print_exc()
                summary.append(f"- **{name}: FAILED** ({type(e).__name__}: {e})")
            finally:
                log(f"   ({time.perf_counter() - t0:.0f}s)")
        return run
    return wrap


# ---- 1. parity ----------------------------------------------------------------------------------
def _inputs(T, D, N, K, S, dtype, g):
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, w, b, cst = r(T, D).to(dtype), r(D, K) * 0.5, r(D), r(S, D, K - 1).to(dtype)
    u, z = r(T, D).to(dtype), r(T, D).to(dtype)
    dt = F.softplus(r(T, D) - 1.0)
    A = -torch.exp(r(D, N) * 0.5)
    B, C, Dv, hst = r(T, N).to(dtype), r(T, N).to(dtype), r(D), r(S, D, N)
    return [t.to(DEV) for t in (x, w, b, cst, u, dt, A, B, C, Dv, z, hst)]


@section("parity: Triton kernels vs the torch references")
def check_parity():
    from stages.kernels import triton_gpu as tg

    D, N, K, S = SIZES[DEV]["d_inner"], 16, 4, 16
    long_row = SIZES[DEV]["long_row"]
    lens = [9, 1, 0, 2, 1, 30, 3, 0, 1, long_row]  # fresh / cached prompts, decode rows, empty rows
    cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(S, generator=g)
    slots, snap_dst = perm[: len(lens)], perm[len(lens):]  # snapshots go to the 6 other slots
    c_ = cu.tolist()  # snapshots: a fresh row's first token, a cached row's first (conv: from the state),
    snap_tok = torch.tensor([c_[0], c_[3], c_[5] + 7, c_[6] - 1, c_[9] + min(63, long_row - 2), c_[10] - 1])
    cu, slots, snap_tok, snap_dst = cu.to(DEV), slots.to(DEV), snap_tok.to(DEV), snap_dst.to(DEV)
    T = int(cu[-1])
    keep = torch.ones(S, dtype=torch.bool, device=DEV)
    keep[snap_dst] = False
    ok = True
    for dtype, (atol, rtol) in ((torch.float32, (1e-4, 1e-4)), (torch.bfloat16, (2e-2, 1.6e-2))):
        x, w, b, cst, u, dt, A, B, C, Dv, z, hst = _inputs(T, D, N, K, S, dtype, g)
        cst[slots[0]] = 0  # a fresh prompt
        hst[slots[0]] = 0
        c_ref, c_tri, h_ref, h_tri = cst.clone(), cst.clone(), hst.clone(), hst.clone()
        c_snap, h_snap = cst.clone(), hst.clone()
        # The reference takes the snapshots too (its outputs do not depend on them: tests/test_scan.py).
        yc_ref = reference.causal_conv1d_varlen_ref(x, w, b, c_ref, cu, slots, snap_tok, snap_dst)
        yc_tri = tg.causal_conv1d_varlen_triton(x, w, b, c_tri, cu, slots)
        yc_snap = tg.causal_conv1d_varlen_triton(x, w, b, c_snap, cu, slots, snap_tok, snap_dst)
        ys_ref = reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, h_ref, cu, slots, snap_tok, snap_dst)
        ys_tri = tg.selective_scan_varlen_triton(u, dt, A, B, C, Dv, z, h_tri, cu, slots)
        ys_snap = tg.selective_scan_varlen_triton(u, dt, A, B, C, Dv, z, h_snap, cu, slots, snap_tok, snap_dst)
        sync()
        same = (torch.equal(yc_snap, yc_tri) and torch.equal(c_snap[keep], c_tri[keep]) and torch.equal(ys_snap, ys_tri)
                and torch.equal(h_snap[keep], h_tri[keep]))
        ok &= same
        log(f"   {str(dtype)[6:]:8s} with snapshots: y and final states {'bit-identical' if same else 'DIFFER: FAIL'}")
        for what, got, want, exact in (("conv y", yc_tri, yc_ref, False), ("conv state", c_tri[keep], c_ref[keep], True),
                                       ("scan y", ys_tri, ys_ref, False), ("scan state", h_tri[keep], h_ref[keep], False),
                                       ("conv snaps", c_snap[snap_dst], c_ref[snap_dst], True),
                                       ("scan snaps", h_snap[snap_dst], h_ref[snap_dst], False)):
            err = (got.float() - want.float()).abs()
            tol = atol + rtol * want.float().abs()
            good = bool(torch.equal(got, want)) if exact else bool((err <= tol).all())
            ok &= good
            log(f"   {str(dtype)[6:]:8s} {what:10s} max abs err {err.max().item():.2e} {'ok' if good else 'FAIL'}")
    # chunks then decode steps == one pass (fp32), through the dispatcher
    os.environ["JAMBA_KERNELS"] = "triton"
    from stages import kernels

    x, w, b, cst, u, dt, A, B, C, Dv, z, hst = _inputs(40, D, N, K, 2, torch.float32, g)
    one, s0 = torch.tensor([0, 40], device=DEV), torch.tensor([1], device=DEV)
    c_ref, h_ref = cst.clone(), hst.clone()
    yc_ref = reference.causal_conv1d_varlen_ref(x, w, b, c_ref, one, s0)
    ys_ref = reference.selective_scan_varlen_ref(u, dt, A, B, C, Dv, z, h_ref, one, s0)
    yc, ys = [], []
    for lo, hi in ((0, 17), (17, 32)) + tuple((t, t + 1) for t in range(32, 40)):
        cu1 = torch.tensor([0, hi - lo], device=DEV)
        yc.append(kernels.causal_conv1d_varlen(x[lo:hi], w, b, cst, cu1, s0))
        if hi - lo == 1:
            ys.append(kernels.selective_state_update(hst, s0, u[lo:hi], dt[lo:hi], A, B[lo:hi], C[lo:hi], Dv, z[lo:hi]))
        else:
            ys.append(kernels.selective_scan_varlen(u[lo:hi], dt[lo:hi], A, B[lo:hi], C[lo:hi], Dv, z[lo:hi], hst, cu1, s0))
    e1 = (torch.cat(yc) - yc_ref).abs().max().item()
    e2 = (torch.cat(ys) - ys_ref).abs().max().item()
    e3 = (hst[1] - h_ref[1]).abs().max().item()
    good = e1 < 1e-4 and e2 < 1e-3 and e3 < 1e-3
    ok &= good
    log(f"   chunks + decode vs one pass: conv {e1:.2e}, scan {e2:.2e}, state {e3:.2e} {'ok' if good else 'FAIL'}")
    summary.append(f"- parity on {DEV} (d_inner {D}, mixed rows, fp32 and bf16, with and without state snapshots; "
                   f"chunks + decode vs one pass): "
                   f"**{'pass' if ok else 'FAIL'}**")


# ---- 2./3. the model ----------------------------------------------------------------------------
def build_model() -> JambaStage:
    cfg = JambaConfig(**(MODEL if DEV == "cuda" else SMOKE_MODEL))
    torch.manual_seed(0)
    with torch.device(DEV):
        stage = JambaStage(cfg)
    with torch.no_grad():
        for n, p in stage.named_parameters():
            if n.endswith("A_log"):
                p.copy_(torch.log(torch.arange(1, p.shape[1] + 1, dtype=torch.float32, device=DEV)).repeat(p.shape[0], 1))
            elif n.endswith(".D") or "norm" in n:
                p.fill_(1.0)
            elif n.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return stage.to(torch.bfloat16).eval()


def prefill_seconds(stage, L: int, reps: int) -> float:
    ids = torch.randint(3, stage.config.vocab_size, (L,), device=DEV)

    def run():
        cache = stage.make_cache(1, L)
        stage(ids, cache, [cache.allocate()], [L])

    run()  # compile / warm
    return timed(run, reps)


@section("prefill: one sequence, bf16")
def check_prefill(stage, quick: bool):
    reps = 1 if quick else 2
    short, long = SIZES[DEV]["prefill"]
    rows = {}
    for L in (short, long):
        s = prefill_seconds(stage, L, reps)
        rows[L] = L / s
        log(f"   L={L}: {s:.3f}s, {L / s:,.0f} tok/s")
    os.environ["JAMBA_KERNELS"] = "torch"
    try:
        s_ref = prefill_seconds(stage, short, 1)
    finally:
        os.environ["JAMBA_KERNELS"] = "triton"
    ref = short / s_ref
    log(f"   reference loop (JAMBA_KERNELS=torch) L={short}: {s_ref:.2f}s, {ref:,.0f} tok/s")
    ratio = rows[long] / ref
    summary.append(f"- prefill tok/s: L={short} **{rows[short]:,.0f}**, L={long} **{rows[long]:,.0f}**; reference "
                   f"loop {ref:,.0f} tok/s (at L={short}); L={long} vs the loop **{ratio:.0f}x** (target >= 50x: "
                   f"{'met' if ratio >= 50 else 'NOT met'})")


def step_weight_bytes(stage, hits: dict[int, set]) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table and the experts,
    plus the experts the step's tokens were routed to."""
    total = 0
    for n, p in stage.named_parameters():
        if "embed_tokens" in n or ".experts." in n:
            continue
        total += p.numel() * p.element_size()
    for m in stage.modules():
        if isinstance(m, SparseMoE):
            per_expert = (m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel()) * m.experts.down_proj.element_size()
            total += per_expert * len(hits.get(id(m), ()))
    return total


@section("decode: batched steps after 128-token prompts, bf16")
def check_decode(stage, peak_gbs: float, copy_gbs: float, quick: bool):
    steps = 2 if DEV == "cpu" else 16 if quick else 32
    V, P = stage.config.vocab_size, SIZES[DEV]["prompt"]
    for B in SIZES[DEV]["batches"]:
        cache = stage.make_cache(B, P + 2 * steps + 8)
        slots = [cache.allocate() for _ in range(B)]
        stage(torch.randint(3, V, (B * P,), device=DEV), cache, slots, [P] * B)
        ids = torch.randint(3, V, (B,), device=DEV)
        # Experts hit by one step, counted by hooks on the MoE layers (the router, recomputed).
        hits: dict[int, set] = {}

        def hook(m, args):
            probs = F.softmax(F.linear(args[0], m.router.weight), dim=-1, dtype=torch.float32)
            hits[id(m)] = set(torch.topk(probs, m.top_k, dim=-1).indices.flatten().tolist())

        handles = [m.register_forward_pre_hook(hook) for m in stage.modules() if isinstance(m, SparseMoE)]
        stage(ids, cache, slots, [1] * B)
        for h in handles:
            h.remove()
        nbytes = step_weight_bytes(stage, hits)
        stage(ids, cache, slots, [1] * B)  # warm
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            stage(ids, cache, slots, [1] * B)
        sync()
        step = (time.perf_counter() - t0) / steps
        gbs = nbytes / step / 1e9
        log(f"   batch {B}: {step * 1e3:.2f} ms/step, {B / step:,.0f} tok/s, {nbytes / 1e9:.2f} GB of weights/step, "
            f"{gbs:,.0f} GB/s = {100 * gbs / peak_gbs:.0f}% of peak {peak_gbs:,.0f} GB/s "
            f"({100 * gbs / copy_gbs:.0f}% of measured copy)")
        line = (f"- decode batch {B}: **{B / step:,.0f} tok/s** ({step * 1e3:.2f} ms/step); weights read "
                f"{gbs:,.0f} GB/s = **{100 * gbs / peak_gbs:.0f}%** of peak HBM")
        if B == 1:
            line += f" (target >= 60%: {'met' if gbs >= 0.6 * peak_gbs else 'NOT met'})"
        summary.append(line)
        del cache


def measured_copy_gbs() -> float:
    n = 2 << 30 if DEV == "cuda" else 64 << 20
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    s = timed(lambda: b.copy_(a), 5)  # (a and b are freed on return)
    return 2 * n / s / 1e9  # read + write


# ---- 4. pipeline ------------------------------------------------------------------------------
@section("2-stage Ray pipeline sharing the GPU vs one process")
def check_pipeline(stage, quick: bool):
    import ray

    from cluster.runtime.config import PipelineConfig
    from cluster.runtime.pipeline import SyncPipeline
    from stages.loading import save_checkpoint

    n_req, new = (8, 16) if quick or DEV == "cpu" else (32, 32)
    g = torch.Generator().manual_seed(1)
    P = SIZES[DEV]["prompt"]
    prompts = [torch.randint(3, stage.config.vocab_size, (P,), generator=g).tolist() for _ in range(n_req)]
    params = lambda: [SamplingParams(max_new_tokens=new, ignore_eos=True) for _ in prompts]  # noqa: E731

    runner = LocalRunner(stage, num_slots=n_req, max_batch_tokens=2048)
    runner.generate(prompts[:2], params()[:2])  # warm
    t0 = time.perf_counter()
    local = runner.generate(prompts, params())
    t_local = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        state = {n: p.detach().cpu() for n, p in stage.named_parameters()}
        save_checkpoint(state, stage.config, tmp)
        del state
        gpus = 1 if DEV == "cuda" else 0
        ray.init(address="local", num_gpus=gpus, num_cpus=4, include_dashboard=False, log_to_driver=False)
        pipe = None
        try:
            t0 = time.perf_counter()
            pipe = SyncPipeline(PipelineConfig(tmp, num_stages=2, gpus_per_stage=0.5 * gpus, dtype="bfloat16",
                                               num_slots=n_req, max_batch_tokens=2048, max_seq_len=512))
            log(f"   pipeline up in {time.perf_counter() - t0:.0f}s")
            pipe.generate(prompts[:2], params()[:2])  # warm
            t0 = time.perf_counter()
            piped = pipe.generate(prompts, params())
            t_pipe = time.perf_counter() - t0
        finally:
            if pipe is not None:
                pipe.close()
            ray.shutdown()
    same = sum(a.output_ids == b.output_ids for a, b in zip(local, piped))
    tok = n_req * new
    log(f"   one process: {tok / t_local:,.0f} tok/s; 2-stage pipeline: {tok / t_pipe:,.0f} tok/s; "
        f"{same}/{n_req} identical greedy outputs")
    summary.append(f"- {n_req} requests x {new} tokens: one process **{tok / t_local:,.0f} tok/s**, 2-stage pipeline on "
                   f"the same GPU **{tok / t_pipe:,.0f} tok/s**; greedy outputs identical for {same}/{n_req}")


@section("the data plane between GPU stages: NCCL and inline")
def check_dataplane(stage, quick: bool):
    import asyncio

    import ray

    from bench.synthetic import write_config_only
    from cluster.runtime.config import PipelineConfig
    from cluster.runtime.pipeline import Pipeline, SyncPipeline
    from stages.loading import save_checkpoint
    from stages.microbatch import Microbatch, Row

    gpus = torch.cuda.device_count() if DEV == "cuda" else 0
    if DEV == "cuda" and gpus < 2:
        log("   skipped: the data plane between GPU stages needs 2 GPUs")
        summary.append("- data plane between GPU stages: not run (one GPU; NCCL needs a device per stage)")
        return
    nccl = "nccl" if DEV == "cuda" else "gloo"
    chain, reps, tokens = min(4, max(gpus, 2)), 50 if quick else 200, 32
    H = stage.config.hidden_size

    async def hop_ms(folder, transport):
        times = {}
        for n in (1, chain):  # one after the other: the GPUs may not hold both chains
            pipe = await Pipeline.start(PipelineConfig(folder, num_stages=n, gpus_per_stage=1 if gpus else 0,
                                                       cpus_per_stage=0.1, transport=transport, dtype="bfloat16",
                                                       worker_cls="bench.synthetic:GpuLikeStage",
                                                       worker_kwargs={"fixed_ms": 0.0, "per_token_ms": 0.0}))
            try:
                header = Microbatch([Row(k, 1) for k in range(tokens)])
                ids = array("q", [5] * tokens)  # token ids as the scheduler sends them
                for _ in range(20):
                    await pipe.dataplane.send(header, ids)
                t0 = time.perf_counter()
                for _ in range(reps):
                    await pipe.dataplane.send(header, ids)
                times[n] = (time.perf_counter() - t0) / reps
            finally:
                await pipe.close()
        return (times[chain] - times[1]) / (chain - 1) * 1000

    ray.init(address="local", num_gpus=gpus, num_cpus=8, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_config_only(stage.config, Path(tmp) / "config-only")
            hops = {t: asyncio.run(hop_ms(folder, t)) for t in (nccl, "inline")}
            log(f"   decode microbatch ({tokens} x {H} bf16) per hop: " + ", ".join(f"{t} {v:.3f} ms" for t, v in hops.items()))
            state = {n: p.detach().cpu() for n, p in stage.named_parameters()}
            save_checkpoint(state, stage.config, Path(tmp) / "model")
            del state
            g = torch.Generator().manual_seed(2)
            prompts = [torch.randint(3, stage.config.vocab_size, (32,), generator=g).tolist() for _ in range(8)]
            params = [SamplingParams(max_new_tokens=8, ignore_eos=True) for _ in prompts]
            local = LocalRunner(stage, num_slots=8).generate(prompts, params)
            pipe = SyncPipeline(PipelineConfig(str(Path(tmp) / "model"), num_stages=2, gpus_per_stage=1 if gpus else 0,
                                               cpus_per_stage=0.5, transport=nccl, dtype="bfloat16", num_slots=8,
                                               max_seq_len=512))
            try:
                piped = pipe.generate(prompts, params)
            finally:
                pipe.close()
    finally:
        ray.shutdown()
    same = sum(a.output_ids == b.output_ids for a, b in zip(local, piped))
    log(f"   2-stage pipeline over {nccl}: {same}/8 greedy outputs identical to one process")
    summary.append(f"- data plane, decode microbatch ({tokens} x {H} bf16) per hop: " +
                   ", ".join(f"{t} **{v:.3f} ms**" for t, v in hops.items()) +
                   f"; 2-stage pipeline over {nccl}: greedy outputs identical for {same}/8")


# ---- 6. 8-bit weights ---------------------------------------------------------------------------
@section("8-bit weights: Triton int8 matmul and an int8-experts stage")
def check_int8(stage, quick: bool):
    import copy

    from stages.linear import int8_linear, int8_linear_reference
    from stages.quant import quantize_int8, quantize_stage

    g = torch.Generator().manual_seed(0)
    shapes = [(4096, 4096), (14336, 4096)] if DEV == "cuda" else [(96, 64)]
    worst = 0.0
    for N, K in shapes:
        q, scale = quantize_int8(torch.randn(N, K, generator=g).to(DEV))
        w_bf16 = (q.float() * scale[:, None]).to(torch.bfloat16)
        for T in (1, 16, 512):
            x = torch.randn(T, K, generator=g).to(DEV, torch.bfloat16)
            got, want = int8_linear(x, q, scale).float(), int8_linear_reference(x, q, scale).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            worst = max(worst, err)
            t_q = timed(lambda: int8_linear(x, q, scale), 3 if quick else 10)
            t_b = timed(lambda: F.linear(x, w_bf16), 3 if quick else 10)
            log(f"   {N}x{K}, T={T}: int8 {t_q * 1e6:.0f} us, bf16 {t_b * 1e6:.0f} us ({t_b / t_q:.2f}x); "
                f"max rel error vs reference {err:.1e}")
            summary.append(f"- int8 matmul {N}x{K}, T={T}: **{t_b / t_q:.2f}x** the speed of bf16 F.linear "
                           f"({t_q * 1e6:.0f} vs {t_b * 1e6:.0f} us)")
    summary.append(f"- int8 Triton kernel vs dequantize-then-matmul on {DEV}: max relative error **{worst:.1e}** "
                   f"({'ok' if worst < 2e-2 else 'TOO LARGE'}: bf16 output rounding is ~4e-3)")
    qstage = quantize_stage(copy.deepcopy(stage), "int8-experts")
    steps, B = (2 if DEV == "cpu" else 8), SIZES[DEV]["batches"][1]
    V, P = stage.config.vocab_size, SIZES[DEV]["prompt"]
    prompts = torch.randint(3, V, (B * P,), generator=g).to(DEV)
    out = {}
    for name, st in (("bf16", stage), ("int8-experts", qstage)):
        cache = st.make_cache(B, P + 2 * steps + 8)
        slots = [cache.allocate() for _ in range(B)]
        tok = st(prompts, cache, slots, [P] * B).argmax(-1)
        toks = [tok]
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = st(tok, cache, slots, [1] * B).argmax(-1)
            toks.append(tok)
        sync()
        out[name] = ((time.perf_counter() - t0) / steps, torch.stack(toks).cpu())
        log(f"   decode batch {B}, {name}: {out[name][0] * 1e3:.2f} ms/step")
        del cache
    same = (out["bf16"][1] == out["int8-experts"][1]).float().mean().item()
    summary.append(f"- decode batch {B} with int8 experts: **{out['bf16'][0] / out['int8-experts'][0]:.2f}x** bf16's "
                   f"tokens/s; greedy tokens equal to bf16's: {same * 100:.0f}% (random weights: near-ties flip)")
    del qstage


# ---- 7. the decode step without host overhead -----------------------------------------------------
@section("decode step: compiled + CUDA graphs vs eager (issue 22)")
def check_decode_graphs(stage, quick: bool):
    import copy

    from stages.decode import DecodeRunner

    steps = 2 if DEV == "cpu" else 8 if quick else 16
    V, P = stage.config.vocab_size, 16
    exact = copy.deepcopy(stage).float()  # parity in fp32, timing in the model's bf16
    for model, label in ((exact, "fp32"), (stage, "bf16")):
        for B, size in ((1, 1), (3, 4), (32, 32)):
            eager_cache, graph_cache = (model.make_cache(size, P + steps + 4) for _ in range(2))
            slots = [eager_cache.allocate() for _ in range(B)]
            assert [graph_cache.allocate() for _ in range(B)] == slots
            prompt = torch.randint(3, V, (B * P,), device=DEV, generator=torch.Generator(DEV).manual_seed(B))
            tok = model(prompt, eager_cache, slots, [P] * B).argmax(-1)
            model(prompt, graph_cache, slots, [P] * B)
            runner = DecodeRunner(model, graph_cache, sizes=[size])
            t0 = time.perf_counter()
            runner.warm_up()
            t_compile = time.perf_counter() - t0
            worst, same = 0.0, True
            t_eager = t_graph = 0.0
            for _ in range(steps):
                sync()
                t0 = time.perf_counter()
                want = model(tok, eager_cache, slots, [1] * B)
                sync()
                t1 = time.perf_counter()
                got = runner(tok, slots)
                sync()
                t_eager += t1 - t0
                t_graph += time.perf_counter() - t1
                worst = max(worst, float((torch.log_softmax(want.float(), -1) - torch.log_softmax(got.float(), -1)).abs().max()))
                same &= bool(torch.equal(want.argmax(-1), got.argmax(-1)))
                tok = want.argmax(-1)
            line = (f"- decode step {label}, batch {B} (graph of {size}): eager {t_eager / steps * 1e3:.2f} ms, "
                    f"{'CUDA graph' if runner.use_cuda_graphs else 'compiled'} {t_graph / steps * 1e3:.2f} ms: "
                    f"**{t_eager / t_graph:.1f}x**; compiled and captured in {t_compile:.0f}s")
            if label == "fp32":
                line += f"; tokens {'identical' if same else 'DIFFER'}, max |dlogprob| {worst:.1e} (target <= 1e-4: {'met' if same and worst <= 1e-4 else 'NOT met'})"
            log("  " + line[2:])
            summary.append(line)
    del exact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and steps")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--peak-gbs", type=float, help="the card's peak HBM bandwidth in GB/s (default: by name)")
    ap.add_argument("--smoke", action="store_true", help="check the script on CPU (Triton interpreted, tiny sizes)")
    args = ap.parse_args()
    global DEV
    use_openmp_env()
    if args.smoke:
        DEV = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are imported
    elif not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU (or --smoke)")
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU smoke run"
    peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
    t_start = time.perf_counter()
    copy_gbs = measured_copy_gbs()
    log(f"{name}: device-to-device copy {copy_gbs:,.0f} GB/s; peak {peak or '?'} GB/s")
    peak = peak or copy_gbs

    check_parity()
    os.environ["JAMBA_KERNELS"] = "triton"
    log("== building the random bf16 model")
    stage = build_model()
    n_params = sum(p.numel() for p in stage.parameters())
    from stages.warmup import warm_up

    log(f"   {n_params / 1e9:.2f}B parameters; kernels warmed up in {warm_up(stage):.1f}s")
    check_prefill(stage, args.quick)
    check_decode(stage, peak, copy_gbs, args.quick)
    check_int8(stage, args.quick)
    check_decode_graphs(stage, args.quick)
    if not args.skip_pipeline:
        check_pipeline(stage, args.quick)
        check_dataplane(stage, args.quick)

    print(f"\n### GPU check: {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(f"Random Jamba, {n_params / 1e9:.2f}B parameters, bf16 (bench/gpu_check.py). Peak HBM {peak:,.0f} GB/s, "
          f"measured device-to-device copy {copy_gbs:,.0f} GB/s. Whole run {time.perf_counter() - t_start:.0f}s.\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()

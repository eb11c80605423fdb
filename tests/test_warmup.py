"""stages/warmup.py: kernels compiled before serving, into a cache a fresh process reuses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.loading import load_stage
from stages.warmup import warm_up

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_lm(tmp_path_factory):
    from stages.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo") / "lm")


def _cache_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_fresh_processes_share_the_kernel_cache(demo_lm, tmp_path):
    """`jamba warmup` (what the image build runs) compiles the numba kernels into
    $JAMBA_KERNEL_CACHE; a second fresh process loads them from there and compiles nothing."""
    cache = tmp_path / "kernels"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "TRITON_CACHE_DIR", "JAMBA_KERNELS")}
    env.update(JAMBA_KERNEL_CACHE=str(cache), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "cluster.cli", "warmup", "--model", str(demo_lm)]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
    first = _cache_files(cache)
    indexes = [f for f in first if f.endswith(".nbi")]
    assert any("_conv_varlen_kernel" in f for f in indexes) and any("_scan_varlen_kernel" in f for f in indexes), first
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert _cache_files(cache) == first  # nothing recompiled, nothing rewritten


def test_warm_up_runs_every_stage_shape(monkeypatch, demo_lm):
    # First stage (token ids in), a middle stage (activations in, activations out), last stage (head);
    # bf16 through the Triton kernels (interpreted here), fp32 through numba.
    monkeypatch.setenv("JAMBA_KERNELS", "triton")
    stage, _ = load_stage(demo_lm, 0, 8, dtype="bfloat16")
    assert warm_up(stage) > 0
    monkeypatch.setenv("JAMBA_KERNELS", "numba")
    for start, end in ((0, 3), (3, 6), (6, 8)):
        assert warm_up(load_stage(demo_lm, start, end)[0]) > 0


def test_warm_up_can_be_skipped(monkeypatch, demo_lm):
    stage, _ = load_stage(demo_lm)

    def boom(*a, **k):
        raise AssertionError("forward ran")

    monkeypatch.setattr(stage, "forward", boom)
    monkeypatch.setenv("JAMBA_KERNEL_WARMUP", "0")
    assert warm_up(stage) == 0.0
    monkeypatch.delenv("JAMBA_KERNEL_WARMUP")
    with pytest.raises(AssertionError, match="forward ran"):
        warm_up(stage)


def test_worker_warms_up_before_it_is_ready(demo_lm):
    from stages.worker import StageWorker

    w = StageWorker.load(str(demo_lm), 0, 8, num_slots=2, max_seq_len=32)
    assert w.info()["warmup_seconds"] > 0
    assert w.cache.used_slots == 0 and torch.all(torch.stack(list(w.cache.ssm.values())) == 0)  # its cache untouched

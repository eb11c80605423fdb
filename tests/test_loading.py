"""Checkpoint formats, partial loading and load errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.loading import CheckpointError, load_stage, save_checkpoint
from tests.hf_reference import make_hf_model, save_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("default-periods"), tmp_path_factory.mktemp("hf"), shard="8KB")


def _logits(stage, ids=(5, 8, 13, 21, 34)):
    cache = stage.make_cache(1, 16)
    return stage(torch.tensor(ids), cache, [cache.allocate()], [len(ids)], output_index=torch.arange(len(ids)))


def test_hub_per_expert_and_fused_names_load_alike(hf_dir, tmp_path):
    ref, _ = load_stage(hf_dir)
    names = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".experts.0.gate_proj.weight" in n for n in names)  # transformers writes hub names
    fused_dir = tmp_path / "fused"
    save_checkpoint(ref.state_dict(), ref.config, fused_dir, max_shard_bytes=10_000, fused_experts=True)
    fused_names = json.loads((fused_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(n.endswith("experts.gate_up_proj") for n in fused_names)
    assert not any(".experts.0." in n for n in fused_names)
    fused, _ = load_stage(fused_dir)
    torch.testing.assert_close(_logits(fused), _logits(ref), atol=0, rtol=0)


def test_stage_reads_only_its_own_tensors(hf_dir):
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    stage, stats = load_stage(hf_dir, 3, 6)
    own = [n for n in index if any(n.startswith(f"model.layers.{i}.") for i in range(3, 6))]
    assert sorted(stats.tensors_read) == sorted(own)
    assert stats.files_opened == {index[n] for n in own}
    assert len(stats.files_opened) < len(set(index.values()))  # other shards stay closed
    assert stats.bytes_loaded == sum(p.numel() * p.element_size() for p in stage.parameters())
    first, s1 = load_stage(hf_dir, 0, 2)
    assert "model.embed_tokens.weight" in s1.tensors_read and "lm_head.weight" not in s1.tensors_read
    last, s2 = load_stage(hf_dir, 6, 8)
    assert "lm_head.weight" in s2.tensors_read and "model.embed_tokens.weight" not in s2.tensors_read


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(hf_dir, tmp_path, dtype):
    """A half-precision checkpoint runs in that dtype, about as close to fp32 as transformers gets."""
    ref, _ = load_stage(hf_dir)
    half_dir = tmp_path / str(dtype)
    save_checkpoint({k: v.to(dtype) for k, v in ref.state_dict().items()}, ref.config, half_dir)
    half, _ = load_stage(half_dir)
    assert next(half.parameters()).dtype == dtype
    out = _logits(half)
    assert out.dtype == dtype
    hf = make_hf_model("default-periods").to(dtype)
    with torch.no_grad():
        hf_out = hf(torch.tensor([[5, 8, 13, 21, 34]])).logits[0].float()
    fp32 = _logits(ref)
    hf_err = (hf_out - fp32).abs().max().item()
    our_err = (out.float() - fp32).abs().max().item()
    assert our_err <= 3 * hf_err + 0.02, (our_err, hf_err)
    upcast, _ = load_stage(half_dir, dtype="float32")
    assert next(upcast.parameters()).dtype == torch.float32


def test_pickled_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jamba"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled weights.*pytorch_model.bin.*only safetensors"):
        load_stage(tmp_path)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    ref, _ = load_stage(hf_dir)
    state = ref.state_dict()
    del state["model.layers.2.mamba.A_log"]
    save_checkpoint(state, ref.config, tmp_path)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.mamba\.A_log"):
        load_stage(tmp_path)
    load_stage(tmp_path, 3, 8)  # a stage that does not own layer 2 does not care


def test_misshaped_tensor_is_named(hf_dir, tmp_path):
    ref, _ = load_stage(hf_dir)
    save_checkpoint(ref.state_dict(), ref.config, tmp_path, fused_experts=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.4.self_attn.q_proj.weight"
    shard = tmp_path / index[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight .* shape \(32, 31\), expected \(32, 32\)"):
        load_stage(tmp_path)


def test_no_checkpoint_and_bad_range(tmp_path, hf_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_stage(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_stage(tmp_path)
    with pytest.raises(ValueError, match=r"bad layer range \[5, 3\)"):
        load_stage(hf_dir, 5, 3)

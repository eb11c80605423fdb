"""The trained demo checkpoints (models/), `jamba eval`, and the training scan kernel.

The held-out texts (models/heldout.jsonl) were never trained on: perplexity and accuracy here are
real held-out figures of the committed weights, checked against transformers where it applies.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from cluster.cli.main import main
from stages.demo import trained_model_dir, widen_to_fp32

MODELS = Path(__file__).resolve().parent.parent / "models"
sys.path.insert(0, str(MODELS))  # models/ holds scripts, not a package

N_TEXTS = 40  # enough for a stable perplexity, quick on 2 cores


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    rows = [json.loads(line) for line in (MODELS / "heldout.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("eval") / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:N_TEXTS]))
    return rows, path


@pytest.fixture(scope="module")
def lm_fp32(tmp_path_factory):
    dest = tmp_path_factory.mktemp("fp32") / "lm"
    widen_to_fp32(trained_model_dir("lm"), dest)
    return dest


def test_fp32_copy_keeps_the_layout_and_the_values(lm_fp32):
    from safetensors.torch import load_file

    src = trained_model_dir("lm")
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((lm_fp32 / "config.json").read_text())["dtype"] == "float32"
    src_index = json.loads((src / "model.safetensors.index.json").read_text())
    dst_index = json.loads((lm_fp32 / "model.safetensors.index.json").read_text())
    assert src_index["weight_map"] == dst_index["weight_map"]
    shard = sorted(set(src_index["weight_map"].values()))[0]
    a, b = load_file(src / shard), load_file(lm_fp32 / shard)
    for name in a:
        assert b[name].dtype == torch.float32 and torch.equal(a[name].float(), b[name]), name
    assert (lm_fp32 / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_eval_matches_transformers_loss(lm_fp32, heldout, tmp_path, capsys):
    from transformers import AutoTokenizer, JambaForCausalLM

    _, path = heldout
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(lm_fp32), "--input", str(path), "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    assert "eval: [" in capsys.readouterr().err  # the progress bar
    assert got["texts"] == N_TEXTS and got["failed"] == 0

    model = JambaForCausalLM.from_pretrained(lm_fp32, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(lm_fp32)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for line in path.read_text().splitlines():
            ids = tok(json.loads(line)["text"], return_tensors="pt").input_ids
            loss = model(input_ids=ids, labels=ids).loss  # mean over the len-1 predicted tokens
            nll += float(loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert got["tokens"] == tokens
    assert got["nll_per_token"] == pytest.approx(nll / tokens, rel=1e-4)
    # The weights are trained: far below the vocabulary's uniform perplexity (4096).
    assert got["perplexity"] < 200


def test_eval_rejects_a_classifier_and_reports_bad_rows(heldout, lm_fp32, tmp_path, capsys):
    _, path = heldout
    assert main(["eval", "--model", str(trained_model_dir("classification")), "--input", str(path)]) == 2
    assert "eval needs a JambaForCausalLM checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "A fool and his money are soon parted."}\n{"txt": "typo"}\n')
    out = tmp_path / "out.json"
    assert main(["eval", "-q", "--model", str(lm_fp32), "--input", str(bad), "--output", str(out)]) == 1
    assert f"{bad}:2: a row needs exactly one of" in capsys.readouterr().err
    assert json.loads(out.read_text())["texts"] == 1


def test_classifier_beats_the_majority_baseline(heldout):
    from corpus import CLASSIFIER_LABELS

    from cluster.runtime.local import LocalRunner
    from stages.loading import load_stage
    from stages.tokenizer import Tokenizer

    rows, _ = heldout
    rows = [r for r in rows if r["label"] in CLASSIFIER_LABELS]
    cls_dir = trained_model_dir("classification")
    stage, _ = load_stage(cls_dir, dtype="float32")
    assert [stage.config.id2label[i] for i in range(len(CLASSIFIER_LABELS))] == list(CLASSIFIER_LABELS)
    tok = Tokenizer.from_dir(cls_dir)
    runner = LocalRunner(stage, tok)
    logits = runner.classify([tok.encode(r["text"])[:128] for r in rows])  # cut as in training
    right = sum(stage.config.id2label[max(range(len(lg)), key=lg.__getitem__)] == r["label"] for lg, r in zip(logits, rows))
    majority = max(sum(r["label"] == label for r in rows) for label in CLASSIFIER_LABELS)
    assert right / len(rows) > majority / len(rows) + 0.1, (right, majority, len(rows))


def test_training_scan_matches_its_reference_values_and_gradients():
    from train_scan import reference_scan, scan_core

    torch.manual_seed(0)
    Bt, D, L, N = 3, 5, 17, 4
    u = torch.randn(Bt, D, L, requires_grad=True)
    delta = (torch.rand(Bt, D, L) * 0.5).requires_grad_()
    A = (-torch.rand(D, N) * 3).requires_grad_()
    B = torch.randn(Bt, L, N, requires_grad=True)
    C = torch.randn(Bt, L, N, requires_grad=True)
    gy = torch.randn(Bt, D, L)
    y_fast = scan_core(u, delta, A, B, C)
    y_ref = reference_scan(u, delta, A, B, C)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    for name, g_fast, g_ref in zip("u delta A B C".split(), torch.autograd.grad(y_fast, (u, delta, A, B, C), gy),
                                   torch.autograd.grad(y_ref, (u, delta, A, B, C), gy)):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5, msg=name)


def test_training_scan_gives_transformers_gradients():
    """Swapped into JambaForCausalLM as the trainer does, the loss and every gradient are unchanged."""
    from train_scan import selective_scan
    from transformers import JambaConfig, JambaForCausalLM
    from transformers.models.jamba import modeling_jamba

    from tests.hf_reference import CONFIGS

    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig(**CONFIGS["default-periods"]))
    ids = torch.randint(3, 96, (2, 24))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads()
    original = modeling_jamba.mamba_selective_scan
    modeling_jamba.mamba_selective_scan = selective_scan
    try:
        loss, grads = loss_and_grads()
    finally:
        modeling_jamba.mamba_selective_scan = original
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert not math.isnan(loss)


def test_the_served_copy_follows_every_file_of_the_checkpoint(tmp_path, monkeypatch):
    """ensure_demo_model's fp32 copy is made again when any file of the shipped checkpoint changes
    (its chat template, say), not only its weights' index."""
    import shutil

    from stages.demo import ensure_demo_model, trained_model_dir

    shipped = tmp_path / "models"
    shutil.copytree(trained_model_dir("lm"), shipped / trained_model_dir("lm").name)
    monkeypatch.setenv("JAMBA_DEMO_MODELS", str(shipped))
    monkeypatch.setenv("JAMBA_HOME", str(tmp_path / "home"))
    copy = ensure_demo_model("lm")
    config = shipped / trained_model_dir("lm").name / "tokenizer_config.json"
    assert (copy / "tokenizer_config.json").read_text() == config.read_text()
    config.write_text(config.read_text().replace("<|im_start|>", "<|im_start|> "))
    assert (ensure_demo_model("lm") / "tokenizer_config.json").read_text() == config.read_text()

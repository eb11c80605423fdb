"""`jamba generate|score|classify` on checkpoints written by transformers' save_pretrained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from cluster.cli.main import main
from stages.demo import build_demo_tokenizer
from stages.tokenizer import Tokenizer
from tests.hf_reference import make_hf_model, save_hf_model

ROWS = [
    {"prompt": "The weather today is", "max_new_tokens": 6},
    {"prompt": "Cooking rice takes", "max_new_tokens": 9, "id": "b"},
    {"input_ids": [1, 40, 41, 42, 43, 44, 45], "max_new_tokens": 4},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], "max_new_tokens": 5},
]


def _with_tokenizer(model, path):
    save_hf_model(model, path)
    build_demo_tokenizer(path, vocab_size=512)
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    import tests.hf_reference as ref

    ref.CONFIGS["cli-lm"] = dict(ref.CONFIGS["default-periods"], vocab_size=512)
    model = make_hf_model("cli-lm")
    return model, _with_tokenizer(model, tmp_path_factory.mktemp("lm"))


def run_cli(tmp_path, command, model_dir, rows, extra=()):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    rc = main([command, "--model", str(model_dir), "--input", str(inp), "--output", str(out), *extra])
    return rc, [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_matches_transformers_greedy(lm_dir, tmp_path):
    hf, path = lm_dir
    hf.generation_config.eos_token_id = None  # compare full lengths; eos handling is tested separately
    rc, out = run_cli(tmp_path, "generate", path, ROWS)
    assert rc == 0
    tok = Tokenizer.from_dir(path)
    for row, res in zip(ROWS, out):
        ids = (tok.encode(row.get("prompt") or row.get("text")) if ("prompt" in row or "text" in row)
               else row.get("input_ids") or tok.encode_chat(row["messages"]))
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=row["max_new_tokens"], do_sample=False)[0, len(ids):].tolist()
        n = len(res["output_ids"])
        assert res["output_ids"] == ref[:n]
        assert res["finish_reason"] in ("stop", "length")
        if res["finish_reason"] == "length":
            assert n == row["max_new_tokens"]
        assert res["text"] == tok.decode(res["output_ids"])
        assert {k: res[k] for k in row} == row  # the input row is kept


def test_score_matches_transformers(lm_dir, tmp_path):
    hf, path = lm_dir
    rows = [{"prompt": "A short line of text to score."}, {"input_ids": [1, 7, 300, 12, 12, 12]}]
    rc, out = run_cli(tmp_path, "score", path, rows, ["--max-batch-tokens", "4"])
    assert rc == 0
    tok = Tokenizer.from_dir(path)
    for row, res in zip(rows, out):
        ids = row.get("input_ids") or tok.encode(row["prompt"])
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        want = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert res["token_logprobs"][0] is None and len(res["token_logprobs"]) == len(ids)
        assert res["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        assert res["sum_logprob"] == pytest.approx(sum(want), abs=1e-3)


def test_classify_matches_transformers(tmp_path):
    import tests.hf_reference as ref

    ref.CONFIGS["cli-cls"] = dict(ref.CONFIGS["mqa-top1"], vocab_size=512)
    hf = make_hf_model("cli-cls", classification=True, num_labels=3)
    hf.config.id2label = {0: "neg", 1: "mid", 2: "pos"}
    hf.config.label2id = {v: k for k, v in hf.config.id2label.items()}
    path = _with_tokenizer(hf, tmp_path / "cls")
    rows = [{"text": "I loved this film."}, {"prompt": "Terrible service."}, {"input_ids": [1, 5, 6, 7]}]
    rc, out = run_cli(tmp_path, "classify", path, rows)
    assert rc == 0
    tok = Tokenizer.from_dir(path)
    for row, res in zip(rows, out):
        ids = row.get("input_ids") or tok.encode(row.get("text") or row.get("prompt"))
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
        assert res["logits"] == pytest.approx(logits.tolist(), abs=1e-4)
        assert sum(res["probs"]) == pytest.approx(1.0)
        assert res["label"] == hf.config.id2label[int(logits.argmax())]


BAD_ROWS = [
    ("not json", "malformed JSON"),
    ('{"prompt": ""}', "prompt is empty"),
    ('{"input_ids": [1, 512]}', r"out of range \[0, 512\)"),
    ('{"input_ids": [1, -3]}', "out of range"),
    ('{"prompt": "hi", "temperature": -0.5}', "temperature must be"),
    ('{"prompt": "hi", "top_p": 0}', "top_p must be in"),
    ('{"prompt": "hi", "top_k": -1}', "top_k must be"),
    ('{"prompt": "hi", "max_new_tokens": 0}', "max_new_tokens must be a positive integer"),
    ('{"prompt": "hi", "max_new_tokens": 100000}', "more than the context of 512"),
    ('{"foo": 1}', "exactly one of prompt, text, input_ids, messages"),
    ('{"prompt": "a", "input_ids": [1]}', "exactly one of"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "wizard"),
    ('{"prompt": "hi", "stop": [1]}', "stop must be a list of non-empty strings"),
    ('[1, 2]', "must be a JSON object"),
    ('{"text": "hi"}', "text is the output field"),
]


def test_bad_rows_are_reported_and_the_rest_is_kept(lm_dir, tmp_path, capsys):
    _, path = lm_dir
    good = {"prompt": "fine", "max_new_tokens": 2}
    rows = [good] + [line for line, _ in BAD_ROWS] + [good]
    rc, out = run_cli(tmp_path, "generate", path, rows)
    assert rc == 1
    assert len(out) == len(rows)
    assert out[0]["finish_reason"] and out[-1]["output_ids"] == out[0]["output_ids"]
    err = capsys.readouterr().err
    for k, (_, pattern) in enumerate(BAD_ROWS):
        lineno = k + 2
        assert out[k + 1]["line"] == lineno


        assert re.search(pattern, out[k + 1]["error"]), (pattern, out[k + 1])
        assert f"in.jsonl:{lineno}: " in err


def test_entry_point_errors_and_demo_model(tmp_path):
    """The installed `jamba` command: missing input fails in one line; no --model uses the demo model."""
    env = dict(os.environ, JAMBA_HOME=str(tmp_path / "home"))
    jamba = [sys.executable, "-m", "cluster.cli"]
    r = subprocess.run([*jamba, "score", "--input", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().endswith(f"input file {tmp_path / 'missing.jsonl'} does not exist")
    (tmp_path / "in.jsonl").write_text('{"prompt": "hello", "max_new_tokens": 3}\n')
    r = subprocess.run([*jamba, "generate", "--input", str(tmp_path / "in.jsonl")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "no --model given: using the demo model at" in r.stderr
    assert (tmp_path / "home" / "demo-lm" / "config.json").is_file()  # the fp32 copy of models/jamba-demo-lm
    row = json.loads(r.stdout)
    assert len(row["output_ids"]) == 3 and row["finish_reason"] == "length"
    r2 = subprocess.run([*jamba, "generate", "--input", str(tmp_path / "in.jsonl")], capture_output=True, text=True, env=env)
    assert json.loads(r2.stdout) == row  # the same weights, greedy


def test_arguments_are_checked_before_ray_starts(tmp_path):
    """An impossible stage split fails at once, before any cluster starts; `jamba batch`
    defaults to the demo model like every other command."""
    env = dict(os.environ, JAMBA_HOME=str(tmp_path / "home"))
    jamba = [sys.executable, "-m", "cluster.cli"]
    (tmp_path / "in.jsonl").write_text('{"prompt": "hello"}\n')
    for extra, message in ((["--stages", "9"], "--stages 9: "), (["--stages", "2", "--layer-split", "4,5"],
                                                                 "add up to 9, the model has 8 layers")):
        r = subprocess.run([*jamba, "generate", "--input", str(tmp_path / "in.jsonl"), *extra], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 2 and message in r.stderr and "Ray" not in r.stderr, r.stderr
    r = subprocess.run([*jamba, "batch", "score", "--input", str(tmp_path / "in.jsonl"), "--output",
                        str(tmp_path / "out"), "--stages", "9"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "using the demo model" in r.stderr and "--stages 9: " in r.stderr, r.stderr
    r = subprocess.run([*jamba, "serve", "--stages", "2", "--layer-split", "0,3,9"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "end at 9, the model has 8 layers" in r.stderr and "Ray" not in r.stderr, r.stderr


def test_quantize_flag(lm_dir, tmp_path, capsys):
    """--quantize loads int8 weights: the commands give the quantized model's results (the same as a
    LocalRunner on load_stage(quantize=...)), and a bad value is refused naming the choices."""
    from cluster.runtime.local import LocalRunner
    from stages.loading import load_stage

    _, path = lm_dir
    rows = [{"input_ids": [1, 40, 41, 42, 43], "max_new_tokens": 4}, {"input_ids": [1, 7, 9], "max_new_tokens": 3}]
    rc, out = run_cli(tmp_path, "score", path, rows, extra=["--quantize", "int8"])
    assert rc == 0
    ref = LocalRunner(load_stage(path, quantize="int8")[0]).score([r["input_ids"] for r in rows])
    full = LocalRunner(load_stage(path)[0]).score([r["input_ids"] for r in rows])
    for o, want, unq in zip(out, ref, full):
        assert o["token_logprobs"][1:] == pytest.approx(want[1:], abs=1e-5)
        assert o["token_logprobs"][1:] != pytest.approx(unq[1:], abs=1e-6)  # it really is quantized
    inp = tmp_path / "in.jsonl"
    assert main(["eval", "--model", str(path), "--input", str(inp), "--quantize", "int8-experts", "-q"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quantize"] == "int8-experts"
    for command in ("generate", "score", "classify", "eval", "batch score", "serve"):
        with pytest.raises(SystemExit) as e:
            main([*command.split(), "--input", str(inp), "--output", str(tmp_path / "o"), "--quantize", "int4"]
                 if command != "serve" else ["serve", "--quantize", "int4"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "argument --quantize: invalid choice: 'int4'" in err and "int8-experts" in err and "int8-with-mamba" in err


def test_quantize_reaches_the_pipeline_and_serve_config(tmp_path):
    """What jamba serve hands build_app, and a Serve config's bad value, before any replica starts."""
    import argparse

    from cluster.cli.serve import add_serve_parser, app_args
    from cluster.runtime.config import PipelineConfig
    from cluster.serve.app import build_app

    p = argparse.ArgumentParser()
    add_serve_parser(p.add_subparsers())
    args = p.parse_args(["serve", "--quantize", "int8-experts"])
    assert app_args(args, "lm", "/m")["quantize"] == "int8-experts"
    with pytest.raises(ValueError, match="unknown quantization 'fp4'; choose one of int8-experts, int8, int8-with-mamba"):
        build_app({"model": str(tmp_path), "quantize": "fp4"})
    assert PipelineConfig("/m", quantize="int8").quantize == "int8"
    from cluster.cli.batch import add_batch_parser, config_from_args

    p = argparse.ArgumentParser()
    add_batch_parser(p.add_subparsers())
    args = p.parse_args(["batch", "score", "--input", "x.jsonl", "--output", "out", "--model", "/m", "--quantize", "int8"])
    assert config_from_args(args).engine.quantize == "int8"

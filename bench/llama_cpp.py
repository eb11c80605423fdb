"""llama.cpp on the same checkpoint: the CPU peer's column for bench/model_vs_hf.py.

llama.cpp is what a CPU user would pick. It is not a dependency: build it from the source
distribution of `llama-cpp-python` (which vendors llama.cpp, its `convert_hf_to_gguf.py` with
Jamba support and `gguf-py`), about 12 minutes here:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build build -j2 --target llama-bench llama-batched-bench
    pip install -e '.[bench]'   # sentencepiece: the converter reads a tokenizer.model
    .venv/bin/python bench/model_vs_hf.py --llama-cpp llama_cpp_python-*/vendor/llama.cpp

`measure(hf_dir, llama_dir, threads)` converts the checkpoint to an F32 GGUF (a small
sentencepiece tokenizer.model is written beside it: the converter needs one, the bench feeds
random token ids), runs `llama-bench` for prefill (batch 1, L=512 and 2048) and
`llama-batched-bench` for decode at batch 1, 8 and 32 after 32-token prompts, and returns
tokens/s keyed like model_vs_hf's cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _tokenizer_model(hf_dir: Path) -> None:
    import sentencepiece as spm

    from stages.demo import DEMO_CORPUS

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DEMO_CORPUS.splitlines()), model_prefix=str(hf_dir / "tokenizer"),
        vocab_size=300, model_type="bpe", bos_id=1, eos_id=2, pad_id=0, unk_id=3, minloglevel=2)


def to_gguf(hf_dir: Path, llama_dir: Path, out: Path) -> Path:
    if not (hf_dir / "tokenizer.model").exists():
        _tokenizer_model(hf_dir)
    env = dict(os.environ, PYTHONPATH=str(llama_dir / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
                    "--outfile", str(out)], check=True, env=env, capture_output=True, text=True)
    return out


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def measure(hf_dir: Path, llama_dir: Path, threads: int, reps: int = 3) -> dict[tuple[str, int], float]:
    llama_dir = Path(llama_dir)
    bindir = llama_dir / "build" / "bin"
    gguf = to_gguf(Path(hf_dir), llama_dir, Path(hf_dir) / "model-f32.gguf")
    got: dict[tuple[str, int], float] = {}
    r = subprocess.run([str(bindir / "llama-bench"), "-m", str(gguf), "-p", "512,2048", "-n", "0", "-t", str(threads),
                        "-r", str(reps), "-o", "jsonl"], check=True, capture_output=True, text=True)
    for row in _json_lines(r.stdout):
        got[("prefill", int(row["n_prompt"]))] = float(row["avg_ts"])
    r = subprocess.run([str(bindir / "llama-batched-bench"), "-m", str(gguf), "-c", "8192", "-b", "2048", "-ub", "512",
                        "-npp", "32", "-ntg", "32", "-npl", "1,8,32", "-t", str(threads), "--output-format", "jsonl"],
                       check=True, capture_output=True, text=True)
    for row in _json_lines(r.stdout):
        if "pl" in row and "speed_tg" in row:
            got[("decode", int(row["pl"]))] = float(row["speed_tg"])
    return got

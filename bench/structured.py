"""Constrained decoding: what a grammar costs (issue 24).

    .venv/bin/python bench/structured.py [--threads 2] [--new 48] [--libraries-only]

1. The grammar libraries at a 65,536-token vocabulary (Jamba's size): a byte-level BPE tokenizer
   trained here on the installed packages' Python sources (no download), so the vocabulary has
   the shapes real ones have (words, code fragments, whitespace runs, punctuation). For three
   schemas it times the first compile, and the mask for each next token along a valid document
   (the tokens of a JSON instance of the schema). llguidance (what stages/grammar.py uses) beside
   xgrammar when it is installed (`pip install xgrammar`: it needs torch and transformers at run
   time, which is one reason we use llguidance).
2. The engine: tokens/s of the single-process runner on the bench config (bench/model_vs_hf.py's,
   random weights) with a 65,536-token vocabulary, at batch 1 and 32, unconstrained against a JSON
   schema that the rows cannot complete within the run (so both generate the same number of
   tokens). Alternating, round after round: medians, and the median of the per-round ratios
   (what matters on this noisy machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.openmp import use_openmp_env  # noqa: E402

VOCAB = 65536

SCHEMAS = {
    "person (enum, int range, maxLength)": (
        {"type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
         "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                        "role": {"enum": ["admin", "editor", "viewer"]}}},
        {"name": "Ada Lovelace", "age": 36, "role": "admin"}),
    "nested arrays (min/max items)": (
        {"type": "object", "additionalProperties": False, "required": ["matrix", "labels"],
         "properties": {"matrix": {"type": "array", "minItems": 2, "maxItems": 4,
                                   "items": {"type": "array", "minItems": 2, "maxItems": 4, "items": {"type": "number"}}},
                        "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 8}}},
        {"matrix": [[1.5, 2, 3], [4, 5.25, 6]], "labels": ["first row", "second row"]}),
    "order ($ref, anyOf, optional)": (
        {"$defs": {"item": {"type": "object", "required": ["sku", "qty"], "additionalProperties": False,
                            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                           "qty": {"type": "integer", "minimum": 1}}}},
         "type": "object", "required": ["id", "items"], "additionalProperties": False,
         "properties": {"id": {"type": "string"}, "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1}}},
        {"id": "order-77", "note": None, "items": [{"sku": "ABC-1234", "qty": 2}, {"sku": "XYZ-0001", "qty": 1}]}),
}


def train_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer of VOCAB ids, trained on the Python sources installed here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import site

    roots = [Path(json.__file__).parents[1], *map(Path, site.getsitepackages())]
    files = [p for root in roots for p in sorted(root.rglob("*.py"))]

    def texts(limit: int = 60 << 20):
        total = 0
        for f in files:
            text = f.read_text(encoding="utf-8", errors="ignore")
            total += len(text)
            yield text
            if total > limit:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|pad|>", "<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))
    return out


# ---- 1. the libraries ---------------------------------------------------------------------------
def library_table(tok_dir: Path) -> list[str]:
    import llguidance
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    text = (tok_dir / "tokenizer.json").read_text()
    lltok = llguidance.LLTokenizer(text, n_vocab=VOCAB, eos_token=2)
    try:
        import transformers
        import xgrammar as xgr

        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), eos_token="<|endoftext|>")
        xinfo = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB)
    except ImportError:
        xgr = None
    rows = []
    for name, (schema, instance) in SCHEMAS.items():
        tokens = tok.encode(json.dumps(instance, separators=(",", ":"))).ids
        # llguidance: compile (grammar + matcher + first mask), then a mask per token
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}), log_level=0)
        m.compute_bitmask()
        ll_compile = time.perf_counter() - t0
        ll_masks = []
        for t in tokens:
            s = time.perf_counter()
            m.compute_bitmask()
            ll_masks.append(time.perf_counter() - s)
            assert m.consume_token(t), m.get_error()
        row = f"| {name} | {len(tokens)} | {ll_compile * 1e3:.2f} | {statistics.mean(ll_masks) * 1e6:.0f} | {max(ll_masks) * 1e6:.0f} |"
        if xgr is not None:
            import torch

            t0 = time.perf_counter()
            compiled = xgr.GrammarCompiler(xinfo, max_threads=1, cache_enabled=False).compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(",", ":"))
            xm = xgr.GrammarMatcher(compiled)
            bitmask = xgr.allocate_token_bitmask(1, VOCAB)
            xm.fill_next_token_bitmask(bitmask, 0)
            x_compile = time.perf_counter() - t0
            x_masks = []
            for t in tokens:
                s = time.perf_counter()
                xm.fill_next_token_bitmask(bitmask, 0)
                x_masks.append(time.perf_counter() - s)
                assert xm.accept_token(t)
            del torch
            row += f" {x_compile * 1e3:.1f} | {statistics.mean(x_masks) * 1e6:.0f} | {max(x_masks) * 1e6:.0f} |"
        else:
            row += " not installed | | |"
        rows.append(row)
    return rows


# ---- 2. the engine --------------------------------------------------------------------------------
# Never complete within the run (200 items at least), so both sides generate the same number of
# tokens. Free strings are the common case; maxLength is llguidance's slow one (each token's length
# in characters is checked against the bound: ~0.4 ms a mask here, against ~15 us without).
ENDLESS = {
    "strings": {"type": "array", "items": {"type": "string"}, "minItems": 200},
    "strings, maxLength 24": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 200},
}


def engine_table(tok_dir: Path, threads: int, new: int, rounds: int) -> list[str]:
    import torch

    from bench.model_vs_hf import BENCH_CONFIG
    from cluster.runtime.local import LocalRunner
    from stages.config import JambaConfig
    from stages.demo import random_state
    from stages.loading import load_stage, save_checkpoint
    from stages.sequence import SamplingParams, Structure
    from stages.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "bench"
        config = JambaConfig(**dict(BENCH_CONFIG, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0))
        save_checkpoint(random_state(config, "lm"), config, model, max_shard_bytes=64 << 20)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (model / f).write_bytes((tok_dir / f).read_bytes())
        stage, _ = load_stage(model)
        tok = Tokenizer.from_dir(model)
    runner = LocalRunner(stage, tok, num_slots=32, max_batch_tokens=1024)
    g = torch.Generator().manual_seed(0)
    rows = []
    try:
        for batch in (1, 32):
            prompts = [torch.randint(3, VOCAB, (16,), generator=g).tolist() for _ in range(batch)]
            runs = {"unconstrained": [SamplingParams(max_new_tokens=new, ignore_eos=True, temperature=1.0, seed=i)
                                      for i in range(batch)]}
            for name, schema in ENDLESS.items():
                runs[name] = [SamplingParams(max_new_tokens=new, temperature=1.0, seed=i,
                                             structure=Structure("json_schema", json.dumps(schema))) for i in range(batch)]
                runner.generate(prompts[:1], runs[name][:1])  # compiled once, as a server's cache would hold it
            times: dict[str, list[float]] = {k: [] for k in runs}
            counts = {}
            for _ in range(rounds):  # alternating, round after round: the machine is noisy
                for kind, params in runs.items():
                    t0 = time.perf_counter()
                    res = runner.generate(prompts, params)
                    times[kind].append(time.perf_counter() - t0)
                    counts[kind] = sum(len(r.output_ids) for r in res)
            assert len(set(counts.values())) == 1, counts  # the same work on every side
            tps = {k: counts[k] / statistics.median(v) for k, v in times.items()}
            ratio = {k: statistics.median(u / c for u, c in zip(times["unconstrained"], times[k])) for k in ENDLESS}
            rows.append(f"| {batch} | {tps['unconstrained']:.1f} | "
                        + " | ".join(f"{tps[k]:.1f} ({ratio[k]:.2f}x)" for k in ENDLESS) + " |")
            print(rows[-1], flush=True)
    finally:
        runner.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=48, help="tokens generated per row")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians and the median per-round ratio")
    ap.add_argument("--libraries-only", action="store_true")
    args = ap.parse_args()
    use_openmp_env()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"training a {VOCAB}-token byte-level BPE tokenizer ...", flush=True)
        t0 = time.perf_counter()
        tok_dir = train_tokenizer(Path(tmp) / "tok")
        print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)
        print("\n| schema | tokens | llguidance compile ms | mask us (mean) | mask us (max) | xgrammar compile ms "
              "| mask us (mean) | mask us (max) |\n|---|---|---|---|---|---|---|---|")
        for row in library_table(tok_dir):
            print(row, flush=True)
        if not args.libraries_only:
            print("\n| batch | unconstrained tokens/s | " + " | ".join(f"array of {k} tokens/s" for k in ENDLESS)
                  + " |\n|---|---|" + "---|" * len(ENDLESS))
            engine_table(tok_dir, args.threads, args.new, args.rounds)


if __name__ == "__main__":
    main()

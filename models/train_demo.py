"""Train the demo models on this machine's CPU: a small Jamba LM and a classifier made from it.

    apt-get install fortunes                      # the corpus (models/corpus.py)
    python models/train_demo.py --minutes 55      # ~1 h on 2 cores; writes models/jamba-demo-lm,
                                                  # models/jamba-demo-classifier, models/heldout.jsonl

The architecture is Jamba's, scaled down: 8 layers, attention in 1 of 4 (the rest Mamba), a
top-2 mixture of experts in every other layer, a byte-level BPE tokenizer trained on the corpus
and the chat template of the demo tokenizer. It trains with transformers' `JambaForCausalLM`
(a test dependency of the project, used here only as a training tool) and is saved with
`save_pretrained`, so the checkpoints are laid out exactly like ai21labs' and load through the
same code as the real ones. A toy: a few MB of fortune cookies, not Jamba.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from corpus import CLASSIFIER_LABELS, load_entries, split  # noqa: E402
from train_scan import selective_scan  # noqa: E402

from stages.demo import build_demo_tokenizer
from stages.tokenizer import Tokenizer  # noqa: E402

BOS, EOS, PAD = 1, 2, 0


def model_config(vocab_size: int, task: str = "lm", labels: tuple[str, ...] = ()):
    from transformers import JambaConfig

    return JambaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, max_position_embeddings=4096,
        use_mamba_kernels=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        tie_word_embeddings=False, router_aux_loss_coef=0.01,
        id2label=dict(enumerate(labels)) if labels else None,
        label2id={n: i for i, n in enumerate(labels)} if labels else None,
    )


def log(msg: str, file) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    file.write(line + "\n")
    file.flush()


def pack(docs: list[list[int]], seq_len: int, seed: int) -> torch.Tensor:
    """Documents as <bos> text <eos>, shuffled and concatenated, cut into (N, seq_len) windows."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream = [t for i in order for t in [BOS, *docs[i], EOS]]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def heldout_loss(model, docs: list[list[int]], batch: int = 16) -> float:
    """Token-weighted mean NLL of each held-out document on its own (as `jamba eval` computes it)."""
    model.eval()
    total, count = 0.0, 0
    docs = sorted(docs, key=len)
    for i in range(0, len(docs), batch):
        rows = [[BOS, *d] for d in docs[i : i + batch]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        labels = torch.tensor([r[1:] + [-100] * (width - len(r) + 1) for r in rows])
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((labels != -100).sum())
    model.train()
    return total / count


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_lm(args, tok: Tokenizer, train_docs, heldout_docs, logf):
    from transformers import JambaForCausalLM

    torch.manual_seed(args.seed)
    model = JambaForCausalLM(model_config(tok.vocab_size))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"LM: {n_params / 1e6:.1f}M parameters; {sum(map(len, train_docs)) / 1e6:.2f}M training tokens", logf)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    t0 = time.perf_counter()
    step, epoch, total_steps = 0, 0, None
    model.train()
    while True:
        data = pack(train_docs, args.seq_len, args.seed + epoch)
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            if total_steps is None and step == 10:
                # The schedule is planned from the measured step time, so the run fits its budget.
                per_step = (time.perf_counter() - t0) / step
                total_steps = int(budget / per_step)
                log(f"{per_step:.2f} s/step -> {total_steps} steps "
                    f"({total_steps * args.batch_size * args.seq_len / 1e6:.1f}M tokens)", logf)
            if total_steps is not None and step >= total_steps:
                return model
            lr = cosine_lr(step, total_steps or 10**9, args.lr, warmup=50)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = data[perm[i : i + args.batch_size]]
            out = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 25 == 0:
                elapsed = time.perf_counter() - t0
                log(f"step {step}/{total_steps} epoch {epoch} loss {out.loss.item():.3f} lr {lr:.2e} "
                    f"{elapsed / 60:.1f} min", logf)
            if step % args.eval_every == 0:
                log(f"held-out loss {heldout_loss(model, heldout_docs[:200]):.3f}", logf)
        epoch += 1


def train_classifier(args, lm_dir: Path, tok: Tokenizer, entries, logf):
    from transformers import JambaForSequenceClassification

    labels = CLASSIFIER_LABELS
    model = JambaForSequenceClassification.from_pretrained(
        lm_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, dtype=torch.float32,
    )
    model.config.pad_token_id = PAD

    def rows(part):
        out = [(tok.encode(e.text)[: args.cls_len], labels.index(e.category)) for e in part if e.category in labels]
        return out

    train = rows([e for e in entries if not e.heldout])
    test = rows([e for e in entries if e.heldout])

    def batches(data, shuffle_seed=None):
        data = list(data)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(data)
        for i in range(0, len(data), args.batch_size):
            chunk = data[i : i + args.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([ids + [PAD] * (width - len(ids)) for ids, _ in chunk])
            yield ids, torch.tensor([y for _, y in chunk])

    @torch.no_grad()
    def accuracy():
        model.eval()
        right = sum(int((model(input_ids=x, use_cache=False).logits.argmax(-1) == y).sum()) for x, y in batches(test))
        model.train()
        return right / len(test)

    majority = max(sum(1 for _, y in test if y == k) for k in range(len(labels))) / len(test)
    log(f"classifier: {len(train)} train / {len(test)} held-out texts, majority baseline {majority:.3f}", logf)
    opt = torch.optim.AdamW(model.parameters(), lr=args.cls_lr, weight_decay=0.01)
    t0, step, epoch = time.perf_counter(), 0, 0
    model.train()
    while time.perf_counter() - t0 < args.cls_minutes * 60:
        for x, y in batches(train, shuffle_seed=epoch):
            loss = model(input_ids=x, labels=y, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if time.perf_counter() - t0 >= args.cls_minutes * 60:
                break
        epoch += 1
        log(f"classifier epoch {epoch} step {step} loss {loss.item():.3f} held-out accuracy {accuracy():.3f}", logf)
    return model, accuracy(), majority, len(train), len(test)


def save(model, out: Path, tok_dir: Path, readme: str) -> None:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    # bf16 keeps the repository lean; `ensure_demo_model` serves an fp32 copy on CPUs.
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="8MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, out / name)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "do_sample": False}, indent=2) + "\n")
    (out / "README.md").write_text(readme)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--minutes", type=float, default=55, help="LM training budget (default 55)")
    ap.add_argument("--cls-minutes", type=float, default=8, help="classifier fine-tuning budget (default 8)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--cls-lr", type=float, default=3e-4)
    ap.add_argument("--cls-len", type=int, default=128, help="classifier inputs are cut to this many tokens")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from transformers.models.jamba import modeling_jamba

    modeling_jamba.mamba_selective_scan = selective_scan  # its fallback's backward is quadratic in length

    work = args.out / ".train"
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "train.log", "a")
    t_start = time.perf_counter()
    entries = load_entries()
    train, heldout = split(entries)
    log(f"corpus: {len(entries)} fortunes, {len(train)} train ({sum(len(e.text) for e in train) / 1e6:.2f} MB), "
        f"{len(heldout)} held-out ({sum(len(e.text) for e in heldout) / 1e6:.2f} MB)", logf)
    with open(args.out / "heldout.jsonl", "w") as f:
        for e in heldout:
            f.write(json.dumps({"text": e.text, "label": e.category}) + "\n")

    tok_dir = work / "tokenizer"
    build_demo_tokenizer(tok_dir, vocab_size=args.vocab_size, corpus=[e.text for e in train])
    tok = Tokenizer.from_dir(tok_dir)
    train_docs = [tok.encode(e.text, add_special_tokens=False) for e in train]
    heldout_docs = [tok.encode(e.text, add_special_tokens=False) for e in heldout]

    model = train_lm(args, tok, train_docs, heldout_docs, logf)
    loss = heldout_loss(model, heldout_docs)
    lm_minutes = (time.perf_counter() - t_start) / 60
    log(f"LM done in {lm_minutes:.1f} min: held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f}", logf)
    fp32_dir = work / "lm-fp32"
    model.save_pretrained(fp32_dir)  # the classifier starts from the full-precision weights
    n_params = sum(p.numel() for p in model.parameters())
    n_train_tokens = sum(map(len, train_docs))
    save(model, args.out / "jamba-demo-lm", tok_dir, LM_README.format(
        params=n_params / 1e6, mb=sum(len(e.text) for e in train) / 1e6, tokens=n_train_tokens / 1e6,
        minutes=lm_minutes, loss=loss, ppl=math.exp(loss), heldout=len(heldout), vocab=args.vocab_size))

    t_cls = time.perf_counter()
    cls, acc, majority, n_tr, n_te = train_classifier(args, fp32_dir, tok, entries, logf)
    log(f"classifier done: held-out accuracy {acc:.3f} (majority baseline {majority:.3f})", logf)
    save(cls, args.out / "jamba-demo-classifier", tok_dir, CLS_README.format(
        labels=", ".join(CLASSIFIER_LABELS), acc=acc, majority=majority, n_train=n_tr, n_test=n_te,
        minutes=(time.perf_counter() - t_cls) / 60))
    return 0


LM_README = """# jamba-demo-lm: a toy Jamba trained on fortune cookies

A {params:.1f}M-parameter Jamba (8 layers: attention in layers 2 and 6, Mamba elsewhere; a
4-expert top-2 mixture of experts in every other layer; hidden size 256) trained from scratch on
the CPU of a 2-core machine in {minutes:.0f} minutes, by `python models/train_demo.py`.

**What it is not:** Jamba. It has read {mb:.1f} MB of text and nothing else; it writes text that
reads like a fortune cookie file (quotes, jokes, short verse, attributions) and knows little.
It exists so that the serving stack can be seen working and output quality can be measured.

- Corpus: Debian's `fortunes` package (the data files of BSD `fortune`, BSD licence), every
  English category but ascii-art; entries deduplicated; 5% held out by a hash of the text
  (`models/corpus.py`; the held-out texts are `models/heldout.jsonl`, {heldout} entries).
- Tokenizer: byte-level BPE, {vocab} tokens, trained on the training part with `tokenizers`;
  chat template as the project's demo tokenizer. {tokens:.2f}M training tokens.
- Held-out (per-entry, token-weighted): loss {loss:.4f} nats/token, **perplexity {ppl:.2f}**
  (`jamba eval --model models/jamba-demo-lm --input models/heldout.jsonl`).
- Weights: bfloat16, sharded safetensors with an index, laid out as `save_pretrained` writes them.
"""

CLS_README = """# jamba-demo-classifier: which fortune file a text comes from

`JambaForSequenceClassification` made from `jamba-demo-lm` (same body, a new `score` head) and
fine-tuned for {minutes:.0f} minutes on the category of each fortune: {labels}.

- {n_train} training texts; held-out: {n_test} texts (the LM's held-out split).
- **Held-out accuracy {acc:.3f}**, against {majority:.3f} for always answering the most common label.
- A toy: it has learnt what words each file tends to use, nothing more.
"""


if __name__ == "__main__":
    raise SystemExit(main())

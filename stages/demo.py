"""The embedded demo models, and small Jamba checkpoints with deterministic *random* weights.

Real checkpoints cannot be downloaded here, so the demo, `jamba serve` without a model and the
tests use two small checkpoints trained on this kind of machine and committed in `models/`
(`models/train_demo.py`): `jamba-demo-lm`, a 12.9M-parameter Jamba that writes text like the
fortune-cookie files it was trained on, and `jamba-demo-classifier`, which tells which fortune
file a text comes from. They are stored in bfloat16; `ensure_demo_model` serves an fp32 copy
(CPUs here have no fast bf16). Their files are laid out exactly like ai21labs' (config.json,
sharded safetensors with an index, tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json), so the loading code is the same.

`make_demo_model` writes a random-weight checkpoint of any shape (`jamba make-demo-model`), for
the tests that need many configurations; its text output is gibberish.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .config import JambaConfig
from .loading import save_checkpoint
from .model import JambaStage

DEMO_LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def demo_config(task: str = "lm") -> JambaConfig:
    return JambaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
        architectures=["JambaForSequenceClassification" if task == "classification" else "JambaForCausalLM"],
        id2label=DEMO_LABELS if task == "classification" else {},
    )


def random_state(config: JambaConfig, head: str, seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    """Deterministic random weights for every parameter of the full model."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in JambaStage(config, head=head).named_parameters()}
    state = {}
    for n, shape in shapes.items():
        if n.endswith("A_log"):  # S4D-real init, as Mamba: A = -(1..d_state)
            state[n] = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
        elif n.endswith(".D") or "norm" in n:
            state[n] = torch.ones(shape)
        elif n.endswith("bias"):
            state[n] = torch.zeros(shape)
        else:
            state[n] = torch.randn(shape, generator=g) * std
    return state


def make_demo_model(path: str | Path, task: str = "lm", seed: int = 0) -> Path:
    """Write the demo checkpoint to `path` (task "lm" or "classification"); returns the path."""
    if task not in ("lm", "classification"):
        raise ValueError(f"task must be 'lm' or 'classification', not {task!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = demo_config(task)
    build_demo_tokenizer(path, vocab_size=config.vocab_size)
    # Small shards so that pipeline stages really do open only their own files.
    save_checkpoint(random_state(config, task, seed), config, path, max_shard_bytes=256 << 10)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2))
    (path / "README.md").write_text(
        f"# Jamba demo {'classifier' if task == 'classification' else 'language model'}\n\n"
        "Written by `jamba make-demo-model`. The weights are RANDOM (seed "
        f"{seed}): outputs are gibberish. It exists to exercise the serving stack end to end.\n")
    return path


# The trained checkpoints: models/ of the repository, or $JAMBA_DEMO_MODELS (the image copies them there).
TRAINED = {"lm": "jamba-demo-lm", "classification": "jamba-demo-classifier"}


def trained_model_dir(task: str = "lm") -> Path:
    root = Path(os.environ.get("JAMBA_DEMO_MODELS", Path(__file__).resolve().parent.parent / "models"))
    return root / TRAINED[task]


def default_model_dir(task: str = "lm") -> Path:
    """Where the demo model is served from when no --model is given ($JAMBA_HOME, default ~/.cache/jamba)."""
    home = Path(os.environ.get("JAMBA_HOME", Path.home() / ".cache" / "jamba"))
    return home / ("demo-classifier" if task == "classification" else "demo-lm")


def ensure_demo_model(task: str = "lm") -> Path:
    """The trained demo checkpoint for `task`, as an fp32 copy under $JAMBA_HOME (made on first use)."""
    if task not in TRAINED:
        raise ValueError(f"task must be 'lm' or 'classification', not {task!r}")
    source, path = trained_model_dir(task), default_model_dir(task)
    index = source / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"the trained demo checkpoint {source} is missing (it ships in the repository's "
                                "models/ folder; set JAMBA_DEMO_MODELS to the folder that holds it)")
    stamp = _stamp(source)
    if (path / ".source-index.json").is_file() and (path / ".source-index.json").read_text() == stamp:
        return path
    widen_to_fp32(source, path)
    (path / ".source-index.json").write_text(stamp)
    return path


def _stamp(source: Path) -> str:
    """What a copy was made from: a hash of every file of the checkpoint (weights, config, tokenizer
    and its chat template), so a changed file, not only a changed weight index, makes a new copy."""
    return json.dumps({f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                       for f in sorted(source.iterdir()) if f.is_file()}, indent=1)


DEMO_NAMES = {"demo": "lm", "demo-classifier": "classification"}  # what `--model` may name instead of a path


def model_dir(model: str) -> str:
    """`model` itself, or for the name of an embedded demo model its fp32 copy (ensure_demo_model)."""
    task = DEMO_NAMES.get(model)
    return str(ensure_demo_model(task)) if task else model


def widen_to_fp32(source: Path, dest: Path) -> None:
    """Copy a checkpoint with its floating-point tensors in float32: same shards, same index."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(source / shard).items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, tmp / shard, metadata={"format": "pt"})
    index.setdefault("metadata", {})["total_size"] = total
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((source / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


# ---- the demo tokenizer -----------------------------------------------------------------------
# A small, deterministic byte-level BPE with Jamba's special-token ids (pad 0, bos 1, eos 2), for
# the tests and the demo models (models/train_demo.py trains the committed one on its corpus).

PAD, BOS, EOS, UNK = "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEMO_SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IM_START, IM_END)  # ids 0..5, in this order
DEMO_MODEL_MAX_LENGTH = 4096
# ChatML turns. With `tools`, a first system turn lists them and assistant turns write their
# `tool_calls` the way Jamba-1.5/1.6/1.7's own template does (<tool_definitions> ... </tool_definitions>,
# <tool_calls>[...]</tool_calls>; cluster/serve/tool_calls.py reads that format back). Without tools
# and tool calls the text is what the plain ChatML template gave, byte for byte. Whitespace that
# matters is written inside {{ '...' }}: trim_blocks/lstrip_blocks would eat it next to a tag.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system{{ '\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "<tool_definitions>{{ '\\n# Tools\\n\\n## Functions' }}"
    "{% for tool in tools %}{{ '\\n\\n' + ((tool['function'] if tool['function'] is defined else tool) | tojson(indent=2)) }}"
    "{% endfor %}{{ '\\n' }}</tool_definitions><|im_end|>{{ '\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system','user','assistant','tool'] %}"
    "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
    "{% if not (tools and loop.first and m['role'] == 'system') %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['tool_calls'] %}{{ m['content'] or '' }}<tool_calls>{{ '[\\n    ' }}"
    "{% for call in m['tool_calls'] %}{% set f = call['function'] if call['function'] is defined else call %}"
    "{{ '{\"name\": \"' + f['name'] + '\", \"arguments\": ' + (f['arguments'] if f['arguments'] is string "
    "else f['arguments'] | tojson) + '}' }}{{ ',\\n    ' if not loop.last else '\\n' }}{% endfor %}"
    "]</tool_calls>"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEMO_CORPUS = """\
The weather changed quickly on Tuesday morning. At 7:30 the sky was clear and blue, but by noon
heavy clouds had rolled in from the west. The forecast promised light rain, 12 mm at most, yet the
storm that arrived dropped almost 40 mm in two hours. Streets flooded, buses ran late, and people
waited under shop awnings, checking their phones and watching the water rise along the curb.
In winter the temperature often falls below zero at night. Frost covers the windows, and the first
snow usually comes in late November. Children build snowmen; adults shovel driveways and complain.
Spring brings wind, pollen, and long evenings; summer brings heat waves of 35 degrees or more.

To make a simple tomato soup, chop one onion and two cloves of garlic. Warm a spoonful of olive oil
in a large pot, add the onion, and cook it slowly for ten minutes until it is soft and sweet. Add
the garlic, then 800 grams of tomatoes, a cup of water, salt, and pepper. Let it simmer for 25
minutes, blend until smooth, and finish with fresh basil. Bread baked the same day makes it better.
For pancakes, whisk 2 eggs, 250 ml of milk, and 120 g of flour; rest the batter for half an hour.
Cooking is mostly patience: taste often, adjust the seasoning, and don't rush the onions!

A computer follows instructions written as programs. The processor fetches an instruction from
memory, decodes it, and executes it, billions of times per second. Data lives in memory while a
program runs and on a disk when the power is off. Networks connect computers so they can exchange
messages; the internet is a network of networks. Good software is tested carefully: every function
should return the right answer, handle errors, and fail loudly instead of silently. Developers use
version control to track changes, review each other's code, and roll back mistakes. A server may
handle 10,000 requests per second, so engineers measure latency, memory use, and throughput.

Travel teaches patience as well. Trains leave on time in some countries and never in others. We
once waited six hours at an airport because of fog, then flew over mountains covered in snow and
landed in a warm city by the sea. The hotel was small, the room had a balcony, and breakfast was
served from 6:45 until 10:00. Pack light, carry a good map, learn a few words of the language,
and always keep your passport in a safe place. Is the museum open on Monday? Where is the station?
How much does a ticket cost? Questions like these are worth learning before you go.

Numbers appear everywhere: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024, 2025, 3.14159,
-7, +15%, $19.99, 1/2, 3:00 p.m., and (555) 010-0199. Punctuation matters too - commas, periods;
colons: semicolons; "quotes", 'apostrophes', [brackets], {braces}, <angles>, and the odd #hashtag,
@mention, email@example.com, or path/to/file.txt. Lists help: first, second, third, and so on.

History is full of small decisions with large effects. A farmer chose a new crop, a merchant
opened a road, a teacher wrote a book that a student read years later. Libraries keep these
stories, and each generation reads them again with new questions. What would you have done?
Music, art, and science grow the same way: people listen, look, measure, and try again tomorrow.
"""


def build_demo_tokenizer(out_dir: str | Path, vocab_size: int = 512, corpus: Iterable[str] | None = None) -> None:
    """Train a byte-level BPE tokenizer and write a loadable tokenizer directory.

    corpus: the texts to learn merges from (default: the small built-in demo text). Deterministic:
    for the same corpus, trainer settings and special-token order every run writes byte-identical
    files. ``vocab_size`` counts the special tokens.
    """
    n_base = len(DEMO_SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= n_base:
        raise ValueError(f"vocab_size must exceed {n_base} (special tokens + 256 byte symbols)")
    backend = _Backend(models.BPE())
    # add_prefix_space=False: decode(encode(text)) == text exactly, no leading space invented.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(DEMO_SPECIAL_TOKENS),  # the trainer places these first: ids 0..5
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no UNK ever
    )
    backend.train_from_iterator(DEMO_CORPUS.splitlines() if corpus is None else corpus, trainer=trainer)
    got = backend.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:  # a too-small corpus stops BPE early; the model would be mis-sized
        raise RuntimeError(f"the corpus only supports {got} tokens, {vocab_size} requested")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A:0", pair=f"{BOS} $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 1)]
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": DEMO_MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": DEMO_CHAT_TEMPLATE,
    }

    def write_json(name: str, obj: dict[str, Any]) -> None:
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_json("tokenizer_config.json", config)
    write_json("special_tokens_map.json", special_map)

"""stages.tokenizer against transformers' AutoTokenizer on the demo tokenizer."""

import json
import random

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from stages.demo import BOS, DEMO_CORPUS, DEMO_SPECIAL_TOKENS, EOS, IM_END, IM_START, PAD, UNK, build_demo_tokenizer
from stages.tokenizer import ChatTemplateError, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "   \n\t  \n",
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé, Ångström, São Paulo",
    "日本語のテキストと中文文本",
    "emoji 🎉🚀 and a family 👩‍👩‍👧 plus a flag 🇯🇵",
    "Ελληνικά, русский, עברית, العربية",
    f"{IM_START}user\nhi{IM_END}\n",
    f"{BOS}text between{EOS} specials{PAD}",
    "Numbers 3.14159, $19.99 and 10,000 requests/s; don't stop!",
    "  leading and trailing spaces  ",
    "a literal replacement char \ufffd stays",
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi 🎉, what's the weather in Zürich?"},
    {"role": "assistant", "content": "Cold: -3 °C."},
    {"role": "tool", "content": '{"temp": -3}'},
    {"role": "user", "content": "日本は?"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo_tokenizer")
    build_demo_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A tokenizer shaped like Jamba's real one: SentencePiece-style BPE with Metaspace and
    "<0x..>" byte-fallback pieces, BOS added by the tokenizer.json post-processor."""
    backend = Backend(models.BPE(byte_fallback=True, unk_token="<|unk|>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False)
    backend.train_from_iterator(DEMO_CORPUS.splitlines(), trainer=trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    first = max(vocab.values()) + 1
    vocab.update({f"<0x{b:02X}>": first + b for b in range(256)})
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}},
    }
    path = tmp_path_factory.mktemp("spm_tokenizer")
    (path / "tokenizer.json").write_text(json.dumps(spec))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "add_bos_token": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "config.json").write_text(json.dumps({"model_type": "jamba"}))
    return path


def with_template(tok_dir, tmp_path, template):
    """A copy of the demo tokenizer whose chat template is ``template``."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(template, encoding="utf-8")
    return Tokenizer.from_dir(tmp_path)


# ---- vocabulary -------------------------------------------------------------------------


def test_vocab_facts(tok, hf):
    assert tok.vocab_size == 512 == len(hf)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in DEMO_SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert tok.token_to_id(UNK) == hf.unk_token_id == 3
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert tok.has_chat_template


def test_build_is_deterministic(tmp_path, tok_dir):
    build_demo_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_build_rejects_vocab_without_merges(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_demo_tokenizer(tmp_path, vocab_size=200)


# ---- encode / decode --------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    bare = tok.encode(text, add_special_tokens=False)
    assert bare == hf(text, add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id] + bare  # BOS added exactly once, by the post-processor
    assert all(0 <= i < tok.vocab_size for i in ids)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    if not any(s in text for s in DEMO_SPECIAL_TOKENS):
        assert tok.decode(ids) == text  # byte-level BPE round-trips any text


def test_special_token_text_encodes_to_special_ids(tok):
    assert tok.encode(f"{IM_START}{IM_END}", add_special_tokens=False) == [4, 5]


def test_config_flags_do_not_override_tokenizer_json(tok_dir, tmp_path):
    # transformers 5 ignores add_bos_token when tokenizer.json exists; so must we.
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert Tokenizer.from_dir(tmp_path).encode("hi") == hf("hi")["input_ids"] == [1] + hf("hi", add_special_tokens=False)["input_ids"]


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


# ---- incremental decoding ---------------------------------------------------------------


def stream(tok, ids, skip_special_tokens=True):
    dec = tok.incremental_decoder(skip_special_tokens)
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.flush()


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding(tok, text, skip):
    ids = tok.encode(text)
    deltas, tail = stream(tok, ids, skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + tail == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas + [tail])


def test_incremental_decoding_holds_back_split_characters(tok):
    # The test above is only meaningful if multi-byte characters really span tokens.
    ids = tok.encode("🎉🚀 日本語", add_special_tokens=False)
    assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    deltas, tail = stream(tok, ids)
    assert "".join(deltas) == "🎉🚀 日本語" and tail == ""
    assert deltas.count("") > 0  # something was held back


def test_incremental_decoding_random_ids(tok):
    # Arbitrary ids include broken UTF-8 and specials mid-text; the invariant still holds.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            deltas, tail = stream(tok, ids, skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)


def test_sentencepiece_byte_fallback_tokenizer(spm_dir):
    tok = Tokenizer.from_dir(spm_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(spm_dir))
    assert tok.vocab_size == len(hf)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"]
        for skip in (True, False):
            full = tok.decode(ids, skip_special_tokens=skip)
            assert full == hf.decode(ids, skip_special_tokens=skip)
            deltas, tail = stream(tok, ids, skip)
            assert "".join(deltas) + tail == full
            if "\ufffd" not in full:
                assert not any("\ufffd" in d for d in deltas + [tail])
    # Random ids: byte pieces forming invalid UTF-8, split by specials, Metaspace stripping.
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            deltas, tail = stream(tok, ids, skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)


# ---- chat templates ---------------------------------------------------------------------


@pytest.mark.parametrize("gen", [True, False])
def test_chat_matches_transformers(tok, hf, gen):
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
    assert text == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert text.startswith(BOS + IM_START + "system\n")
    expected = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    ids = tok.encode_chat(MESSAGES, add_generation_prompt=gen)
    assert ids == expected
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS only, none added on top


def test_chat_content_parts_pass_through(tok, hf):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )



PLAIN_CHATML = (  # the demo template before it learned tools: tool-less chats must render exactly so
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system','user','assistant','tool'] %}"
    "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "noop"}}]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
]


def test_demo_template_renders_tools_in_jambas_format(tok, hf, tok_dir, tmp_path):
    """The demo template lists `tools` in a first system turn and writes assistant `tool_calls` as
    Jamba's template does (<tool_definitions>, <tool_calls>[...]</tool_calls>); transformers agrees;
    chats without tools or tool calls render exactly as the plain ChatML template did."""
    for messages in (MESSAGES, MESSAGES[1:], TOOL_TURNS, [MESSAGES[0]] + TOOL_TURNS):
        for tools in (TOOLS, None):
            for gen in (True, False):
                ours = tok.apply_chat_template(messages, add_generation_prompt=gen, tools=tools)
                assert ours == hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
    text = tok.apply_chat_template([MESSAGES[0]] + TOOL_TURNS, tools=TOOLS)
    assert text.startswith(f"{BOS}{IM_START}system\nYou are terse.\n\n<tool_definitions>\n# Tools\n\n## Functions\n\n{{\n"
                           '  "name": "get_weather",\n')
    assert text.count(f"{IM_START}system") == 1  # the system message went into the tools turn
    assert ('<tool_calls>[\n    {"name": "get_weather", "arguments": {"city": "Paris"}},\n'
            '    {"name": "get_weather", "arguments": {"city": "Rome"}}\n]</tool_calls>') in text
    plain = with_template(tok_dir, tmp_path, PLAIN_CHATML)
    rng = random.Random(0)
    for _ in range(200):
        messages = [{"role": rng.choice(["system", "user", "assistant", "tool"]),
                     "content": rng.choice(["", "hi", " a\nb ", "{{ x }}", "日本", "<tool_calls>"])}
                    for _ in range(rng.randrange(1, 6))]
        gen = rng.random() < 0.5
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == \
            plain.apply_chat_template(messages, add_generation_prompt=gen)

def test_chat_template_file_and_extra_variables(tok_dir, tmp_path):
    template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}|{{ tools | tojson }}|{{ who }}\n{% endfor %}"
    tok = with_template(tok_dir, tmp_path, template)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tools = [{"name": "weather", "description": "Zürich <b>"}]
    ours = tok.apply_chat_template(MESSAGES[:2], tools=tools, who="me")
    assert ours == hf.apply_chat_template(MESSAGES[:2], tools=tools, who="me", tokenize=False, add_generation_prompt=True)
    assert '"Zürich <b>"' in ours  # tojson neither escapes HTML nor non-ASCII


def test_named_chat_templates_use_default(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools!"},
        {"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{% endfor %}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES)
    assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours == "[system][user][assistant][tool][user]"


@pytest.mark.parametrize(
    "message, index", [({"role": "robot", "content": "x"}, 1), ({"content": "x"}, 1), ({"role": "user", "content": 3}, 1)]
)
def test_invalid_messages(tok, message, index):
    with pytest.raises(ValueError, match=f"message {index}") as err:
        tok.apply_chat_template([MESSAGES[0], message])
    assert not isinstance(err.value, ChatTemplateError)  # the caller's fault, not the template's


def test_bad_role_names_role(tok):
    with pytest.raises(ValueError, match=r"message 2 has invalid role 'robot'"):
        tok.apply_chat_template([MESSAGES[0], MESSAGES[1], {"role": "robot", "content": "beep"}])


def test_template_raise_exception(tok_dir, tmp_path):
    tok = with_template(tok_dir, tmp_path, "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System message required') }}{% endif %}ok")
    assert tok.apply_chat_template(MESSAGES) == "ok"
    with pytest.raises(ChatTemplateError, match="^System message required$"):
        tok.apply_chat_template(MESSAGES[1:])


@pytest.mark.parametrize("template", ["{% for %}", "{{ messages[0]['content'] + 1 }}", "{{ nope.x }}"])
def test_template_errors_become_chat_template_error(tok_dir, tmp_path, template):
    tok = with_template(tok_dir, tmp_path, template)
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(MESSAGES)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.pop() }}",
        "{% set ns = namespace(_secret=1) %}",
    ],
)
def test_sandbox_blocks_escapes(tok_dir, tmp_path, template):
    tok = with_template(tok_dir, tmp_path, template)
    with pytest.raises(ChatTemplateError, match="unsafe|not allowed"):
        tok.apply_chat_template(MESSAGES)


def test_no_chat_template(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.encode_chat(MESSAGES)

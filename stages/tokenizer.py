"""Tokenizer layer: text <-> token ids, streaming detokenization and chat templates.

Only Hugging Face *fast* tokenizers (a ``tokenizer.json``) are supported; they are driven
with the ``tokenizers`` library directly so serving does not depend on ``transformers``.
``transformers`` is the reference we are tested against: ``encode``, ``decode``,
``apply_chat_template`` and ``encode_chat`` give what ``AutoTokenizer`` gives.
(The demo models' tokenizer is trained in stages/demo.py.)
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

ALLOWED_ROLES = ("system", "user", "assistant", "tool")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# What transformers' ``clean_up_tokenization`` undoes; it is only applied when the config asks for it.
_CLEANUP_PAIRS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class ChatTemplateError(ValueError):
    """The chat template is missing, does not compile, or failed (e.g. ``raise_exception``)."""


def _token_content(value: Any) -> str | None:
    # Special tokens are serialized either as plain strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, as transformers does.

    Rich objects carry methods the sandbox does not know are dangerous, so anything that is
    not JSON-like reaches the template only as an inert ``"<TypeName>"`` placeholder.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars, ...) are stripped to the base type; str(enum) would
    # give "Color.RED", str.__str__ gives the underlying value.
    for base, strip in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):
            return strip(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # namedtuples etc. become plain tuples
        return (list if isinstance(value, list) else tuple)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ALLOWED_ROLES:
            raise ValueError(f"message {i} has invalid role {role!r}; allowed roles: {', '.join(ALLOWED_ROLES)}")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            continue  # OpenAI-style tool-call turns carry no text
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and isinstance(part.get("type"), str)):
                    raise ValueError(f"message {i} content part {j} must be a dict with a string 'type'")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} content part {j} is a text part without string 'text'")
        elif not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string or a list of parts, got {type(content).__name__}")


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker).

    We do not compute assistant masks, so the block just renders its body.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    # Like transformers: underscore names on a namespace could reach CPython internals.
    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a template in the same sandboxed environment transformers uses."""
    # Chat templates are untrusted code; jinja2 before 3.1.6 has known sandbox escapes.
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ChatTemplateError(f"jinja2>=3.1.6 is required for chat templates, found {jinja2.__version__}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes; chat templates expect plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *a, **kw: dict(*a, **kw)  # a plain function: no class attributes to poke at
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


class Tokenizer:
    """A fast tokenizer plus the bits of ``tokenizer_config.json`` serving needs."""

    def __init__(self, backend: _Backend, config: dict[str, Any], chat_template: str | None = None):
        self._backend = backend
        self._special = {k: _token_content(config.get(k)) for k in _SPECIAL_TOKEN_KEYS}
        self._special = {k: v for k, v in self._special.items() if v is not None}
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # transformers skips the cleanup for BPE models: it eats legitimate spaces before punctuation.
        if type(backend.model).__name__ == "BPE" and not config.get(
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
        ):
            self.clean_up_tokenization_spaces = False
        # The model's embedding must cover every id, including added tokens that may sit
        # past the model vocabulary, so size by the largest id rather than a count.
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        # For streaming: ids that skip_special_tokens drops, and SentencePiece byte-fallback
        # pieces ("<0xE4>"), which the ByteFallback decoder decodes as one group per run.
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._byte_piece_ids = frozenset(i for t, i in vocab.items() if _BYTE_PIECE.fullmatch(t))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}: only fast (tokenizer.json) tokenizers are supported"
            )
        backend = _Backend.from_file(str(tokenizer_file))

        def read_json(name: str) -> dict[str, Any]:
            file = path / name
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

        config = read_json("tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            # transformers' legacy path: special_tokens_map.json overrides the config's tokens.
            for key, value in read_json("special_tokens_map.json").items():
                if key in _SPECIAL_TOKEN_KEYS:
                    config[key] = value

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (path / "chat_template.jinja").is_file():  # a separate file wins, as in transformers
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, config, template if isinstance(template, str) else None)

    # ---- vocabulary facts -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1, added tokens included): the embedding size to use."""
        return self._vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self._special.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self._special.get("eos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self._special.get("pad_token"))

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    # ---- text <-> ids -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The tokenizer.json post-processor alone decides what "special tokens" means (for
        # Jamba: BOS in front). transformers 5 likewise ignores the config's add_bos_token /
        # add_eos_token when a tokenizer.json exists (no post-processor: nothing is added).
        # We never prepend BOS ourselves, so it can be neither doubled nor out of step.
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUP_PAIRS:
                text = text.replace(old, new)
        return text

    def to_json(self) -> str:
        """The tokenizer.json this tokenizer was loaded from (what llguidance builds its own from)."""
        return self._backend.to_str()

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        # Compiled on first use and cached per instance (a failed compile is not cached).
        if self.chat_template is None:
            raise ChatTemplateError("this tokenizer has no chat template")
        try:
            return _compile_chat_template(self.chat_template)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from e

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render ``messages`` to the prompt text; ``extra`` (e.g. ``tools``) reaches the template."""
        _validate_messages(messages)
        template = self._compiled_template
        variables = {"tools": None, "documents": None, **self._special, **_plain(extra)}
        try:
            return template.render(messages=_plain(messages), add_generation_prompt=add_generation_prompt,
                                   **variables)
        except jinja2.TemplateError as e:  # raise_exception(), SecurityError, UndefinedError, ...
            raise ChatTemplateError(str(e)) from e
        except Exception as e:  # e.g. TypeError from the template adding a str to a list
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        # The template writes BOS itself when it wants one, so nothing is added here.
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)


class IncrementalDecoder:
    """Streaming detokenization: push ids one at a time, get back the text that became final.

    Same technique as vLLM/TGI: decode a short window ``ids[prefix:]`` and compare it with
    ``ids[prefix:read]``; the difference is new text. Decoding a window (not a single token)
    keeps context-dependent decoders right (e.g. a Metaspace "▁" that is stripped only at
    the start of a text). Text is held back while it may still change:
    - it ends in U+FFFD: a multi-byte character whose remaining bytes have not arrived;
    - the last visible token is a byte-fallback piece: the ByteFallback decoder decodes a
      whole run of "<0x..>" pieces at once, and if the run turns out to be invalid UTF-8
      every byte in it becomes U+FFFD, even bytes that looked complete on their own.
    Invariant: ``"".join(deltas) + flush() == tokenizer.decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix = 0  # window start: emitted tokens kept for decoding context
        self._read = 0  # tokens up to here have been emitted as text
        self._in_byte_run = False  # last token that decode() will see is a byte piece

    def _window_delta(self) -> str:
        prefix_text = self._tokenizer.decode(self.token_ids[self._prefix:self._read], self._skip)
        new_text = self._tokenizer.decode(self.token_ids[self._prefix:], self._skip)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if not (self._skip and token_id in self._tokenizer._special_ids):  # skipped ids don't end a run
            self._in_byte_run = token_id in self._tokenizer._byte_piece_ids
        if self._in_byte_run:
            return ""
        delta = self._window_delta()
        if not delta or delta.endswith("\ufffd"):
            return ""  # nothing new yet (e.g. a skipped special token) or an incomplete character
        # Tokens that just produced text become the next window's context; the window
        # therefore always starts right after text that is final.
        self._prefix, self._read = self._read, len(self.token_ids)
        return delta

    def flush(self) -> str:
        """Emit whatever is held back; call once, at the end of the stream (U+FFFD is final then)."""
        delta = self._window_delta()
        self._prefix = self._read = len(self.token_ids)
        self._in_byte_run = False
        return delta

"""Tool calls in Jamba's format: checking that a checkpoint's chat template writes them, the
grammar that forces a model to make one, and reading them back out of generated text.

Jamba-1.5/1.6/1.7's chat template (the `chat_template` of the ai21labs checkpoints'
tokenizer_config.json) lists the `tools` in its first system turn, between <tool_definitions>
and </tool_definitions>, and writes an assistant's calls after its text as

    <tool_calls>[
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Rome"}}
    ]</tool_calls>

which is how the models answer when they call a tool (vLLM's `jamba` tool parser reads the same
block; in Jamba's vocabulary both tags are special tokens). The demo checkpoints' template writes
tool calls the same way (stages/demo.py). Nothing here trusts that: `ToolCallFormat.of` renders a
probe conversation through the checkpoint's template and refuses tools unless the template lists
them and writes a call exactly so, and it learns what the template puts between the assistant's
turn header and the block (" " for Jamba, nothing for the demo).

Three uses, one format:
- `tool_choice: "required"` or a named function: `grammar` is a Lark grammar (llguidance's
  dialect, stages/grammar.py) that forces the block, each call's name one of the allowed functions
  and its arguments valid against that function's `parameters` schema (`%json {...}`);
- `tool_choice: "auto"`: `ToolCallScanner` finds blocks in the generated text as it streams,
  holding back text while it could be the start of one, as vLLM's parsers do;
- both: a block that parses (a JSON list of {"name", "arguments"} naming a known function)
  becomes `ToolCall`s; one that does not stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from stages.tokenizer import ChatTemplateError

START, END = "<tool_calls>", "</tool_calls>"
OPEN, SEPARATOR, CLOSE = "[\n    ", ",\n    ", "\n]"  # around and between the calls, as the template writes them
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
# Arguments as the template writes them (`tojson`, i.e. json.dumps): ", " and ": ", no other whitespace.
ARGUMENTS_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: parameters omitted


class ToolsUnsupported(ValueError):
    """The checkpoint's chat template does not render tools, or not in Jamba's format."""


@dataclass(frozen=True)
class Function:
    """A function the model may call: its name and its arguments' JSON Schema."""

    name: str
    parameters: dict = field(default_factory=lambda: dict(NO_PARAMETERS))

    def as_tool(self, description: str | None = None) -> dict:
        """OpenAI's tool definition, as chat templates take it."""
        fn = {"name": self.name, **({"description": description} if description else {}), "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (what OpenAI's `function.arguments` is)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ToolCallFormat:
    lead: str  # what the template writes between the assistant's turn header and START
    special: dict[str, int]  # START/END -> token id, where the tokenizer has them as special tokens

    @classmethod
    def of(cls, tokenizer) -> ToolCallFormat:
        """The format of `tokenizer`'s chat template, checked on a probe conversation; raises
        ToolsUnsupported saying what the template does not do."""
        probe = Function("probe")
        user = [{"role": "user", "content": "?"}]
        call = {"id": "call_0", "type": "function", "function": {"name": probe.name, "arguments": "{}"}}
        try:
            asked = tokenizer.apply_chat_template(user, add_generation_prompt=True)
            listed = tokenizer.apply_chat_template(user, add_generation_prompt=True, tools=[probe.as_tool()])
            answered = tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": "", "tool_calls": [call]}], add_generation_prompt=False)
        except ChatTemplateError as e:
            raise ToolsUnsupported(f"the model's chat template fails on tools: {e}") from None
        if listed == asked:
            raise ToolsUnsupported("the model's chat template does not render tools")
        block = START + OPEN + _call_text(probe.name, "{}") + CLOSE + END
        at = answered.find(block, len(asked))
        if not answered.startswith(asked) or at < 0:
            raise ToolsUnsupported(f"the model's chat template does not write tool calls as {START}[...]{END}")
        special = {}
        for tag in (START, END):
            token = tokenizer.token_to_id(tag)
            if token is not None and tokenizer.decode([token], skip_special_tokens=True) == "":
                special[tag] = token
        return cls(answered[len(asked) : at], special)

    # ---- forcing a call -------------------------------------------------------------------------
    def grammar(self, functions: list[Function], parallel: bool = True) -> str:
        """A Lark grammar for the assistant's answer: one tool-call block (with `parallel`, one or
        more calls in it), each call to one of `functions` with arguments valid against its schema."""
        lines = [
            "start: " + " ".join(([_literal(self.lead)] if self.lead else []) + [
                self._tag(START), _literal(OPEN), "call", *([f"({_literal(SEPARATOR)} call)*"] if parallel else []),
                _literal(CLOSE), self._tag(END)]),
            "call: " + " | ".join(f"call_{i}" for i in range(len(functions))),
        ]
        for i, f in enumerate(functions):
            head, tail = _call_text(f.name, "\0").split("\0")
            lines.append(f"call_{i}: {_literal(head)} arguments_{i} {_literal(tail)}")
            lines.append(f"arguments_{i}: %json " + json.dumps({**f.parameters, "x-guidance": ARGUMENTS_JSON}))
        return "\n".join(lines) + "\n"

    def _tag(self, tag: str) -> str:
        # A special token is named by its id (llguidance's `<[id]>`); plain text is a literal.
        return f"<[{self.special[tag]}]>" if tag in self.special else _literal(tag)

    # ---- reading calls back ---------------------------------------------------------------------
    def piece(self, token_id: int, text: str) -> str:
        """A streamed token's text, the tags included (a special token's text is otherwise skipped)."""
        for tag, special_id in self.special.items():
            if token_id == special_id:
                return tag
        return text

    def output_text(self, output_ids: list[int], text: str, tokenizer) -> str:
        """A whole output's text with its tags: `text` (the decoded output) unless the output has
        special tag tokens, which decoding skipped; then it is decoded again around them."""
        specials = {v: k for k, v in self.special.items()}
        if not specials or not any(t in specials for t in output_ids):
            return text
        out, run = [], []
        for t in output_ids:
            if t in specials:
                out += [tokenizer.decode(run), specials[t]]
                run = []
            else:
                run.append(t)
        return "".join(out) + tokenizer.decode(run)

    def parse(self, text: str, functions: list[Function]) -> tuple[str | None, list[ToolCall]]:
        """A whole answer: its text outside tool-call blocks, and its calls. With calls, text that
        is only whitespace is None (OpenAI's `content: null`)."""
        scanner = ToolCallScanner(functions)
        content, calls = scanner.push(text)
        content += scanner.finish()
        return (None if calls and not content.strip() else content), calls


class ToolCallReader:
    """The tool calls in one request's answers, whole or streamed (`scanner()` per choice)."""

    def __init__(self, format: ToolCallFormat, functions: list[Function], tokenizer) -> None:
        self.format, self.functions, self.tokenizer = format, functions, tokenizer

    def whole(self, output_ids: list[int], text: str) -> tuple[str | None, list[ToolCall]]:
        return self.format.parse(self.format.output_text(output_ids, text, self.tokenizer), self.functions)

    def scanner(self) -> ToolCallScanner:
        return ToolCallScanner(self.functions, self.format)


class ToolCallScanner:
    """Finds tool-call blocks in text that arrives in pieces. `push` returns the text that is
    final (not part of a block, and not possibly the start of one) and the calls of the blocks
    that closed; a block that does not parse is given back as text."""

    def __init__(self, functions: list[Function], format: ToolCallFormat | None = None) -> None:
        self.names = {f.name for f in functions}
        self.format = format
        self.held = ""  # text not yet given out: a block in progress, or what may start one
        self.in_block = False

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self.held += text
        out, calls = [], []
        while True:
            if not self.in_block:
                at = self.held.find(START)
                if at < 0:  # keep what may still become whitespace + START
                    keep = _possible_start(self.held)
                    out.append(self.held[: len(self.held) - keep])
                    self.held = self.held[len(self.held) - keep :]
                    break
                # Whitespace before a block is the template's, not content: it goes with the block.
                text = self.held[:at].rstrip()
                out.append(text)
                self.held, self.in_block = self.held[len(text) :], True
            start = self.held.find(START)
            end = self.held.find(END, start + len(START))
            if end < 0:
                break
            block, self.held, self.in_block = self.held[: end + len(END)], self.held[end + len(END) :], False
            parsed = self._calls(block[start + len(START) : -len(END)])
            if parsed is None:  # not a call after all: text, whitespace and all
                out.append(block)
            else:
                calls += parsed
        return "".join(out), calls

    def push_token(self, token_id: int, text: str) -> tuple[str, list[ToolCall]]:
        """`push` for a streamed token (its text, or its tag where it is a special tag token)."""
        return self.push(self.format.piece(token_id, text) if self.format else text)

    def finish(self) -> str:
        """The text still held back (an unclosed block, a partial tag): it was text after all."""
        rest, self.held, self.in_block = self.held, "", False
        return rest

    def _calls(self, inner: str) -> list[ToolCall] | None:
        try:
            items = json.loads(inner)
        except (ValueError, RecursionError):
            return None
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or not items:
            return None
        calls = []
        for item in items:
            if not isinstance(item, dict) or item.get("name") not in self.names:
                return None
            arguments = item.get("arguments", {})
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False)))
        return calls


def _call_text(name: str, arguments: str) -> str:
    return '{"name": ' + json.dumps(name) + ', "arguments": ' + arguments + "}"


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a Lark string literal


def _possible_start(text: str) -> int:
    """How many characters at the end of `text` could be whitespace then the beginning of START."""
    for n in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-n:]):
            stripped = text[: len(text) - n]
            return n + len(stripped) - len(stripped.rstrip())
    return len(text) - len(text.rstrip())

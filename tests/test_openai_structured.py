"""The OpenAI API's structured output, tool calling, top_logprobs and logits processors, end to
end: Ray Serve's real HTTP port on loopback, the official `openai` package as the client, the
trained demo model in a 2-stage pipeline. The tool-call format (cluster/serve/tool_calls.py) is
also checked on its own, on strings and on a tokenizer whose tags are special tokens, as Jamba's are.

Constrained decoding makes even this fortune-cookie model answer in valid JSON: every output is
parsed and validated with `jsonschema`, greedy and sampled, whole and streamed."""

from __future__ import annotations

import json
import shutil

import httpx2 as httpx  # what the openai package itself uses
import jsonschema
import openai
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from cluster.serve.tool_calls import Function, ToolCallFormat, ToolCallScanner, ToolsUnsupported
from stages.grammar import Grammars
from stages.sequence import Structure
from stages.tokenizer import Tokenizer

from .harness import free_port, serve_apps

TIMEOUT_S = 120.0

SCHEMA = {  # enums, integer ranges, nested arrays with min/max items, no other properties
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad", "calm"]},
        "score": {"type": "integer", "minimum": -5, "maximum": 12},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "grid": {"type": "array", "minItems": 1, "maxItems": 2,
                 "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                           "minItems": 2, "maxItems": 2}},
        "ok": {"type": "boolean"},
    },
    "required": ["mood", "score", "tags", "grid", "ok"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
         "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": CLOCK}}]
PARAMETERS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Rome this week?"}]


# ---- the tool-call format on its own ---------------------------------------------------------------------
def test_tool_call_format_of_the_demo_template(models):
    """The demo template writes Jamba's block right after the assistant's header; the forcing grammar
    compiles and accepts exactly such a block."""
    tok = Tokenizer.from_dir(models[0])
    fmt = ToolCallFormat.of(tok)
    assert fmt.lead == "" and fmt.special == {}
    functions = [Function("get_weather", WEATHER), Function("noop")]
    matcher = Grammars(tok.to_json(), 4096, [tok.eos_token_id]).matcher(Structure("lark", fmt.grammar(functions)))
    block = ('<tool_calls>[\n    {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},\n'
             '    {"name": "noop", "arguments": {}}\n]</tool_calls>')
    for token in tok.encode(block, add_special_tokens=False):
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting()
    content, calls = fmt.parse(block, functions)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2}), ("noop", {})]
    assert all(c.id.startswith("call_") for c in calls)
    single = fmt.grammar(functions, parallel=False)  # parallel_tool_calls: false: exactly one call
    assert "call)*" not in single and "call)*" in fmt.grammar(functions)

    plain = Tokenizer.from_dir(models[0])
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a template that ignores tools
    with pytest.raises(ToolsUnsupported, match="does not render tools"):
        ToolCallFormat.of(plain)


JAMBA_SHAPED = (  # headers as Jamba's (`<|role|>`, a space before content, none after the assistant's), tags special
    "{{ bos_token }}{% if tools %}<|im_start|>system{{ ' ' + (tools | tojson) }}<|im_end|>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] + ' ' + (m['content'] or '') }}"
    "{% if m['tool_calls'] %}<tool_calls>{{ '[\\n    ' }}{% for c in m['tool_calls'] %}"
    "{{ '{\"name\": \"' + c['function']['name'] + '\", \"arguments\": ' + c['function']['arguments'] + '}' }}"
    "{{ ',\\n    ' if not loop.last else '\\n' }}{% endfor %}]</tool_calls>{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def test_tool_call_format_with_special_tag_tokens(models, tmp_path):
    """Jamba's tags are special tokens: decoding skips them, so the format names them by id in the
    grammar (llguidance's <[id]>), puts them back into streamed and whole text, and forces the
    space the template writes before the block."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(models[0] / name, tmp_path / name)
    backend = Backend.from_file(str(tmp_path / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("<tool_calls>", special=True), AddedToken("</tool_calls>", special=True)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(JAMBA_SHAPED)
    tok = Tokenizer.from_dir(tmp_path)
    start, end = tok.token_to_id("<tool_calls>"), tok.token_to_id("</tool_calls>")
    fmt = ToolCallFormat.of(tok)
    assert fmt.lead == " " and fmt.special == {"<tool_calls>": start, "</tool_calls>": end}
    functions = [Function("get_weather", WEATHER)]
    grammar = fmt.grammar(functions)
    assert f"<[{start}]>" in grammar and f"<[{end}]>" in grammar
    ids = (tok.encode(" ", add_special_tokens=False) + [start]
           + tok.encode('[\n    {"name": "get_weather", "arguments": {"city": "Rome", "days": 7}}\n]',
                        add_special_tokens=False) + [end])
    matcher = Grammars(tok.to_json(), tok.vocab_size, [tok.eos_token_id]).matcher(Structure("lark", grammar))
    for token in ids:
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting()
    decoded = tok.decode(ids)  # what the engine's text is: the tags skipped
    assert "<tool_calls>" not in decoded
    content, calls = fmt.parse(fmt.output_text(ids, decoded, tok), functions)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome", "days": 7})]
    scanner = ToolCallScanner(functions, fmt)
    streamed, found = "", []
    for token in ids:
        text, calls = scanner.push_token(token, tok.decode([token]))
        streamed, found = streamed + text, found + calls
    assert streamed + scanner.finish() == "" and [c.arguments for c in found] == ['{"city": "Rome", "days": 7}']


VLLM_JAMBA_OUTPUTS = [  # vLLM's tests of its `jamba` tool parser (tests/tool_use/test_jamba_tool_parser.py)
    (' <tool_calls>[\n    {"name": "get_current_weather", "arguments": {"city": "Dallas", "state": "TX", '
     '"unit": "fahrenheit"}}\n]</tool_calls>', None, 1),
    (' Sure! let me call the tool for you.<tool_calls>[\n    {"name": "get_current_weather", "arguments": '
     '{"city": "Dallas", "state": "TX", "unit": "fahrenheit"}}\n]</tool_calls>', " Sure! let me call the tool for you.", 1),
    (' <tool_calls>[\n    {"name": "get_current_weather", "arguments": {"city": "Dallas", "state": "TX", '
     '"unit": "fahrenheit"}},\n    {"name": "get_current_weather", "arguments": {"city": "Orlando", '
     '"state": "FL", "unit": "fahrenheit"}}\n]</tool_calls>', None, 2),
    ("This is a test", "This is a test", 0),
    ("No <tool_calls>[not json]</tool_calls> here", "No <tool_calls>[not json]</tool_calls> here", 0),
    ('<tool_calls>[{"name": "unknown_fn", "arguments": {}}]</tool_calls>',
     '<tool_calls>[{"name": "unknown_fn", "arguments": {}}]</tool_calls>', 0),
    ("cut short <tool_calls>[{\"name\": \"get_cur", "cut short <tool_calls>[{\"name\": \"get_cur", 0),
    ("ends with a partial tag <tool_", "ends with a partial tag <tool_", 0),
]


@pytest.mark.parametrize("text, content, n_calls", VLLM_JAMBA_OUTPUTS)
def test_tool_call_parsing_on_strings(text, content, n_calls):
    """Blocks parse into calls (content: the text outside them, None if only whitespace); what is
    not a well-formed block of known functions stays text. Streamed a character at a time, the
    scanner gives the same text and calls."""
    functions = [Function("get_current_weather", {"type": "object"})]
    fmt = ToolCallFormat("", {})
    got, calls = fmt.parse(text, functions)
    assert got == content and len(calls) == n_calls
    assert all(json.loads(c.arguments)["state"] in ("TX", "FL") for c in calls)
    scanner = ToolCallScanner(functions)
    pieces, streamed = [], []
    for ch in text:
        piece, found = scanner.push(ch)
        pieces.append(piece)
        streamed += found
    whole = "".join(pieces) + scanner.finish()
    assert (None if streamed and not whole.strip() else whole) == content
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]


# ---- end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_url(models):
    lm, _ = models
    port = free_port()
    apps = {"lm": {"model": str(lm), "stages": 2, "layer_split": "3,5", "cpus_per_stage": 0.25, "num_slots": 16,
                   "max_batch_tokens": 64, "route_prefix": "/", "request_timeout_s": TIMEOUT_S}}
    with serve_apps(apps, http_port=port, http_request_timeout_s=TIMEOUT_S):
        yield f"http://127.0.0.1:{port}"


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def _streamed_chat(c, **kw) -> tuple[str | None, dict[int, dict], str, list]:
    """A streamed chat answer reassembled: content, tool calls by index, finish_reason, logprobs."""
    content, calls, reason, logprobs = "", {}, None, []
    for chunk in c.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                got = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                if call.id:
                    assert got["id"] is None and call.type == "function"  # the id and name come once
                    got["id"], got["name"] = call.id, call.function.name
                got["arguments"] += call.function.arguments or ""
            if choice.logprobs is not None:
                logprobs += choice.logprobs.content or []
            reason = choice.finish_reason or reason
    return content, calls, reason, logprobs


def test_json_schema_outputs_validate(base_url):
    """response_format json_schema (chat) and vLLM's structured_outputs / guided_json (completions):
    every answer parses and validates, greedy and sampled, whole and streamed (the same text)."""
    c = client(base_url)
    fmt = {"type": "json_schema", "json_schema": {"name": "fortune", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Describe your mood as JSON."}]
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=7, n=3), dict(temperature=1.3, top_p=0.95, seed=2)):
        got = c.chat.completions.create(model="lm", messages=messages, max_tokens=200, response_format=fmt, **kw)
        for choice in got.choices:
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
            assert choice.finish_reason == "stop"
        if kw.get("n", 1) == 1:
            content, _, reason, _ = _streamed_chat(c, model="lm", messages=messages, max_tokens=200,
                                                   response_format=fmt, **kw)
            assert content == got.choices[0].message.content and reason == "stop"
    for extra in ({"structured_outputs": {"json": SCHEMA}}, {"guided_json": json.dumps(SCHEMA)}):
        for kw in (dict(temperature=0), dict(temperature=1.0, seed=3)):
            got = c.completions.create(model="lm", prompt="A fortune as JSON:", max_tokens=200, extra_body=extra, **kw)
            jsonschema.validate(json.loads(got.choices[0].text), SCHEMA)
            streamed = "".join(ch.choices[0].text for ch in c.completions.create(
                model="lm", prompt="A fortune as JSON:", max_tokens=200, extra_body=extra, stream=True, **kw))
            assert streamed == got.choices[0].text


def test_json_object_regex_choice_and_grammar(base_url):
    """json_object, and vLLM's regex, choice and (Lark) grammar constraints, greedy and sampled."""
    c = client(base_url)
    # Any JSON object: the fortune model fills a string for ever unless the closing quote and brace
    # are favoured (logit_bias applies after the grammar's mask, so it composes with it).
    closers = {"7": 8, "98": 8}  # the ids of '"' and '}' in the demo vocabulary
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=1.0, seed=4)):
        got = c.chat.completions.create(model="lm", messages=[{"role": "user", "content": "JSON please"}], max_tokens=150,
                                        response_format={"type": "json_object"}, logit_bias=closers, **kw)
        assert isinstance(json.loads(got.choices[0].message.content), dict) and got.choices[0].finish_reason == "stop"
    rambling = c.chat.completions.create(model="lm", messages=[{"role": "user", "content": "JSON please"}],
                                         max_tokens=20, temperature=0, response_format={"type": "json_object"})
    assert rambling.choices[0].message.content.startswith('{"')
    cases = [({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2,4}"}}, r"^[0-9]{3}-[a-z]{2,4}$"),
             ({"guided_choice": ["yes", "no", "maybe so"]}, r"^(yes|no|maybe so)$"),
             ({"structured_outputs": {"grammar": 'start: "Q" /[0-9]/ "-" ("a" | "b")'}}, r"^Q[0-9]-(a|b)$")]
    for extra, pattern in cases:
        for kw in (dict(temperature=0), dict(temperature=1.0, seed=11)):
            text = c.completions.create(model="lm", prompt="Answer:", max_tokens=20, extra_body=extra, **kw).choices[0].text
            assert __import__("re").fullmatch(pattern, text), (extra, text)
    plain = c.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                      temperature=0, response_format={"type": "text"})
    assert plain.choices[0].message.content


def _check_calls(calls: list[tuple[str, str]], names: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def test_tool_choice_required_and_named(base_url, models):
    """A forced call: finish_reason tool_calls, arguments that validate, streamed deltas (id and name,
    then arguments) that reassemble to the same calls. Greedy and sampled."""
    c = client(base_url)
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        for kw in (dict(temperature=0), dict(temperature=1.0, seed=5, n=2), dict(temperature=1.0, seed=9,
                                                                               parallel_tool_calls=False)):
            got = c.chat.completions.create(model="lm", messages=ASK, tools=TOOLS, tool_choice=choice,
                                            max_tokens=120, **kw)
            for ch in got.choices:
                assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
                assert all(call.id.startswith("call_") and call.type == "function" for call in ch.message.tool_calls)
                _check_calls([(t.function.name, t.function.arguments) for t in ch.message.tool_calls], names)
                if kw.get("parallel_tool_calls") is False:
                    assert len(ch.message.tool_calls) == 1
            if kw.get("n", 1) == 1:
                content, calls, reason, _ = _streamed_chat(c, model="lm", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                           max_tokens=120, **kw)
                assert reason == "tool_calls" and content == ""
                assert [(v["name"], v["arguments"]) for _, v in sorted(calls.items())] == \
                    [(t.function.name, t.function.arguments) for t in got.choices[0].message.tool_calls]

    # The answer goes back through the template: an assistant's tool_calls and the tool's answer.
    call = got.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"time": "12:00"}'}]
    again = c.chat.completions.create(model="lm", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    tok = Tokenizer.from_dir(models[0])
    rendered = [{**m, "content": m["content"] or ""} for m in history]
    assert again.usage.prompt_tokens == len(tok.encode_chat(rendered, tools=TOOLS))
    assert again.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_auto_reads_the_models_text(base_url):
    """auto: the model's own text is read for a block. The toy model never writes one by itself, so a
    grammar (structured_outputs) makes it write text then a block: the block becomes tool_calls, the
    text stays content; without the block the answer is plain content."""
    c = client(base_url)
    grammar = ('start: /[a-z ]{1,12}/ "<tool_calls>[\\n    {\\"name\\": \\"get_weather\\", \\"arguments\\": " '
               'args "}\\n]</tool_calls>"\nargs: %json ' + json.dumps(
                   {**WEATHER, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}))
    kw = dict(model="lm", messages=ASK, tools=TOOLS, max_tokens=120, temperature=0,
              extra_body={"structured_outputs": {"grammar": grammar}})
    got = c.chat.completions.create(**kw)
    [ch] = got.choices
    assert ch.finish_reason == "tool_calls" and ch.message.content and "<tool_calls>" not in ch.message.content
    _check_calls([(t.function.name, t.function.arguments) for t in ch.message.tool_calls], {"get_weather"})
    content, calls, reason, _ = _streamed_chat(c, **kw)
    assert content == ch.message.content and reason == "tool_calls"
    assert [(v["name"], v["arguments"]) for v in calls.values()] == [("get_weather", ch.message.tool_calls[0].function.arguments)]

    plain = c.chat.completions.create(model="lm", messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=12,
                                      temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    assert plain.choices[0].finish_reason in ("stop", "length")
    none = c.chat.completions.create(model="lm", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=12,
                                     temperature=0)
    bare = c.chat.completions.create(model="lm", messages=ASK, max_tokens=12, temperature=0)
    assert none.choices[0].message.content == bare.choices[0].message.content  # "none": tools are not listed
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens < plain.usage.prompt_tokens


def test_top_logprobs(base_url):
    """Chat: top_logprobs alternatives per token, sorted, the greedy choice first with the same
    log-probability as the token's own. Completions: OpenAI's legacy {token: logprob} maps."""
    c = client(base_url)
    kw = dict(model="lm", messages=[{"role": "user", "content": "Tell me a fortune."}], max_tokens=8, temperature=0,
              logprobs=True, top_logprobs=5)
    got = c.chat.completions.create(**kw)
    content = got.choices[0].logprobs.content
    assert len(content) == 8
    for t in content:
        lps = [a.logprob for a in t.top_logprobs]
        assert len(t.top_logprobs) == 5 and lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)
        assert t.top_logprobs[0].bytes == list(t.token.encode("utf-8"))
    _, _, _, streamed = _streamed_chat(c, **kw)
    assert [(t.token, [a.token for a in t.top_logprobs]) for t in streamed] == \
        [(t.token, [a.token for a in t.top_logprobs]) for t in content]
    assert [a.logprob for t in streamed for a in t.top_logprobs] == \
        pytest.approx([a.logprob for t in content for a in t.top_logprobs], abs=1e-5)

    done = c.completions.create(model="lm", prompt="The weather today is", max_tokens=6, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    assert len(lp.top_logprobs) == 6
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(chosen, abs=1e-6)
        assert max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy: the chosen token is the likeliest
    streamed = [top for ch in c.completions.create(model="lm", prompt="The weather today is", max_tokens=6,
                                                   temperature=0, logprobs=3, stream=True)
                for top in (ch.choices[0].logprobs.top_logprobs or [])]
    assert [sorted(t) for t in streamed] == [sorted(t) for t in lp.top_logprobs]
    sampled = c.chat.completions.create(**{**kw, "temperature": 1.0, "seed": 4})
    for t in sampled.choices[0].logprobs.content:  # sampled: the chosen token need not be among the top
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True) and t.logprob <= lps[0] + 1e-6


def test_penalties_logit_bias_and_min_tokens_reach_the_engine(base_url, models):
    """logit_bias +100 forces a token, -100 bans the greedy one; each penalty changes a repetitive
    greedy answer; min_tokens holds back an EOS that logit_bias makes certain."""
    c = client(base_url)
    tok = Tokenizer.from_dir(models[0])
    prompt = "the the the the the the the the the the"
    kw = dict(model="lm", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    base = c.completions.create(**kw).choices[0].text
    forced = c.completions.create(**kw, logit_bias={"100": 100}).choices[0].text
    assert forced == tok.decode([100] * 12)
    first = tok.encode(base, add_special_tokens=False)[0]
    banned = c.completions.create(**kw, logit_bias={str(first): -100}).choices[0].text
    assert tok.encode(banned, add_special_tokens=False)[0] != first
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                    {"extra_body": {"ignore_eos": True, "repetition_penalty": 3.0}}):
        assert c.completions.create(**{**kw, **penalty}).choices[0].text != base, penalty
    eos = {str(tok.eos_token_id): 100}
    at_once = c.completions.create(model="lm", prompt=prompt, max_tokens=12, temperature=0, logit_bias=eos)
    assert at_once.usage.completion_tokens == 1 and at_once.choices[0].finish_reason == "stop"
    later = c.completions.create(model="lm", prompt=prompt, max_tokens=12, temperature=0, logit_bias=eos,
                                 extra_body={"min_tokens": 5})
    assert later.usage.completion_tokens == 6 and later.choices[0].finish_reason == "stop"


# ---- hostile requests ------------------------------------------------------------------------------------
def _c(**kw):
    return ("/completions", {"model": "lm", "prompt": "hi", "max_tokens": 4, **kw})


def _chat(**kw):
    return ("/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw})


def _fn(parameters, name="f"):
    return [{"type": "function", "function": {"name": name, "parameters": parameters}}]


def _nested(depth):
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


MEGABYTE = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200} for i in range(5000)}}
HOSTILE = [  # (name, (path, body), param, message fragment); every one a 400
    ("schema not JSON Schema", _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "frobnicate"}}}), "response_format", "Invalid type"),
    ("unsatisfiable schema", _c(structured_outputs={"json": {"type": "integer", "minimum": 5, "maximum": 2}}),
     "structured_outputs.json", "Unsatisfiable schema"),
    ("schema text not JSON", _c(guided_json="{nope"), "guided_json", "not JSON"),
    ("json_schema without schema", _chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema", "needs json_schema.schema"),
    ("1 MB schema", _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": MEGABYTE}}),
     "response_format", "at most 1048576 characters"),
    ("schema nested 100 deep", _c(guided_json=_nested(100)), "guided_json", "nested more than 64"),
    ("schema a list", _c(guided_json=[[[]]]), "guided_json", "must be a JSON Schema"),
    ("regex matching nothing", _c(structured_outputs={"regex": "[^\\s\\S]"}), "structured_outputs.regex",
     "matches no text"),
    ("bad regex", _c(guided_regex="(a"), "guided_regex", "regex"),
    ("bad grammar", _c(structured_outputs={"grammar": "start: nope"}), "structured_outputs.grammar", "nope"),
    ("empty choice", _c(guided_choice=[]), "guided_choice", "non-empty list"),
    ("two structured_outputs", _c(structured_outputs={"regex": "a", "json_object": True}), "structured_outputs",
     "exactly one of"),
    ("structural_tag", _c(structured_outputs={"structural_tag": "x"}), "structured_outputs.structural_tag",
     "unknown field"),
    ("two constraints", _chat(response_format={"type": "json_object"}, guided_regex="a"), "guided_regex",
     "both constrain"),
    ("unknown response_format", _chat(response_format={"type": "xml"}), "response_format.type", "Input should be"),
    ("top_logprobs 1000", _chat(logprobs=True, top_logprobs=1000), "top_logprobs", "[0, 20]"),
    ("top_logprobs without logprobs", _chat(top_logprobs=2), "top_logprobs", "needs logprobs: true"),
    ("completions logprobs 6", _c(logprobs=6), "logprobs", "between 0 and 5"),
    ("echo with top logprobs", _c(logprobs=2, echo=True), "echo", "use logprobs: 0"),
    ("logit_bias id out of range", _c(logit_bias={"99999": 1}), "logit_bias", "token ids in [0, 4096)"),
    ("logit_bias negative id", _c(logit_bias={"-1": 1}), "logit_bias", "token ids in [0, 4096)"),
    ("logit_bias key not a number", _c(logit_bias={"the": 1}), "logit_bias", "integers, as JSON strings"),
    ("logit_bias huge key", _c(logit_bias={"9" * 5000: 1}), "logit_bias", "integers, as JSON strings"),
    ("logit_bias value", _c(logit_bias={"5": 500}), "logit_bias", "values must be numbers in [-100, 100]"),
    ("presence_penalty 3", _c(presence_penalty=3), "presence_penalty", "[-2, 2]"),
    ("frequency_penalty NaN-free -9", _chat(frequency_penalty=-9), "frequency_penalty", "[-2, 2]"),
    ("repetition_penalty 0", _c(repetition_penalty=0), "repetition_penalty", "(0, 10]"),
    ("min_tokens above max_tokens", _c(min_tokens=9), "min_tokens", "min_tokens must be an integer in [0, max_new_tokens]"),
    ("tools not a list", _chat(tools="get_weather"), "tools", "valid list"),
    ("tool not a function", _chat(tools=[{"type": "retrieval"}]), "tools[0].type", "Input should be 'function'"),
    ("tool without function", _chat(tools=[{"type": "function"}]), "tools[0].function", "is required"),
    ("function name with spaces", _chat(tools=_fn({"type": "object"}, "get weather")), "tools[0].function.name",
     "letters, digits"),
    ("two tools one name", _chat(tools=_fn({"type": "object"}) * 2), "tools[1].function.name", "two tools"),
    ("parameters not JSON Schema", _chat(tools=_fn({"type": "object", "properties": {"a": {"type": "frob"}}})),
     "tools[0].function.parameters", "Invalid type"),
    ("parameters the library rejects", _chat(tools=_fn({"type": "object", "properties": {
        "a": {"type": "string", "format": "no-such-format"}}})), "tools[0].function.parameters", "format"),
    ("parameters not an object", _chat(tools=_fn({"type": "string"})), "tools[0].function.parameters",
     "type: object"),
    ("1 MB parameters", _chat(tools=_fn(MEGABYTE)), "tools[0].function.parameters", "more than 1048576"),
    ("tool_choice names no tool", _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice", "not among tools"),
    ("tool_choice without tools", _chat(tool_choice="required"), "tool_choice", "needs tools"),
    ("tool_choice unknown", _chat(tools=TOOLS, tool_choice="sometimes"), "tool_choice", 'must be "none"'),
    ("tool_choice with response_format", _chat(tools=TOOLS, tool_choice="required",
                                               response_format={"type": "json_object"}), "response_format",
     "cannot be combined"),
    ("tool message without id", _chat(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]),
     "messages[1].tool_call_id", "is required"),
    ("user with tool_calls", _chat(messages=[{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
     "messages[0].tool_calls", "only assistant"),
]


def test_hostile_requests(base_url):
    """Each a 400 naming its field, in OpenAI's error shape; then the service answers as before
    (a 1 MB schema and a deeply nested body included)."""
    c = client(base_url)
    failures = []
    for name, (path, body), param, fragment in HOSTILE:
        try:
            c.post(path, body=body, cast_to=object)
            failures.append(f"{name}: no error")
        except openai.APIStatusError as e:
            err = e.response.json().get("error", {})
            if (e.status_code, err.get("param")) != (400, param) or fragment not in err.get("message", ""):
                failures.append(f"{name}: got {e.status_code} {err}")
    assert not failures, "\n".join(failures)
    deep = '{"model": "lm", "prompt": "hi", "guided_json": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(f"{base_url}/v1/completions", content=deep, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "nests too deeply" in r.json()["error"]["message"], r.text
    got = c.chat.completions.create(model="lm", messages=ASK, max_tokens=100, temperature=0,
                                    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    jsonschema.validate(json.loads(got.choices[0].message.content), SCHEMA)

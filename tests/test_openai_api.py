"""The OpenAI-compatible HTTP API end to end: Ray Serve's real HTTP port on loopback, the official
`openai` package as the client, `jamba generate` on the same checkpoint as the reference.

Applications: "lm" at the root (base URL http://HOST:PORT/v1, as OpenAI clients expect); "tiny"
with one slot and a queue of one, so a full queue is two requests away; "down", whose stage is
killed for good to see a failed pipeline; "cls", a classifier. Serve's HTTP request timeout is
15 s, which the replicas also take as the deadline of what they run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx2 as httpx  # what the openai package itself uses
import openai
import pytest
from ray import serve

from cluster.cli.main import main as jamba_main
from stages.tokenizer import Tokenizer

from .harness import free_port, serve_apps, until

TIMEOUT_S = 15.0
PROMPTS = ["The weather today is", "Cooking rice takes", "Trains leave at noon and"]


@pytest.fixture(scope="module")
def base_url(models):
    lm, cls = models
    port = free_port()
    small = {"model": str(lm), "stages": 1, "cpus_per_stage": 0.25}
    apps = {
        "lm": {"model": str(lm), "stages": 2, "layer_split": "3,5", "cpus_per_stage": 0.25, "num_slots": 16,
               "max_batch_tokens": 64, "route_prefix": "/", "request_timeout_s": TIMEOUT_S},
        "tiny": {**small, "num_slots": 1, "max_queue": 1, "route_prefix": "/tiny"},
        "down": {**small, "max_restarts": 0, "health_check_period_s": 600, "route_prefix": "/down"},
        "cls": {"model": str(cls), "stages": 1, "cpus_per_stage": 0.25, "route_prefix": "/cls"},
    }
    with serve_apps(apps, http_port=port, http_request_timeout_s=TIMEOUT_S):
        yield f"http://127.0.0.1:{port}"


def client(base_url: str, prefix: str = "", **kw) -> openai.OpenAI:
    # max_retries=0: the client would otherwise retry 429, 408 and 5xx on its own.
    return openai.OpenAI(base_url=f"{base_url}{prefix}/v1", api_key="unused", max_retries=0,
                         timeout=kw.pop("timeout", 120), **kw)


def jamba_generate(model_dir, tmp_path, rows: list[dict], task: str = "generate") -> list[dict]:
    """`jamba generate` (or score) on the same checkpoint, in one process: the reference."""
    inp, out = tmp_path / f"{task}-in.jsonl", tmp_path / f"{task}-out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert jamba_main([task, "--model", str(model_dir), "--input", str(inp), "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _stats(app: str) -> dict:
    return serve.get_app_handle(app).stats.remote().result()


def _idle(app: str) -> dict:
    def check():
        s = _stats(app)
        return s if s["scheduler"]["slots_in_use"] == 0 and all(st["used_slots"] == 0 for st in s["stages"]) else None
    return until(check, timeout=90, what=f"{app}'s slots to be freed")


# ---- the same tokens as jamba generate -----------------------------------------------------------------
def test_completions_match_jamba_generate(base_url, models, tmp_path):
    lm, _ = models
    rows = [{"prompt": p, "max_new_tokens": 6 + i} for i, p in enumerate(PROMPTS)]
    rows += [{"input_ids": [1, 40, 41, 42, 43], "max_new_tokens": 5},
             {"prompt": PROMPTS[0], "max_new_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 11}]
    want = jamba_generate(lm, tmp_path, rows)
    tok = Tokenizer.from_dir(lm)
    c = client(base_url)
    for row, w in zip(rows, want):
        kw = dict(model="lm", prompt=row.get("prompt") or row.get("input_ids"), max_tokens=row["max_new_tokens"],
                  temperature=row.get("temperature", 0), top_p=row.get("top_p"), seed=row.get("seed"))
        kw = {k: v for k, v in kw.items() if v is not None}
        got = c.completions.create(**kw)
        [choice] = got.choices
        assert choice.text == w["text"] and choice.finish_reason == w["finish_reason"]
        prompt_len = len(row["input_ids"]) if "input_ids" in row else None
        assert got.usage.completion_tokens == len(w["output_ids"])
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        if prompt_len is not None:
            assert got.usage.prompt_tokens == prompt_len
        assert got.model == "lm" and got.object == "text_completion"

        chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == w["text"]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == w["finish_reason"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(w["output_ids"])
        assert chunks[-1].usage.prompt_tokens == got.usage.prompt_tokens

        if "prompt" in row:
            assert got.usage.prompt_tokens == len(tok.encode(row["prompt"]))

    # A list of prompts: one choice each, in order; usage adds up.
    want = jamba_generate(lm, tmp_path, [{"prompt": p, "max_new_tokens": 6} for p in PROMPTS])
    batch = c.completions.create(model="lm", prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1, 2]
    assert [ch.text for ch in batch.choices] == [w["text"] for w in want]
    assert batch.usage.completion_tokens == sum(len(w["output_ids"]) for w in want)
    assert batch.usage.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)


def test_chat_matches_jamba_generate(base_url, models, tmp_path):
    lm, _ = models
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    [w] = jamba_generate(lm, tmp_path, [{"messages": messages, "max_new_tokens": 7}])
    c = client(base_url)
    got = c.chat.completions.create(model="lm", messages=messages, max_tokens=7, temperature=0)
    assert got.choices[0].message.content == w["text"] and got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == w["finish_reason"]
    assert got.usage.completion_tokens == len(w["output_ids"]) and got.object == "chat.completion"
    parts = [{"type": "text", "text": "Say hello."}]  # content as parts is the same prompt
    again = c.chat.completions.create(model="lm", messages=[messages[0], {"role": "user", "content": parts}],
                                      max_completion_tokens=7, temperature=0)
    assert again.choices[0].message.content == w["text"]

    chunks = list(c.chat.completions.create(model="lm", messages=messages, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == w["text"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == w["finish_reason"]
    assert chunks[-1].usage.completion_tokens == len(w["output_ids"])
    assert chunks[-1].usage.prompt_tokens == got.usage.prompt_tokens


def test_logprobs_echo_and_n(base_url, models, tmp_path):
    lm, _ = models
    [w] = jamba_generate(lm, tmp_path, [{"prompt": PROMPTS[1], "max_new_tokens": 5, "logprobs": True}])
    [s] = jamba_generate(lm, tmp_path, [{"prompt": PROMPTS[1]}], task="score")
    c = client(base_url)
    got = c.completions.create(model="lm", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=0)
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(w["logprobs"], abs=1e-4)
    assert len(got.choices[0].logprobs.tokens) == 5

    echo = c.completions.create(model="lm", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=0, echo=True)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text == PROMPTS[1] + w["text"]
    n_prompt = len(s["token_logprobs"])
    assert lp.token_logprobs[0] is None and len(lp.tokens) == n_prompt + 5
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(s["token_logprobs"][1:], abs=1e-4)
    assert lp.token_logprobs[n_prompt:] == pytest.approx(w["logprobs"], abs=1e-4)

    chat = c.chat.completions.create(model="lm", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                     temperature=0, logprobs=True)
    assert len(chat.choices[0].logprobs.content) == 4
    assert all(t.logprob <= 0 and t.top_logprobs == [] for t in chat.choices[0].logprobs.content)

    # n choices: seeded, each its own seed (choice 0 is what n=1 gives); usage counts them all.
    kw = dict(model="lm", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    one = c.completions.create(**kw)
    three = c.completions.create(**kw, n=3)
    assert [ch.index for ch in three.choices] == [0, 1, 2] and three.choices[0].text == one.choices[0].text
    assert three.usage.completion_tokens == 18 and three.usage.prompt_tokens == one.usage.prompt_tokens
    streamed: dict[int, str] = {}
    for ch in c.completions.create(**kw, n=3, stream=True):
        for choice in ch.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {i: three.choices[i].text for i in range(3)}


def test_cached_tokens_in_usage(base_url):
    """usage.prompt_tokens_details.cached_tokens, as OpenAI reports prompt caching: the second
    time a long prompt comes, its full blocks come from the prefix cache; the answer is the same."""
    c = client(base_url)
    prompt = "A question asked twice, about the tides of a long grey sea, " * 9
    kw = dict(model="lm", prompt=prompt, max_tokens=5, temperature=0)
    first, again = c.completions.create(**kw), c.completions.create(**kw)
    assert again.choices[0].text == first.choices[0].text
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hit = (first.usage.prompt_tokens - 1) // 64 * 64
    assert hit >= 128 and again.usage.prompt_tokens_details.cached_tokens == hit
    chat = dict(model="lm", messages=[{"role": "user", "content": prompt}], max_tokens=3, temperature=0)
    c.chat.completions.create(**chat)
    chunks = list(c.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 128


def test_models_and_health(base_url):
    c = client(base_url)
    assert [m.id for m in c.models.list().data] == ["lm"]
    assert c.models.retrieve("lm").id == "lm"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    assert [m.id for m in client(base_url, "/cls").models.list().data] == ["cls"]
    r = httpx.get(f"{base_url}/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


# ---- errors -----------------------------------------------------------------------------------------------
def _c(**kw):  # a completions request body
    return ("/completions", {"model": "lm", "prompt": "hi", "max_tokens": 2, **kw})


def _chat(**kw):
    return ("/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                     **kw})


HOSTILE = [  # (name, (path, body), status, param, message fragment)
    ("empty prompt", _c(prompt=""), 400, "prompt", "prompt is empty"),
    ("no prompts", _c(prompt=[]), 400, "prompt", "prompt is empty"),
    ("token id too big", _c(prompt=[1, 4096]), 400, "prompt", "out of range [0, 4096)"),
    ("negative token id", _c(prompt=[1, -5]), 400, "prompt", "out of range"),
    ("huge token id", _c(prompt=[2**62]), 400, "prompt", "out of range"),
    ("mixed prompt list", _c(prompt=[[1], "x"]), 400, "prompt", "prompt must be a string, a list of strings"),
    ("prompt a number", _c(prompt=7), 400, "prompt", "prompt must be a string"),
    ("second prompt bad", _c(prompt=["ok", ""]), 400, "prompt[1]", "prompt[1] is empty"),
    ("10,000 prompts", _c(prompt=["hi"] * 10_000), 400, "prompt", "at most 256"),
    ("prompt over context", _c(prompt=[1] * 5000), 400, "prompt", "more than the context of 4096"),
    ("max_tokens 0", _c(max_tokens=0), 400, "max_tokens", "max_tokens must be a positive integer"),
    ("max_tokens negative", _c(max_tokens=-3), 400, "max_tokens", "max_tokens must be"),
    ("max_tokens absurd", _c(max_tokens=10**12), 400, "max_tokens", "more than the context"),
    ("max_tokens a string", _c(max_tokens="8"), 400, "max_tokens", "valid integer"),
    ("temperature negative", _c(temperature=-0.1), 400, "temperature", "temperature must be"),
    ("temperature a string", _c(temperature="hot"), 400, "temperature", "valid number"),
    ("top_p zero", _c(top_p=0.0), 400, "top_p", "top_p must be in (0, 1]"),
    ("top_p above one", _c(top_p=1.01), 400, "top_p", "top_p must be"),
    ("top_k negative", _c(top_k=-1), 400, "top_k", "top_k must be"),
    ("seed negative", _c(seed=-1), 400, "seed", "seed must be"),
    ("empty stop string", _c(stop=[""]), 400, "stop", "stop must be a list of non-empty strings"),
    ("huge stop list", _c(stop=["x"] * 10_000), 400, "stop", "at most 64"),
    ("stop a number", _c(stop=3), 400, "stop", "stop must be a string or a list of strings"),
    ("stop id out of range", _c(stop_token_ids=[9999]), 400, "stop_token_ids", "stop_token_ids must be token ids"),
    ("n zero", _c(n=0), 400, "n", "n must be between 1 and 16"),
    ("n huge", _c(n=1000), 400, "n", "n must be between"),
    ("logprobs above 5", _c(logprobs=6), 400, "logprobs", "logprobs must be between 0 and 5"),
    ("presence penalty", _c(presence_penalty=2.5), 400, "presence_penalty", "presence_penalty must be in [-2, 2]"),
    ("logit bias", _c(logit_bias={"4096": 5}), 400, "logit_bias", "logit_bias keys must be token ids"),
    ("suffix", _c(suffix="x"), 400, "suffix", "not supported"),
    ("best_of", _c(best_of=3), 400, "best_of", "not supported"),
    ("unknown field", _c(foo=1), 400, "foo", "foo: unknown field"),
    ("stream_options without stream", _c(stream_options={"include_usage": True}), 400, "stream_options",
     "only allowed with stream"),
    ("no model", ("/completions", {"prompt": "hi"}), 400, "model", "model is required"),
    ("unknown model", _c(model="gpt-5"), 404, "model", "the model 'gpt-5' does not exist"),
    ("no messages", _chat(messages=[]), 400, "messages", "messages is empty"),
    ("unknown chat role", _chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages", "wizard"),
    ("empty chat role", _chat(messages=[{"role": "", "content": "x"}]), 400, "messages", "messages"),
    ("image content", _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "messages[0].content", "must be a string or a list of"),
    ("message without role", _chat(messages=[{"content": "x"}]), 400, "messages[0].role", "is required"),
    ("tools", _chat(tools=[{"type": "retrieval"}]), 400, "tools[0].type", "Input should be 'function'"),
    ("response format", _chat(response_format={"type": "xml"}), 400, "response_format.type", "Input should be"),
    ("top_logprobs", _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "top_logprobs must be an integer"),
    ("max_completion_tokens 0", _chat(max_completion_tokens=0), 400, "max_completion_tokens",
     "max_completion_tokens must be a positive integer"),
]


def test_hostile_requests_get_openai_errors(base_url, models, tmp_path):
    """The HTTP twins of the gRPC hostile-input table: each gets its status, OpenAI's error shape
    and the field it names, through the openai client; then the service answers as before."""
    c = client(base_url)
    failures = []
    for name, (path, body), status, param, fragment in HOSTILE:
        try:
            c.post(path, body=body, cast_to=httpx.Response)
            failures.append(f"{name}: no error")
        except openai.APIStatusError as e:
            err = e.response.json().get("error", {})
            if (e.status_code, err.get("param")) != (status, param) or fragment not in err.get("message", "") \
                    or not {"message", "type", "param", "code"} <= set(err):
                failures.append(f"{name}: got {e.status_code} {err}")
    assert not failures, "\n".join(failures)

    # What the openai client would not send: raw bodies, an unknown path, a wrong method, NaN.
    raw = [(b"{oops", 400, "not valid JSON"), (b"[1, 2]", 400, "must be a JSON object"),
           (b'{"model": "lm", "prompt": "hi", "temperature": NaN}', 400, "temperature must be")]
    for body, status, fragment in raw:
        r = httpx.post(f"{base_url}/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == status and fragment in r.json()["error"]["message"], r.text
    r = httpx.get(f"{base_url}/v1/nothing", timeout=60)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{base_url}/v1/completions", timeout=60)
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.BadRequestError, match="sequence classifier"):
        client(base_url, "/cls").completions.create(model="cls", prompt="hi", max_tokens=2)

    [w] = jamba_generate(models[0], tmp_path, [{"prompt": PROMPTS[0], "max_new_tokens": 8}])
    assert c.completions.create(model="lm", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text == w["text"]


def test_full_queue_gives_429_with_retry_after(base_url):
    tiny = client(base_url, "/tiny")
    holder = tiny.completions.create(model="tiny", prompt="hold the only slot", max_tokens=1500, temperature=0,
                                     stream=True, extra_body={"ignore_eos": True})
    next(iter(holder))  # admitted: the one slot is taken
    waiter: dict = {}
    t = threading.Thread(target=lambda: waiter.update(
        r=tiny.completions.create(model="tiny", prompt="wait", max_tokens=3, temperature=0)))
    t.start()
    try:
        until(lambda: _stats("tiny")["scheduler"]["waiting"] == 1, what="the second request to queue")
        for call in (lambda: tiny.completions.create(model="tiny", prompt="one too many", max_tokens=2),
                     lambda: list(tiny.chat.completions.create(model="tiny", stream=True, max_tokens=2,
                                                               messages=[{"role": "user", "content": "x"}]))):
            with pytest.raises(openai.RateLimitError) as e:
                call()
            assert e.value.status_code == 429 and "queue bound 1" in e.value.message
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert 100 <= int(e.value.response.headers["retry-after-ms"]) <= 60_000
            assert e.value.body["type"] == "rate_limit_error" and e.value.body["code"] == "rate_limit_exceeded"
    finally:
        holder.close()
        t.join(timeout=120)
    assert waiter["r"].choices[0].finish_reason in ("stop", "length")
    _idle("tiny")


def test_disconnect_frees_slots(base_url):
    """A client that goes away, mid-stream or before a unary answer, has its requests aborted
    and its slots freed on every stage."""
    c = client(base_url)
    starts = (lambda: c.completions.create(model="lm", prompt="cancel me", max_tokens=3000, stream=True, n=2,
                                           extra_body={"ignore_eos": True}),
              lambda: c.chat.completions.create(model="lm", messages=[{"role": "user", "content": "go on"}],
                                                max_tokens=3000, stream=True, extra_body={"ignore_eos": True}))
    for start in starts:
        stream = start()
        it = iter(stream)
        next(it), next(it)
        assert _stats("lm")["scheduler"]["slots_in_use"] >= 1
        stream.close()
        s = _idle("lm")
        assert s["scheduler"]["waiting"] == 0 and [st["used_slots"] for st in s["stages"]] == [0, 0]
    impatient = client(base_url, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="lm", prompt="too slow to wait for", max_tokens=3000,
                                     extra_body={"ignore_eos": True})
    _idle("lm")


def test_deadline_gives_a_timeout_status_and_frees_slots(base_url):
    """Past Serve's request timeout (15 s here) a request is dropped and answered 504 (or 408
    by Serve's proxy itself, should it get there first)."""
    c = client(base_url)
    t0 = time.time()
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="lm", prompt="too long", max_tokens=4000, extra_body={"ignore_eos": True})
    assert e.value.status_code in (504, 408), e.value
    if e.value.status_code == 504:
        assert e.value.body["type"] == "timeout" and "deadline" in e.value.message
    assert time.time() - t0 < TIMEOUT_S + 30
    _idle("lm")


def test_failed_pipeline_gives_503(base_url):
    """Runs last: "down" loses its only stage for good (max_restarts 0). A stream in flight ends
    with an error event; later requests get 503, and so does /health."""
    down = client(base_url, "/down")
    assert down.completions.create(model="down", prompt="hi", max_tokens=2).choices[0].finish_reason
    stream = down.completions.create(model="down", prompt="doomed", max_tokens=3000, stream=True,
                                     extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    os.kill(_stats("down")["stages"][0]["pid"], signal.SIGKILL)
    with pytest.raises(openai.APIError, match="could not be brought back"):
        for _ in it:
            pass
    with pytest.raises(openai.InternalServerError) as e:
        down.completions.create(model="down", prompt="hi", max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["code"] == "pipeline_unavailable"
    r = httpx.get(f"{base_url}/down/health", timeout=30)
    assert r.status_code == 503 and "pipeline failed" in r.json()["error"]["message"]

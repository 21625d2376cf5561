"""`mimoflash serve` against the official `openai` client: a live server on 127.0.0.1 (a free port), the shipped model.

One server process serves the whole module (started as a user starts it: `python -m mimoflash serve`). The shipped
model is a small Python-completion model, so tests check the protocol and the constraints, not the prose: greedy
decoding where exact text matters, grammar-forced output where structure matters.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (pip install -e '.[dev]')")
httpx = pytest.importorskip("httpx")

MODEL = "mimoflash-default"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m mimoflash serve ARGS` on a free loopback port; waits for /health."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w") if os.environ.get("MIMOFLASH_TEST_QUIET") else None
        e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "mimoflash", "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy")

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: {name{labels}: value}."""
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def metric(self, name: str, **labels) -> float:
        total = 0.0
        for k, v in self.metrics().items():
            if k.split("{")[0] == name and all(f'{a}="{b}"' in k for a, b in labels.items()):
                total += v
        return total

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


def engine_pid(server_pid: int) -> int:
    """The pid of a server's engine process: its child started by multiprocessing's spawn."""
    for child in open(f"/proc/{server_pid}/task/{server_pid}/children").read().split():
        if b"spawn_main" in open(f"/proc/{child}/cmdline", "rb").read():
            return int(child)
    raise AssertionError(f"server {server_pid} has no engine process")


def wait_gone(pid: int, seconds: float) -> bool:
    """True once process `pid` has exited (or is a zombie) within `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-num-seqs", "8", "--max-waiting", "64")
    yield s
    code, out = s.stop()
    assert code == 0, out


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, path: str, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


USER = [{"role": "user", "content": "def add(a, b):"}]


# ------------------------------------------------------------------ basics
def test_models_health_and_page(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "<script" in page.text
    r = httpx.get(server.url + "/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_chat_greedy_matches_the_engine(server, client):
    """The server's greedy text is what the engine gives for the same chat template and parameters."""
    from mimoflash import LLM, SamplingParams, default_model
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    ch = r.choices[0]
    assert r.object == "chat.completion" and ch.message.role == "assistant"
    assert isinstance(ch.message.content, str) and ch.message.content      # thinking off: content never null
    assert ch.finish_reason in ("stop", "length")
    llm = LLM(default_model(), max_num_seqs=1, progress=False)
    ref = llm.chat(USER, SamplingParams(temperature=0, max_tokens=12, skip_special_tokens=False), use_tqdm=False)
    assert ch.message.content == ref[0].outputs[0].text.strip()
    u = r.usage
    assert u.completion_tokens == len(ref[0].outputs[0].token_ids)
    assert u.prompt_tokens == len(ref[0].prompt_token_ids)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens_details.reasoning_tokens == 0
    cost = (u.prompt_tokens * 0.10 + u.completion_tokens * 0.30) / 1e6
    assert u.model_extra["cost"] == pytest.approx(cost)


def test_chat_stream_async_with_usage(server, client):
    """Async client, SSE chunks ending in [DONE], include_usage: the streamed text equals the non-streamed one."""
    full = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=0)

    async def run():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        stream = await ac.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        await ac.close()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    raw = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 3,
                                                                 "stream": True}, timeout=60).text
    assert raw.rstrip().endswith("data: [DONE]") and raw.count("data: ") >= 3


def test_sync_stream_and_n_seed_stop(server, client):
    kw = dict(model=MODEL, messages=USER, max_tokens=12, temperature=1.0, seed=1234, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]   # seeded
    stream = client.chat.completions.create(**kw, stream=True)
    texts = ["", "", ""]
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in a.choices]
    # stop: the reply ends before the stop string and says why
    greedy = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if text[i:i + 2].strip() == text[i:i + 2])
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[:text.find(stop)].strip() and r.choices[0].finish_reason == "stop"
    # stop as a plain string, top_k -1 (vLLM's "off"): the same reply
    r2 = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, stop=stop,
                                        extra_body={"top_k": -1})
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_max_completion_tokens(server, client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_chat_logprobs(server, client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs.content
    assert len(lp) == 5
    for e in lp:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert e.token == e.top_logprobs[0].token                                # greedy picks the top token
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_completions(server, client):
    r = client.completions.create(model=MODEL, prompt=["def f(x):", "import os"], max_tokens=6, temperature=0,
                                  logprobs=2, echo=True, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("def f(x):") and r.choices[1].text.startswith("import os")
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.token_logprobs) == 6 and all(len(t) == 2 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == 12
    toks = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4, temperature=0)
    assert toks.usage.prompt_tokens == 3
    s = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=6, temperature=0, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text[len("def f(x):"):]
    assert chunks[-1].usage.completion_tokens == 6
    # streamed logprobs concatenate to the unstreamed ones, text offsets included (counted from the echoed prompt)
    s = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=6, temperature=0, stream=True,
                                  logprobs=2, echo=True, extra_body={"ignore_eos": True})
    got = [c.choices[0].logprobs for c in s if c.choices and c.choices[0].logprobs]
    assert [t for g in got for t in g.tokens] == lp.tokens
    assert [o for g in got for o in g.text_offset] == lp.text_offset


def _sse(server, path: str, body: dict) -> list[dict]:
    raw = _post(server, path, body).text
    assert raw.rstrip().endswith("data: [DONE]")
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_continuous_usage_stats(server, path):
    """stream_options.continuous_usage_stats: every chunk carries the usage so far; the last one the total. (40
    tokens: the engine may decode several steps per call, and a chunk then carries all of them.)"""
    body = {"model": MODEL, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            **({"prompt": "def f(x):"} if path == "/v1/completions" else {"messages": USER})}
    chunks = _sse(server, path, body)
    done = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] > 0 for c in chunks)
    assert done == sorted(done) and done[-1] == 40 and chunks[-1]["choices"] == []
    assert len(set(done)) > 2                                  # it grows while streaming, not only at the end
    body["stream_options"] = {"include_usage": True}
    plain = _sse(server, path, body)
    assert all(c["usage"] is None for c in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 40


def test_completions_default_max_tokens_fits_the_context(server):
    """Without max_tokens a completion generates up to 16 tokens, fewer where the context has less room; an explicit
    max_tokens that does not fit is a 400 naming it."""
    limit = httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    prompt = [5] * (limit - 3)
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": [5, 6], "temperature": 0, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 16
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert r.json()["error"]["code"] == "context_length_exceeded"


# ------------------------------------------------------------------ MiMo chat semantics
def test_reasoning_content_round_trip_and_thinking_switch(server, client):
    """Thinking on leaves the template's empty think block out; a previous turn's reasoning_content is rendered."""
    off = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    on = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert off.usage.prompt_tokens > on.usage.prompt_tokens          # "<think>\n\n</think>\n\n" only when off
    turns = USER + [{"role": "assistant", "content": "return a + b"}, {"role": "user", "content": "again"}]
    with_r = [dict(m) for m in turns]
    with_r[1]["reasoning_content"] = "add two numbers"
    a = client.chat.completions.create(model=MODEL, messages=turns, max_tokens=1)
    b = client.chat.completions.create(model=MODEL, messages=with_r, max_tokens=1)
    assert b.usage.prompt_tokens > a.usage.prompt_tokens


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather forecast",
    "parameters": {"type": "object", "properties": {
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "hourly": {"type": "boolean"}},
        "required": ["days", "unit", "hourly"]}}},
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}]


def test_named_tool_choice_forces_a_typed_call(server, client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}],
                                       tools=TOOLS, tool_choice=named, max_tokens=80, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert set(args) == {"days", "unit", "hourly"}
    assert isinstance(args["days"], int) and args["unit"] in ("celsius", "fahrenheit")
    assert isinstance(args["hourly"], bool)
    # streamed: the same call, arguments in fragments that concatenate to the same JSON
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}],
                                            tools=TOOLS, tool_choice=named, max_tokens=80, temperature=0,
                                            stream=True)
    name, frags, finish = None, [], None
    for c in stream:
        for d in c.choices:
            for tc in d.delta.tool_calls or []:
                assert tc.index == 0
                name = tc.function.name or name
                frags.append(tc.function.arguments or "")
            finish = d.finish_reason or finish
    assert name == "get_weather" and json.loads("".join(frags)) == args and finish == "tool_calls"
    assert len([f for f in frags if f]) >= 3                         # one fragment per parameter, then "}"
    # the call goes back into the conversation (arguments as a JSON string) with the tool's answer
    follow = client.chat.completions.create(model=MODEL, max_tokens=2, tools=TOOLS, messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message is not None


def test_tool_choice_none_and_required(server, client):
    none = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none",
                                          max_tokens=4, temperature=0)
    assert none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens == client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=1).usage.prompt_tokens               # tools left out of the prompt
    req = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                         max_tokens=120, temperature=0, parallel_tool_calls=False)
    calls = req.choices[0].message.tool_calls
    assert calls and calls[0].function.name in ("get_weather", "noop")
    json.loads(calls[0].function.arguments)


def test_json_schema_response_format(server, client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                        "maxItems": 3}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a person"}],
                                       max_tokens=100, temperature=0.7, seed=3,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "person", "schema": schema}})
    jsonschema = pytest.importorskip("jsonschema")
    doc = json.loads(r.choices[0].message.content)
    jsonschema.validate(doc, schema)
    assert r.choices[0].finish_reason == "stop"
    o = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=60, temperature=0.5, seed=1,
                                       response_format={"type": "json_object"})
    content = o.choices[0].message.content
    if o.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:                                            # cut by max_tokens: still a valid prefix of an object
        assert content.startswith("{")
    bad = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}})
    assert bad.status_code == 400, bad.text


# ------------------------------------------------------------------ bad input
BAD = [
    ({"messages": USER}, "model"),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": USER, "temperature": -0.5}, "temperature"),
    ({"model": MODEL, "messages": USER, "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": USER, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": USER, "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "messages": USER, "n": 0}, "n"),
    ({"model": MODEL, "messages": USER, "n": 100}, "n"),
    ({"model": MODEL, "messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": USER, "max_tokens": 10**6}, "max_tokens"),
    ({"model": MODEL, "messages": USER, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"model": MODEL, "messages": USER, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"model": MODEL, "messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"model": MODEL, "messages": USER, "stop": [""]}, "stop"),
    ({"model": MODEL, "messages": USER, "stop": ""}, "stop"),
    ({"model": MODEL, "messages": USER, "top_k": -2}, "top_k"),
    ({"model": MODEL, "messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"model": MODEL, "messages": USER, "tools": TOOLS, "tool_choice": {"type": "function",
                                                                         "function": {"name": "nope"}}},
     "tool_choice"),
    ({"model": MODEL, "messages": USER, "chat_template_kwargs": {"enable_thinking": "yes"}},
     "chat_template_kwargs.enable_thinking"),
    ({"model": MODEL, "messages": USER, "logit_bias": {"5": 10}}, "logit_bias"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 40000}]}, "messages"),
    ({"model": MODEL, "messages": USER, "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {}}, "required": 5}}}]}, "tools"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_other_client_mistakes(server, client):
    r = _post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": USER})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=-1)
    assert "temperature" in str(e.value)
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"\xff\xfe not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    big = b'{"model": "' + b"x" * (5 << 20) + b'"}'
    r = httpx.post(server.url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": [1, 2, 10**7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    # a lone surrogate (valid JSON, not encodable text) is the client's mistake, not a 500
    for route, body, param in (("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", '
                                '"content": "a\\ud800b"}]}' % MODEL, "messages"),
                               ("/v1/completions", '{"model": "%s", "prompt": "a\\ud800b"}' % MODEL, "prompt")):
        r = httpx.post(server.url + route, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ------------------------------------------------------------------ metrics, disconnect
def test_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
    m = server.metrics()
    text = httpx.get(server.url + "/metrics").text
    for name in ("mimoflash:num_requests_running", "mimoflash:num_requests_waiting", "mimoflash:kv_cache_usage_perc",
                 "mimoflash:prompt_tokens_total", "mimoflash:generation_tokens_total",
                 "mimoflash:time_to_first_token_seconds_bucket", "mimoflash:inter_token_latency_seconds_bucket",
                 "mimoflash:e2e_request_latency_seconds_count", "mimoflash:request_success_total",
                 "mimoflash:request_cost_usd_total", "mimoflash:reasoning_tokens_total"):
        assert name in text, name
    assert server.metric("mimoflash:generation_tokens_total") >= 4
    assert server.metric("mimoflash:request_cost_usd_total") > 0
    assert 'pool="global_blocks"' in text and 'pool="swa_rings"' in text
    assert m  # parsed


def test_disconnect_mid_stream_frees_the_cache(server):
    """A client that goes away mid-stream: its request is aborted and its KV blocks and ring return to the pool."""
    before = server.metric("mimoflash:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "messages": USER, "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()            # kept open: leaving the loop would close the stream already
        got = [next(lines) for _ in range(10)]
        assert sum(g.startswith("data: ") for g in got) >= 4
        assert server.metric("mimoflash:num_requests_running") == 1
        assert server.metric("mimoflash:kv_cache_usage_perc", pool="swa_rings") > 0
    deadline = time.time() + 20
    while time.time() < deadline:
        if server.metric("mimoflash:request_success_total", finished_reason="abort") > before:
            break
        time.sleep(0.1)
    assert server.metric("mimoflash:request_success_total", finished_reason="abort") == before + 1
    assert server.metric("mimoflash:num_requests_running") == 0
    assert server.metric("mimoflash:kv_cache_usage_perc", pool="global_blocks") == 0
    assert server.metric("mimoflash:kv_cache_usage_perc", pool="swa_rings") == 0
    assert server.metric("mimoflash:generation_tokens_total") < 10**6


def test_non_streaming_client_that_gives_up_frees_the_cache(server):
    before = server.metric("mimoflash:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "messages": USER, "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.5)
    deadline = time.time() + 10
    while time.time() < deadline and \
            server.metric("mimoflash:request_success_total", finished_reason="abort") == before:
        time.sleep(0.1)
    assert server.metric("mimoflash:request_success_total", finished_reason="abort") == before + 1
    assert server.metric("mimoflash:kv_cache_usage_perc", pool="global_blocks") == 0


def test_num_scheduler_steps_same_text_chunks_per_call(server):
    """The engine decodes up to 8 tokens per step by default and a streamed chunk carries all of them;
    `--num-scheduler-steps 1` gives one token per step and the same greedy text."""
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True}

    def chunks(url: str) -> list[dict]:
        raw = httpx.post(url + "/v1/completions", json=body, timeout=60).text
        return [json.loads(ln[6:])["choices"][0] for ln in raw.splitlines() if ln.startswith("data: {")]

    default = chunks(server.url)
    one = ServerProcess("--num-scheduler-steps", "1")
    try:
        single = chunks(one.url)
    finally:
        code, out = one.stop()
        assert code == 0, out
    assert "".join(c["text"] for c in single) == "".join(c["text"] for c in default)
    sizes = [len(c["logprobs"]["tokens"]) for c in default if c["logprobs"]]
    assert sum(sizes) == 24 and max(sizes) > 1, sizes


# ------------------------------------------------------------------ CLI
def test_serve_help_and_bad_flags():
    r = subprocess.run([sys.executable, "-m", "mimoflash", "serve", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--api-key" in r.stdout and "--mtp" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mimoflash", "serve", "--port", "70000"], capture_output=True, text=True)
    assert r.returncode == 2 and "--port" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mimoflash", "serve", "--stream-interval", "0"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--stream-interval" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mimoflash", "serve", "--num-scheduler-steps", "0"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--num-scheduler-steps" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mimoflash", "serve", "/no/such/dir"], capture_output=True, text=True)
    assert r.returncode == 1 and "error" in r.stderr and "Traceback" not in r.stderr

"""Server operations: API key, 429 on a full queue, SIGTERM with requests in flight, the engine process (its loop
in-process, its death under a live server), and a bounded loopback load test (32 concurrent streaming clients):
every request completes or gets 429, caches back to empty, memory stable."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (pip install -e '.[dev]')")
httpx = pytest.importorskip("httpx")

from test_serve import MODEL, USER, ServerProcess, engine_pid, wait_gone  # noqa: E402


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_api_key_queue_full_and_sigterm():
    s = ServerProcess("--api-key", "s3cret", "--max-num-seqs", "1", "--max-waiting", "1", "--graceful-timeout", "2")
    try:
        engine = engine_pid(s.proc.pid)
        assert httpx.get(s.url + "/health").status_code == 200              # health needs no key
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == MODEL

        # Two long streams fill the batch (1) and the waiting room (1): the third request gets 429.
        body = {"model": MODEL, "messages": USER, "max_tokens": 3000, "stream": True, "ignore_eos": True}
        hdr = {"Authorization": "Bearer s3cret"}
        got: dict[int, list[str]] = {0: [], 1: []}
        started = [threading.Event(), threading.Event()]

        def stream(i):
            try:
                with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, headers=hdr, timeout=60) as r:
                    started[i].set()
                    for line in r.iter_lines():
                        got[i].append(line)
            except httpx.HTTPError as e:
                got[i].append(f"ERROR {e!r}")
            finally:
                started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(30)
        with pytest.raises(openai.RateLimitError) as e:
            good.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        assert e.value.status_code == 429
        assert s.metric("mimoflash:request_rejected_total", reason="queue_full") == 1
        # SIGTERM with both in flight: graceful period (2 s), then cancelled; the process exits 0.
        t0 = time.time()
        code, out = s.stop(signal.SIGTERM, timeout=30)
        for t in threads:
            t.join(10)
        assert code == 0, out
        assert time.time() - t0 < 20
        assert wait_gone(engine, 5)                                 # the engine process stopped with it
        assert "Application shutdown complete" in out and "Traceback" not in out
        for i in range(2):                  # the running one ended with finish_reason "abort"; both end in [DONE]
            assert got[i] and got[i][-2:] == ["data: [DONE]", ""] or got[i][-1] == "data: [DONE]", got[i][-3:]
        reasons = [c["finish_reason"] for ln in got[0] + got[1] if ln.startswith("data: {")
                   for c in json.loads(ln[6:])["choices"]]
        assert "abort" in reasons
    finally:
        s.stop(signal.SIGKILL)


def _messages(conn, want, timeout: float = 60.0):
    """Read the engine's messages until `want(msg)` is true -> that message."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if conn.poll(0.5):
            msg = conn.recv()
            if want(msg):
                return msg
    raise AssertionError("the engine did not send the expected message")


def test_engine_core_acks_streams_aborts_and_stops_when_the_server_goes():
    """The engine process's loop (run here in a thread, on real pipes): an add the engine refuses is acknowledged
    with its ValueError; a greedy request's deltas, per step, give the tokens LLM.generate gives; an abort frees its
    KV blocks and ring at once and ends it with finish_reason "abort"; EOF on the command pipe (the server process
    is gone) ends the loop."""
    from mimoflash import LLM, SamplingParams, default_model
    from mimoflash.serve.engine_core import EngineCore, frame, rebuild_error
    from mimoflash.serve.grammar import GrammarCompiler

    llm = LLM(default_model(), max_num_seqs=2, progress=False)
    ids = llm.tokenizer.encode("def fibonacci(n):")
    ref = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    cmd_recv, cmd_send = multiprocessing.Pipe(duplex=False)
    out_recv, out_send = multiprocessing.Pipe(duplex=False)
    core = EngineCore(llm, out_send)
    loop = threading.Thread(target=core.run, args=(cmd_recv,), daemon=True)
    loop.start()

    def send(cmd: tuple) -> None:                          # as the server's event loop writes commands
        data = frame(cmd)
        os.write(cmd_send.fileno(), data[:5])                  # in two pieces: the reader must wait for the rest
        time.sleep(0.01)
        os.write(cmd_send.fileno(), data[5:])

    try:
        send(("add", "bad", [], SamplingParams(max_tokens=2), None, None))
        msg = _messages(out_recv, lambda m: m[0] == "step" and m[1])
        (rid, err), = msg[1]
        assert rid == "bad" and isinstance(rebuild_error(err), ValueError) and "empty prompt" in err[1]

        send(("add", "a", ids, SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True), None, None))
        msg = _messages(out_recv, lambda m: m[0] == "step" and m[1])
        assert msg[1] == [("a", None)]                         # acknowledged in the message of its first step
        tokens, deltas, stats = [], msg[2], msg[3]
        while len(tokens) < 8:
            if not deltas:
                _, _, deltas, stats = _messages(out_recv, lambda m: m[0] == "step" and m[2])
            (rid, finished, choices, _), = deltas
            deltas = None
            assert rid == "a" and not finished and len(choices) == 1
            tokens += choices[0][2]                  # (index, text, token ids, ...): one or more tokens a step
        assert tokens[:8] == list(ref)
        running, waiting, blocks, rings, _ = stats
        assert running == 1 and waiting == 0 and blocks > 0 and rings > 0

        send(("abort", "a"))
        msg = _messages(out_recv, lambda m: m[0] == "step" and any(d[1] for d in m[2]))
        (rid, finished, choices, _), = [d for d in msg[2] if d[1]]
        assert rid == "a" and choices[0][3] == "abort"
        assert msg[3][:4] == (0, 0, 0.0, 0.0)                 # nothing running, every block and ring free
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.layout.num_blocks

        # A constrained request: its grammar is built into a matcher here, the masking runner is the engine's runner
        # while it runs (the output starts as the grammar wants) and the plain runner is back once it ends.
        plain = llm.engine.runner
        grammar = GrammarCompiler(llm.tokenizer, llm.model.config.vocab_size, llm.engine.eos_token_ids)
        send(("add", "g", ids, SamplingParams(temperature=0, max_tokens=6), None,
                       [grammar.json_schema(None)]))
        text = ""
        while True:
            msg = _messages(out_recv, lambda m: m[0] == "step" and m[2])
            (rid, finished, choices, _), = msg[2]
            text += choices[0][1]
            if finished:
                break
        assert text.startswith("{") and llm.engine.runner is plain and not core.masking.matchers
    finally:
        cmd_send.close()                                       # as when the server process dies
        loop.join(30)
    assert not loop.is_alive()


def test_engine_process_death_ends_streams_and_answers_503():
    """The engine process killed under a live server: the open stream ends with an error event, /health and new
    requests answer 503 with OpenAI's error object, and the server still shuts down cleanly on SIGTERM."""
    s = ServerProcess("--graceful-timeout", "2")
    try:
        engine = engine_pid(s.proc.pid)
        body = {"model": MODEL, "messages": USER, "max_tokens": 3000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            os.kill(engine, signal.SIGKILL)
            got += list(lines)
        events = [json.loads(ln[6:]) for ln in got if ln.startswith("data: {")]
        assert events[-1]["error"]["type"] == "service_unavailable" and "engine" in events[-1]["error"]["message"]
        assert any(e.get("choices") for e in events[:-1])
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and "engine" in h.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2})
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
        code, out = s.stop(signal.SIGTERM)
        assert code == 0, out
        assert "Traceback" not in out and "the engine process exited" in out
    finally:
        s.stop(signal.SIGKILL)


@pytest.mark.slow
def test_load_32_streaming_clients():
    """32 clients stream requests back to back for ~10 s against 16 batch slots and 8 waiting slots."""
    s = ServerProcess("--max-num-seqs", "16", "--max-waiting", "8")
    results = {"done": 0, "429": 0, "errors": [], "tokens": 0}
    duration = 10.0

    async def client(i: int, until: float):
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            k = 0
            while time.time() < until:
                k += 1
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"def f{i}_{k}(x):"}],
                        "max_tokens": 24, "temperature": 0.8, "seed": i * 1000 + k, "stream": True,
                        "stream_options": {"include_usage": True}}
                try:
                    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code == 429:
                            results["429"] += 1
                            await r.aread()
                            await asyncio.sleep(0.05)
                            continue
                        if r.status_code != 200:
                            results["errors"].append(f"{r.status_code} {(await r.aread())[:200]!r}")
                            continue
                        lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
                    if lines[-1] != "data: [DONE]":
                        results["errors"].append(f"no [DONE]: {lines[-1][:100]}")
                        continue
                    usage = json.loads(lines[-2][6:])["usage"]
                    results["tokens"] += usage["completion_tokens"]
                    results["done"] += 1
                except httpx.HTTPError as e:
                    results["errors"].append(repr(e))

    async def run(seconds):
        until = time.time() + seconds
        await asyncio.gather(*(client(i, until) for i in range(32)))

    try:
        engine = engine_pid(s.proc.pid)
        asyncio.run(run(duration / 2))
        rss_half, engine_half = _rss_kb(s.proc.pid), _rss_kb(engine)
        asyncio.run(run(duration / 2))
        rss_end, engine_end = _rss_kb(s.proc.pid), _rss_kb(engine)
        assert results["errors"] == []
        assert results["done"] >= 32 and results["429"] >= 1, results          # saturated, refused, not errored
        time.sleep(0.5)
        assert s.metric("mimoflash:num_requests_running") == 0
        assert s.metric("mimoflash:num_requests_waiting") == 0
        assert s.metric("mimoflash:kv_cache_usage_perc", pool="global_blocks") == 0
        assert s.metric("mimoflash:kv_cache_usage_perc", pool="swa_rings") == 0
        assert s.metric("mimoflash:request_success_total") == results["done"]
        assert rss_end - rss_half < 64 * 1024, (rss_half, rss_end)                 # kB: no growth per request
        assert engine_end - engine_half < 64 * 1024, (engine_half, engine_end)     # in either process
        print(f"\nload: {results['done']} streams completed, {results['429']} refused with 429, "
              f"{results['tokens']} tokens in {duration:.0f} s; RSS {rss_half // 1024} -> {rss_end // 1024} MB, "
              f"engine process {engine_half // 1024} -> {engine_end // 1024} MB")
    finally:
        code, out = s.stop()
        assert code == 0, out


def test_mtp_passes_through_and_reports_acceptance():
    """--mtp K reaches the engine: greedy text is the plain engine's, usage carries the verify-step figures."""
    from mimoflash import LLM, SamplingParams, default_model
    import inspect
    if "speculative_config" not in inspect.signature(LLM.__init__).parameters:
        pytest.skip("this engine has no MTP speculative decoding")
    s = ServerProcess("--mtp", "2")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=40, temperature=0,
                                 extra_body={"ignore_eos": True})
        ref = LLM(default_model(), max_num_seqs=1, progress=False).generate(
            "def fibonacci(n):", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
        assert r.choices[0].text == ref[0].outputs[0].text
        mtp = r.usage.model_extra["mtp"]
        assert mtp["verify_steps"] >= 1 and 0 <= mtp["accepted_tokens"] <= 2 * mtp["verify_steps"]
        assert 1 <= mtp["tokens_per_verify_step"] <= 3
        assert s.metric("mimoflash:spec_decode_num_verify_steps_total") == mtp["verify_steps"]
        bad = httpx.post(s.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER,
                                                                "response_format": {"type": "json_object"}})
        assert bad.status_code == 400 and "--mtp" in bad.json()["error"]["message"]
    finally:
        code, out = s.stop()
        assert code == 0, out


def test_stream_interval_sends_fewer_larger_chunks():
    """--stream-interval 4: after the first token, every chunk carries at least 4 tokens (the last may carry fewer);
    the streamed text is the non-streamed text."""
    s = ServerProcess("--stream-interval", "4")
    try:
        body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 14, "temperature": 0, "ignore_eos": True,
                "logprobs": 0}
        full = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        raw = httpx.post(s.url + "/v1/completions", json={**body, "stream": True}, timeout=60).text
        chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        sizes = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks if c["choices"][0]["logprobs"]]
        assert sum(sizes) == 14 and sizes[0] == 1 and all(k >= 4 for k in sizes[1:-1]) and len(sizes) <= 5, sizes
        assert "".join(c["choices"][0]["text"] for c in chunks) == full
        chat = {"model": MODEL, "messages": USER, "max_tokens": 14, "temperature": 0, "ignore_eos": True}
        ref = httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]["message"]
        raw = httpx.post(s.url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60).text
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in raw.splitlines()
                  if line.startswith("data: {")]
        assert "".join(d.get("content") or "" for d in deltas) == ref["content"]
        assert len(deltas) <= 1 + 5                                  # the role chunk, then at most 5 with tokens
    finally:
        code, out = s.stop()
        assert code == 0, out


def test_reasoning_end_to_end_with_a_template_that_opens_think(tmp_path):
    """A checkpoint whose template opens `<think>` in the generation prompt (as Qwen3-style thinking templates do):
    everything generated before `</think>` is reasoning, streamed as reasoning_content and counted in usage."""
    from mimoflash import default_model
    from mimoflash.tokenizer import DEFAULT_CHAT_TEMPLATE
    src = Path(default_model())
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    opened = DEFAULT_CHAT_TEMPLATE.replace("{%- if not enable_thinking -%}", "{%- if enable_thinking -%}"
                                          "{{- '<think>\\n' -}}{%- else -%}")
    assert opened != DEFAULT_CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text(opened)
    s = ServerProcess(str(tmp_path), "--served-model-name", MODEL)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        kw = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True, "stop": ["</think>"],
                              "chat_template_kwargs": {"enable_thinking": True}})
        r = c.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert msg.model_extra["reasoning_content"] and msg.content == ""          # content "", not null
        assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens == 12
        chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        streamed = "".join(ch.choices[0].delta.model_extra.get("reasoning_content") or ""
                           for ch in chunks if ch.choices)
        assert streamed == msg.model_extra["reasoning_content"]
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 12
        off = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0)
        assert off.choices[0].message.content and off.usage.completion_tokens_details.reasoning_tokens == 0
        assert s.metric("mimoflash:reasoning_tokens_total") == 24
    finally:
        code, out = s.stop()
        assert code == 0, out

"""`mimoflash serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with a web chat page.

    app.py          wiring: lifespan, API key, /health, /metrics, /v1/models, / (the page)
    chat.py         POST /v1/chat/completions
    completions.py  POST /v1/completions
    state.py        what the routes share: config, engine loop, model check, sampling parameters, usage and cost
    streaming.py    SSE chunk encoding, logprob entries, aborting the requests of a client that went away
    errors.py       OpenAI's error object for every client mistake (a 4xx whose `param` names the field)
    engine_core.py  the engine process: owns the LLM (add / step / abort, grammar matchers), one message per step
    engine_loop.py  the server's side of it: starts it, sends commands, hands each step's deltas to the handlers
    protocol.py     the OpenAI request schema as pydantic models (validation, OpenAPI document)
    parsers.py      <think> reasoning and Qwen3-Coder XML tool calls, parsed incrementally from the text stream
    grammar.py      response_format and forced tool calls as token masks (llguidance)
    metrics.py      Prometheus metrics (prometheus_client), vLLM-style names
    cli.py          `mimoflash serve` flags -> engine process + app -> uvicorn

`build_app(engine_loop, tokenizer, ...)` returns the ASGI app for embedding; docs/SERVER.md describes the API.
"""

from __future__ import annotations


def build_app(*args, **kwargs):
    from .app import build_app as _build
    return _build(*args, **kwargs)


__all__ = ["build_app"]

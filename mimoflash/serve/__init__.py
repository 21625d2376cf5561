"""`mimoflash serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with a web chat page.

    app.py          wiring: lifespan, API key, /health, /metrics, /v1/models, / (the page)
    chat.py         POST /v1/chat/completions
    completions.py  POST /v1/completions
    state.py        what the routes share: config, engine loop, model check, sampling parameters, usage and cost
    streaming.py    SSE chunk encoding, logprob entries, aborting the requests of a client that went away
    errors.py       OpenAI's error object for every client mistake (a 4xx whose `param` names the field)
    engine_loop.py  one thread owns the LLMEngine (add / step / abort); handlers talk to it through queues
    protocol.py     the OpenAI request schema as pydantic models (validation, OpenAPI document)
    parsers.py      <think> reasoning and Qwen3-Coder XML tool calls, parsed incrementally from the text stream
    grammar.py      response_format and forced tool calls as token masks (llguidance)
    metrics.py      Prometheus metrics (prometheus_client), vLLM-style names
    cli.py          `mimoflash serve` flags -> LLM + app -> uvicorn

`build_app(llm, ...)` returns the ASGI app for tests and embedding; docs/SERVER.md describes the API.
"""

from __future__ import annotations


def build_app(*args, **kwargs):
    from .app import build_app as _build
    return _build(*args, **kwargs)


__all__ = ["build_app"]

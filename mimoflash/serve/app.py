"""The FastAPI app: OpenAI routes, errors in OpenAI's shape, the chat page, /health and /metrics.

`build_app(engine_loop, tokenizer, ...)` wires a started engine process (engine_loop.py) and the model's tokenizer to
the routes. Request flow for a chat completion:

    ChatCompletionRequest (pydantic)  ->  checks needing server state (model name, n, context)  ->  chat template
    ->  token ids + SamplingParams (+ grammars)  ->  EngineLoop.add  ->  deltas  ->  ChatOutputParser per choice
    (reasoning / content / tool calls)  ->  one JSON response, or SSE chunks ending in `data: [DONE]`


Every client mistake is a 4xx with OpenAI's error object (errors.py); the modules are listed in __init__.py.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response

from . import chat, completions
from .engine_loop import EngineLoop
from .errors import APIError, BodySizeLimit, error_response, install_error_handlers
from .metrics import CONTENT_TYPE_LATEST
from .state import ServerConfig, ServerState

STATIC = Path(__file__).resolve().parent / "static"


def build_app(engine_loop: EngineLoop, tokenizer, *, served_model_name: str | None = None, api_key: str | None = None,
              max_n: int = 16, max_body_bytes: int = 4 << 20, price_input_per_m: float = 0.10,
              price_output_per_m: float = 0.30, mtp: int | None = None, stream_interval: int = 1) -> FastAPI:
    """`engine_loop`: started (the model is loaded in its process); the app reads its messages while it runs and
    stops it when the app shuts down."""
    cfg = ServerConfig(served_model_name or "mimoflash", api_key, max_n, max_body_bytes, price_input_per_m,
                       price_output_per_m, mtp, stream_interval)
    st = ServerState(engine_loop, tokenizer, cfg)
    metrics = st.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine_loop.attach()
        try:
            yield
        finally:
            await engine_loop.aclose()

    app = FastAPI(title="mimoflash", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API for MiMo-V2-Flash-architecture models (docs/SERVER.md)")
    app.state.engine_loop, app.state.metrics, app.state.config = engine_loop, metrics, cfg

    install_error_handlers(app)

    # ------------------------------------------------------------------ auth
    async def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    # ------------------------------------------------------------------ plain routes
    @app.get("/health")
    async def health():
        if not engine_loop.alive:
            return error_response(503, "the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prom_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/info", include_in_schema=False)
    async def info():
        return {"model": cfg.served_model_name, "max_model_len": st.max_model_len, "mtp": cfg.mtp,
                "price_input_per_m": cfg.price_input_per_m, "price_output_per_m": cfg.price_output_per_m,
                "auth": cfg.api_key is not None, "grammar": st.compiler is not None}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        st.check_model(model_id)
        return _model_card()

    def _model_card() -> dict:
        return {"id": cfg.served_model_name, "object": "model", "created": st.created, "owned_by": "mimoflash",
                "max_model_len": st.max_model_len}

    chat.add_routes(v1, st)
    completions.add_routes(v1, st)
    app.include_router(v1)
    app.add_middleware(BodySizeLimit, limit=cfg.max_body_bytes)
    return app


def _version() -> str:
    from .. import __version__
    return __version__

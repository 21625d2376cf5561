"""The FastAPI app: OpenAI routes, errors in OpenAI's shape, the chat page, /health and /metrics.

`build_app(llm, ...)` wires an `LLM` (engine + tokenizer) to the routes. Request flow for a chat completion:

    ChatCompletionRequest (pydantic)  ->  checks needing server state (model name, n, context)  ->  chat template
    ->  token ids + SamplingParams (+ grammar matchers)  ->  EngineLoop.add  ->  deltas  ->  ChatOutputParser per
    choice (reasoning / content / tool calls)  ->  one JSON response, or SSE chunks ending in `data: [DONE]`

Every client mistake is a 4xx with `{"error": {"message", "type", "param", "code"}}`; `param` names the field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.cli import context_limit
from ..engine.sampling import SamplingParams
from ..tokenizer import ChatTemplateError
from .engine_loop import EngineDead, EngineLoop, QueueFull
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .parsers import ChatOutputParser
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("mimoflash.serve")
STATIC = Path(__file__).resolve().parent / "static"
_RESERVED_TEMPLATE_KEYS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "pad_token"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 429: "rate_limit_error",
                              503: "service_unavailable"}.get(status, "server_error")


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None,
               code: str | None = None) -> dict:
    e = APIError(status, message, param, type_, code)
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code=code), status_code=status)


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_n: int = 16
    max_body_bytes: int = 4 << 20
    price_input_per_m: float = 0.10          # USD per million prompt tokens (MiMo-V2-Flash API price, docs/MODEL.md §6)
    price_output_per_m: float = 0.30         # USD per million completion tokens
    mtp: int | None = None


class BodySizeLimit:
    """ASGI middleware: request bodies over `limit` bytes get 413 before any parsing (chunked bodies included).

    The body is read here (bounded) and replayed to the app; later `receive` calls pass through, so the app
    still sees a client's disconnect. (FastAPI's own `max_body_size` answers a declared oversized body with a
    plain-text 413 before any exception handler runs; OpenAI clients expect the JSON error object.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > self.limit:
                return await self._too_large(scope, receive, send)
            more = msg.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        resp = error_response(413, f"request body exceeds the limit of {self.limit} bytes", None,
                              "request_too_large")
        await resp(scope, receive, send)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic adds the union member it tried (e.g. "str", "list[TextPart]", "function-after[...]"): drop those.
    parts = [p for p in parts if not ("[" in p or p in ("str", "int", "float", "bool", "list", "dict", "none",
                                                         "literal", "NamedToolChoice"))]
    return ".".join(parts) or None


def build_app(llm, *, served_model_name: str | None = None, api_key: str | None = None, max_waiting: int = 64,
              max_n: int = 16, max_body_bytes: int = 4 << 20, price_input_per_m: float = 0.10,
              price_output_per_m: float = 0.30, mtp: int | None = None) -> FastAPI:
    cfg = ServerConfig(served_model_name or "mimoflash", api_key, max_n, max_body_bytes, price_input_per_m,
                       price_output_per_m, mtp)
    metrics = ServerMetrics(cfg.served_model_name)
    engine_loop = EngineLoop(llm, max_waiting=max_waiting, metrics=metrics)
    tok = llm.tokenizer
    max_model_len = context_limit(llm)                     # max_model_len, or less where the KV cache holds fewer
    compiler = None
    from . import grammar as _grammar
    if tok is not None and _grammar.available():
        compiler = _grammar.GrammarCompiler(tok, llm.model.config.vocab_size, llm.engine.eos_token_ids)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine_loop.shutdown)

    app = FastAPI(title="mimoflash", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API for MiMo-V2-Flash-architecture models (docs/SERVER.md)")
    app.state.engine_loop, app.state.metrics, app.state.config = engine_loop, metrics, cfg

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                  None, "invalid_json")
        param = _param(tuple(first.get("loc", ())))
        msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return error_response(400, msg, param, "invalid_value")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.type, exc.code),
                            status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error")
        return error_response(500, f"internal server error: {type(exc).__name__}")

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
        return {"model": cfg.served_model_name, "max_model_len": max_model_len, "mtp": cfg.mtp,
                "price_input_per_m": cfg.price_input_per_m, "price_output_per_m": cfg.price_output_per_m,
                "auth": cfg.api_key is not None, "grammar": compiler is not None}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.served_model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {cfg.served_model_name!r}",
                           "model", code="model_not_found")
        return _model_card()

    def _model_card() -> dict:
        return {"id": cfg.served_model_name, "object": "model", "created": created, "owned_by": "mimoflash",
                "max_model_len": max_model_len}

    # ------------------------------------------------------------------ shared request checks
    def check_model(name: str) -> None:
        if name != cfg.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {cfg.served_model_name!r}",
                           "model", code="model_not_found")

    def sampling(req, max_tokens: int | None, default_max: int | None, prompt_len: int,
                 logprobs: int | None) -> SamplingParams:
        """The request's sampling fields -> SamplingParams. `max_tokens` is what the client asked for (None:
        `default_max`, or the rest of the context when that is None too). A default is clipped to the room left in
        the context; an explicit value that does not fit is a 400, as in vLLM. The values themselves (stop as a
        string or list, top_k -1 = off, ranges) are SamplingParams' business: its ValueError names the field."""
        if req.n > cfg.max_n:
            raise APIError(400, f"n={req.n} is above this server's limit of {cfg.max_n}", "n")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context is {max_model_len} tokens and at "
                           "least one must be generated", "messages" if hasattr(req, "messages") else "prompt",
                           code="context_length_exceeded")
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"{field}={max_tokens} does not fit: the prompt has {prompt_len} tokens and the "
                           f"context is {max_model_len}, so at most {room} can be generated", field,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        kw = req.sampling_fields()
        try:
            return SamplingParams(**kw, max_tokens=max_tokens, logprobs=logprobs)
        except ValueError as e:
            field_ = re.match(r"SamplingParams\.(\w+)", str(e))
            raise APIError(400, str(e), field_.group(1) if field_ else None)

    async def submit(ids: list[int], params: SamplingParams, prompt: str | None, matchers=None):
        try:
            return await engine_loop.add(ids, params, prompt=prompt, matchers=matchers)
        except QueueFull as e:
            metrics.m(metrics.rejected, reason="queue_full").inc()
            raise APIError(429, str(e), None, code="queue_full")
        except EngineDead as e:
            raise APIError(503, str(e))
        except ValueError as e:
            raise APIError(400, str(e), "messages")

    def cost(prompt_tokens: int, completion_tokens: int) -> float:
        return round((prompt_tokens * cfg.price_input_per_m + completion_tokens * cfg.price_output_per_m) / 1e6, 10)

    def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int, mx=None) -> dict:
        u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens,
             "prompt_tokens_details": {"cached_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
             "cost": cost(prompt_tokens, completion_tokens),
             "cost_details": {"input_usd_per_m": cfg.price_input_per_m, "output_usd_per_m": cfg.price_output_per_m}}
        steps = getattr(mx, "verify_steps", None) if mx is not None else None
        if steps:
            u["mtp"] = {"verify_steps": steps, "accepted_tokens": getattr(mx, "accepted_tokens", None),
                        "tokens_per_verify_step": round(1 + (getattr(mx, "accepted_tokens", 0) or 0) / steps, 4)}
        return u

    def account(u: dict) -> None:
        metrics.m(metrics.cost).inc(u["cost"])
        metrics.m(metrics.reasoning_tokens).inc(u["completion_tokens_details"]["reasoning_tokens"])

    def logprob_entries(o) -> list[dict]:
        out = []
        for tid, entry in zip(o.token_ids, o.logprobs or []):
            chosen = entry.get(tid)
            top = sorted(entry.items(), key=lambda kv: kv[1].rank)
            out.append((chosen, top))
        return out

    # ------------------------------------------------------------------ chat
    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        if tok is None:
            raise APIError(400, "this model has no tokenizer: use /v1/completions with token-id prompts", "model")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice
        named = choice.function.name if choice is not None and not isinstance(choice, str) else None
        if choice not in (None, "none", "auto") and not tools:
            raise APIError(400, "tool_choice needs 'tools'", "tool_choice")
        if named and named not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
        use_tools = tools if tools and choice != "none" else None
        kwargs = dict(req.chat_template_kwargs or {})
        bad = sorted(_RESERVED_TEMPLATE_KEYS & kwargs.keys())
        if bad:
            raise APIError(400, f"chat_template_kwargs may not set {bad}", "chat_template_kwargs")
        thinking = kwargs.pop("enable_thinking", None)
        if thinking is not None and not isinstance(thinking, bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                           "chat_template_kwargs.enable_thinking")
        messages = [_message_dict(m) for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking,
                                           tools=use_tools, **kwargs)
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, str(e), "messages")
        except Exception as e:                                  # jinja errors from the checkpoint's template
            raise APIError(400, f"the chat template failed on these messages: {type(e).__name__}: {e}", "messages")
        try:
            ids = tok.encode(text)
        except ValueError as e:                                 # e.g. a lone surrogate in a message's text
            raise APIError(400, str(e), "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        n_lp = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        params = sampling(req, max_tokens, None, len(ids), n_lp).replace(skip_special_tokens=False)
        matchers = make_matchers(req, use_tools, named, bool(thinking), params.n)
        handle = await submit(ids, params, text, matchers)
        start_reasoning = text.rstrip().endswith("<think>")
        parsers = [ChatOutputParser(start_reasoning, use_tools, parse_reasoning=True) for _ in range(params.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:
            return StreamingResponse(chat_stream(req, handle, parsers, rid, now, len(ids), request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _until_disconnect(request, [handle], chat_full(req, handle, parsers, rid, now, len(ids),
                                                                    request))

    def make_matchers(req: ChatCompletionRequest, tools, named, thinking: bool, n: int):
        rf = req.response_format
        want_tools = tools and (req.tool_choice == "required" or named)
        if not want_tools and (rf is None or rf.type == "text"):
            return None
        if compiler is None:
            raise APIError(400, "constrained decoding (response_format, tool_choice required/named) needs the "
                           "llguidance package: pip install 'mimoflash[serve]'", "response_format")
        if getattr(llm.engine, "drafter", None) is not None:
            # MTP verify steps score several positions per request; the masks are built for one row per request.
            raise APIError(400, "constrained decoding (response_format, tool_choice required/named) is not "
                           "available while the server runs MTP speculative decoding (--mtp)",
                           "response_format" if not want_tools else "tool_choice")
        if want_tools and rf is not None and rf.type != "text":
            raise APIError(400, "response_format cannot be combined with a forced tool call", "response_format")
        try:
            if want_tools:
                grammar = compiler.tool_calls(tools, only=named, allow_think=thinking,
                                              multiple=named is None and req.parallel_tool_calls)
            elif rf.type == "json_object":
                grammar = compiler.json_schema(None)
            else:
                if rf.json_schema is None or rf.json_schema.schema_ is None:
                    raise APIError(400, "response_format json_schema needs json_schema.schema",
                                   "response_format.json_schema")
                grammar = compiler.json_schema(rf.json_schema.schema_)
            return [compiler.matcher(grammar) for _ in range(n)]
        except ValueError as e:
            raise APIError(400, str(e), "tools" if want_tools else "response_format.json_schema")

    async def chat_full(req, handle, parsers, rid, now, n_prompt, request) -> dict:
        texts_lp: list[list] = [[] for _ in parsers]
        finish: list[str | None] = [None] * len(parsers)
        n_gen, mx = 0, None
        deltas = {i: ParsedAcc() for i in range(len(parsers))}
        try:
            async for out in handle:
                for o in out.outputs:
                    p = parsers[o.index]
                    n_gen += len(o.token_ids)
                    deltas[o.index].add(p.feed(o.text, final=o.finish_reason is not None,
                                               num_tokens=len(o.token_ids)))
                    if req.logprobs:
                        texts_lp[o.index] += logprob_entries(o)
                    finish[o.index] = o.finish_reason
                mx = out.metrics or mx
        except EngineDead as e:
            raise APIError(503, str(e))
        finally:
            handle.abort()
        choices = []
        for i, p in enumerate(parsers):
            acc = deltas[i]
            calls = p.tool_calls()
            msg: dict[str, Any] = {"role": "assistant", "content": acc.content if (acc.content or not calls) else None}
            if p.saw_reasoning or acc.reasoning:
                msg["reasoning_content"] = acc.reasoning if req.include_reasoning else None
            if calls:
                msg["tool_calls"] = calls
            reason = finish[i]
            if calls and reason == "stop":
                reason = "tool_calls"
            choices.append({"index": i, "message": msg, "finish_reason": reason,
                            "logprobs": {"content": [_chat_lp(c, t, req.top_logprobs or 0) for c, t in texts_lp[i]]}
                            if req.logprobs else None})
        u = usage(n_prompt, n_gen, sum(p.reasoning_tokens for p in parsers), mx)
        account(u)
        return {"id": rid, "object": "chat.completion", "created": now, "model": cfg.served_model_name,
                "choices": choices, "usage": u, "system_fingerprint": None}

    async def chat_stream(req, handle, parsers, rid, now, n_prompt, request) -> AsyncIterator[str]:
        chunk = _ChunkWriter(rid, "chat.completion.chunk", now, cfg.served_model_name, req.stream_options)
        n_gen, mx = 0, None
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(parsers))], lambda: usage(n_prompt, 0, 0))
            async for batch in handle.batches():
                merged: dict[int, dict] = {}                  # choice index -> its chunk entry for this batch
                for out in batch:
                    for o in out.outputs:
                        p = parsers[o.index]
                        n_gen += len(o.token_ids)
                        d = p.feed(o.text, final=o.finish_reason is not None, num_tokens=len(o.token_ids))
                        e = merged.setdefault(o.index, {"index": o.index, "delta": {}, "logprobs": None,
                                                        "finish_reason": None})
                        delta = e["delta"]
                        if d.reasoning and req.include_reasoning:
                            delta["reasoning_content"] = delta.get("reasoning_content", "") + d.reasoning
                        if d.content:
                            delta["content"] = delta.get("content", "") + d.content
                        if d.tool_calls:
                            delta.setdefault("tool_calls", []).extend(d.tool_calls)
                        reason = o.finish_reason
                        if reason == "stop" and p.calls:
                            reason = "tool_calls"
                        e["finish_reason"] = reason or e["finish_reason"]
                        if req.logprobs and o.token_ids:
                            e["logprobs"] = e["logprobs"] or {"content": []}
                            e["logprobs"]["content"] += [_chat_lp(c, t, req.top_logprobs or 0)
                                                         for c, t in logprob_entries(o)]
                    mx = out.metrics or mx
                choices = [e for e in merged.values() if e["delta"] or e["finish_reason"] or e["logprobs"]]
                if choices:
                    yield chunk(choices, lambda: usage(n_prompt, n_gen, sum(p.reasoning_tokens for p in parsers),
                                                       mx))
            u = usage(n_prompt, n_gen, sum(p.reasoning_tokens for p in parsers), mx)
            account(u)
            yield chunk.final(u)
        except EngineDead as e:
            yield f"data: {json.dumps(error_body(503, str(e)))}\n\n"
        finally:
            handle.abort()                 # a no-op when finished; frees the cache when the client went away

    # ------------------------------------------------------------------ completions
    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported", "best_of")
        prompts = _prompts(req.prompt)
        vocab = llm.model.config.vocab_size
        encoded = []
        for k, p in enumerate(prompts):
            if isinstance(p, str):
                if tok is None:
                    raise APIError(400, "this model has no tokenizer: send token ids", "prompt")
                try:
                    ids = tok.encode(p)
                except ValueError as e:                         # e.g. a lone surrogate in the prompt
                    raise APIError(400, str(e), "prompt")
                if not ids:
                    raise APIError(400, "the prompt is empty", "prompt")
                encoded.append((ids, p))
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
                encoded.append((list(p), None))
        params = [sampling(req, req.max_tokens, 16, len(ids), req.logprobs) for ids, _ in encoded]
        handles = []
        try:
            for (ids, text), sp in zip(encoded, params):
                handles.append(await submit(ids, sp, text))
        except BaseException:
            for h in handles:
                h.abort()
            raise
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        echo = [((text if text is not None else (tok.decode(ids) if tok else "")) if req.echo else "")
                for ids, text in encoded]
        if req.stream:
            return StreamingResponse(completion_stream(req, handles, rid, now, encoded, echo),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _until_disconnect(request, handles, completion_full(req, handles, rid, now, encoded, echo))

    async def completion_full(req, handles, rid, now, encoded, echo) -> dict:
        n = req.n
        texts = [""] * (len(handles) * n)
        lps: list[list] = [[] for _ in texts]
        finish: list[str | None] = [None] * len(texts)
        n_gen, mxs = 0, []
        try:
            async for k, out in _merge(handles):
                for o in out.outputs:
                    j = k * n + o.index
                    texts[j] += o.text
                    n_gen += len(o.token_ids)
                    if req.logprobs is not None:
                        lps[j] += logprob_entries(o)
                    finish[j] = o.finish_reason
                mxs.append(out.metrics)
        except EngineDead as e:
            raise APIError(503, str(e))
        finally:
            for h in handles:
                h.abort()
        choices = []
        for j, t in enumerate(texts):
            k = j // n
            lp = _completion_lp(lps[j], req.logprobs, len(echo[k])) if req.logprobs is not None else None
            choices.append({"index": j, "text": echo[k] + t, "logprobs": lp, "finish_reason": finish[j]})
        u = usage(sum(len(ids) for ids, _ in encoded), n_gen, 0, _sum_metrics(mxs))
        account(u)
        return {"id": rid, "object": "text_completion", "created": now, "model": cfg.served_model_name,
                "choices": choices, "usage": u, "system_fingerprint": None}

    async def completion_stream(req, handles, rid, now, encoded, echo) -> AsyncIterator[str]:
        chunk = _ChunkWriter(rid, "text_completion", now, cfg.served_model_name, req.stream_options)
        n = req.n
        n_prompt = sum(len(ids) for ids, _ in encoded)
        n_gen, mxs = 0, []
        sent_echo = set()
        try:
            async for batch in _merge_batches(handles):
                merged: dict[int, dict] = {}
                for k, out in batch:
                    for o in out.outputs:
                        j = k * n + o.index
                        n_gen += len(o.token_ids)
                        text = o.text
                        if j not in sent_echo:
                            text, _ = echo[k] + text, sent_echo.add(j)
                        e = merged.setdefault(j, {"index": j, "text": "", "logprobs": None, "finish_reason": None})
                        e["text"] += text
                        e["finish_reason"] = o.finish_reason or e["finish_reason"]
                        if req.logprobs is not None and o.token_ids:
                            lp = _completion_lp(logprob_entries(o), req.logprobs, 0)
                            if e["logprobs"] is None:
                                e["logprobs"] = lp
                            else:
                                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                                    e["logprobs"][key] += lp[key]
                    mxs.append(out.metrics)
                choices = [e for e in merged.values() if e["text"] or e["finish_reason"] or e["logprobs"]]
                if choices:
                    yield chunk(choices, lambda: usage(n_prompt, n_gen, 0, _sum_metrics(mxs)))
            u = usage(n_prompt, n_gen, 0, _sum_metrics(mxs))
            account(u)
            yield chunk.final(u)
        except EngineDead as e:
            yield f"data: {json.dumps(error_body(503, str(e)))}\n\n"
        finally:
            for h in handles:
                h.abort()

    app.include_router(v1)
    app.add_middleware(BodySizeLimit, limit=cfg.max_body_bytes)
    return app


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class _ChunkWriter:
    """SSE chunks of one streamed response. The fields every chunk repeats (id, object, created, model) are encoded
    once; per chunk only the choices (and the usage) are. `stream_options.include_usage` adds `"usage": null` to
    every chunk and a last chunk with the usage and no choices; with `continuous_usage_stats` too, every chunk
    carries the usage so far (as vLLM does)."""

    def __init__(self, rid: str, obj: str, created: int, model: str, stream_options):
        self.prefix = "data: " + _encode({"id": rid, "object": obj, "created": created, "model": model,
                                          "system_fingerprint": None})[:-1] + ',"choices":'
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.continuous = self.include_usage and stream_options.continuous_usage_stats

    def __call__(self, choices: list, usage_so_far=None) -> str:
        """`usage_so_far`: a callable giving the usage up to this chunk (called only when the client asked)."""
        if not self.include_usage:
            return f"{self.prefix}{_encode(choices)}}}\n\n"
        u = _encode(usage_so_far()) if self.continuous and usage_so_far is not None else "null"
        return f"{self.prefix}{_encode(choices)},\"usage\":{u}}}\n\n"

    def final(self, usage_: dict) -> str:
        """The usage chunk (when asked for) and the end of the stream."""
        head = f"{self.prefix}[],\"usage\":{_encode(usage_)}}}\n\n" if self.include_usage else ""
        return head + "data: [DONE]\n\n"


async def _until_disconnect(request: Request, handles, work):
    """Await a non-streaming response; if the client goes away first, abort its requests (freeing their caches)
    instead of generating for nobody. Streaming responses get this from Starlette, which cancels them."""
    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        for h in handles:
            h.abort()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    finally:
        watcher.cancel()


class ParsedAcc:
    """Concatenation of a choice's parsed deltas (non-streaming responses)."""

    def __init__(self):
        self.reasoning, self.content = "", ""

    def add(self, d) -> None:
        self.reasoning += d.reasoning
        self.content += d.content


async def _merge(handles) -> AsyncIterator[tuple[int, Any]]:
    """Interleave the deltas of several handles as they arrive: -> (handle index, delta)."""
    if len(handles) == 1:
        async for out in handles[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k, h):
        try:
            async for out in h:
                await q.put((k, out))
        except BaseException as e:
            await q.put((k, e))
        finally:
            await q.put((k, None))

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            k, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()


async def _merge_batches(handles) -> AsyncIterator[list[tuple[int, Any]]]:
    """Like `_merge`, in batches of everything available at once (see RequestHandle.batches)."""
    if len(handles) == 1:
        async for batch in handles[0].batches():
            yield [(0, out) for out in batch]
        return
    async for item in _merge(handles):
        yield [item]


def _sum_metrics(mxs: list):
    """Speculative-decoding figures summed over several requests (one per prompt); None without MTP."""
    steps = sum(getattr(m, "verify_steps", 0) or 0 for m in mxs if m is not None)
    if not steps:
        return None
    acc = sum(getattr(m, "accepted_tokens", 0) or 0 for m in mxs if m is not None)
    return SimpleNamespace(verify_steps=steps, accepted_tokens=acc)


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _message_dict(m) -> dict:
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    content = m.content
    if isinstance(content, list):
        content = "".join(p.text for p in content)
    d["content"] = content if content is not None else ""
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in m.tool_calls]
    if m.reasoning_content is not None:
        d["reasoning_content"] = m.reasoning_content
    if m.name is not None:
        d["name"] = m.name
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


def _tok_lp(token: str | None, logprob: float) -> dict:
    t = token or ""
    return {"token": t, "logprob": max(logprob, -9999.0), "bytes": list(t.encode("utf-8"))}


def _chat_lp(chosen, top, n_top: int) -> dict:
    entry = _tok_lp(chosen.decoded_token if chosen else None, chosen.logprob if chosen else -9999.0)
    entry["top_logprobs"] = [_tok_lp(lp.decoded_token, lp.logprob) for _, lp in top[:n_top]]
    return entry


def _completion_lp(entries: list, n_top: int, offset0: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset0
    for chosen, top in entries:
        t = (chosen.decoded_token if chosen else "") or ""
        tokens.append(t)
        token_lps.append(max(chosen.logprob, -9999.0) if chosen else None)
        tops.append({(lp.decoded_token or ""): max(lp.logprob, -9999.0) for _, lp in top[:n_top]} if n_top else None)
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _version() -> str:
    from .. import __version__
    return __version__

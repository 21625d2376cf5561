"""Client mistakes as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`, `param` naming the
field. Validation errors (pydantic), `APIError`s raised by the routes, Starlette's HTTP errors and oversized bodies
all end up in that shape; anything else is a 500 that names only the exception type (and is logged)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mimoflash.serve")


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


def install_error_handlers(app: FastAPI) -> None:
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

"""Errors to HTTP, in one place: every error body is OpenAI-shaped, `/api` ones included.

`{"error": {"message", "type", "param", "code", "detail"?}}`, so one client-side parser reads them all.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hal0.errors import Hal0Error, openai_error_body

log = logging.getLogger("hal0.api")


error_body = openai_error_body


def error_response(status: int, code: str, message: str, detail: dict[str, Any] | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, detail, param), status_code=status, headers=headers)


def hal0_error_response(exc: Hal0Error) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.detail or None)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 401: "unauthorized"}


def install(app: FastAPI) -> None:
    @app.exception_handler(Hal0Error)
    async def _hal0(request: Request, exc: Hal0Error) -> JSONResponse:
        return hal0_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{loc + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        return error_response(400, "invalid_request", message,
                              {"errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors]},
                              param=loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), message,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see hal0's log")

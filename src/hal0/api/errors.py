"""Errors to HTTP, in one place: every error body is OpenAI-shaped, `/api` ones included.

`{"error": {"message", "type", "param", "code", "detail"?}}`, so one client-side parser reads them all.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from hal0.errors import Hal0Error, openai_error_body

error_body = openai_error_body


class Invalid(Exception):
    """A request that does not match its route's declaration (pydantic's error shape: `loc`, `msg`), answered 400.
    FastAPI answered these 422; hal0 answers 400 in the OpenAI shape, as every other bad request."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def error_response(status: int, code: str, message: str, detail: dict[str, Any] | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, detail, param), status_code=status, headers=headers)


def hal0_error_response(exc: Hal0Error) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.detail or None)


def invalid_response(exc: Invalid) -> JSONResponse:
    """400 `invalid_request`: the first error in the message (`field: what is wrong`), all of them in `detail`."""
    first = exc.errors[0] if exc.errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = f"{loc + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
    return error_response(400, "invalid_request", message,
                          {"errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors]},
                          param=loc)


def unexpected_response(exc: Exception) -> JSONResponse:
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see hal0's log")


#: The codes of the errors the routing itself answers.
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}

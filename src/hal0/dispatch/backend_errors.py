"""A backend's error answers in hal0's error shape: a stable string `code` (llama-server's is a number), the
backend's message kept, and Anthropic's shape on Anthropic-style endpoints.
"""

from __future__ import annotations

import json
from typing import Any

from hal0.errors import anthropic_error_body, openai_error_body


def anthropic_path(path: str) -> bool:
    """Anthropic-style endpoints answer errors in Anthropic's shape, which its SDK parses."""
    return path.startswith("/v1/messages")


#: hal0's stable string code for an error a backend answered with: llama-server's own `code` is the HTTP status
#: as a number, which clients that switch on OpenAI's string codes cannot use.
_BACKEND_CODES = {400: "backend_invalid_request", 401: "backend_unauthorized", 403: "backend_forbidden",
                  404: "backend_not_found", 413: "backend_request_too_large", 422: "backend_invalid_request",
                  429: "backend_busy", 501: "backend_not_supported", 503: "backend_unavailable"}


def backend_error_bytes(status: int, body: bytes, anthropic: bool) -> bytes:
    """A backend's error answer in hal0's error shape: its message kept, a string `code`, what the backend said
    (its own code and type) under `detail`."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        err = {"message": body.decode("utf-8", "replace")[:2000] or f"backend answered HTTP {status}"}
    code = err.get("code")
    if isinstance(code, str) and "param" in err and not anthropic:
        return body  # already hal0's shape (hal0's own speech servers)
    detail: dict[str, Any] = {"backend_status": status}
    if code is not None and not isinstance(code, str):
        detail["backend_code"] = code
    if isinstance(err.get("type"), str):
        detail["backend_type"] = err["type"]
    if not isinstance(code, str) or not code:
        code = _BACKEND_CODES.get(status, "backend_error" if status >= 500 else "backend_invalid_request")
    message = err.get("message")
    text = message if isinstance(message, str) else json.dumps(message)
    shape = anthropic_error_body if anthropic else openai_error_body
    return json.dumps(shape(status, code, text, detail)).encode()


def error_headers(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...],
                   body: bytes) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k not in (b"content-length", b"content-type", b"content-encoding")]
    return [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

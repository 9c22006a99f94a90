"""The one error hierarchy of hal0.

Every error has a stable `code` and an HTTP `status`; the API converts them to JSON in one place.
"""

from __future__ import annotations

from typing import Any


def openai_error_body(status: int, code: str, message: str, detail: dict[str, Any] | None = None,
                      param: str | None = None) -> dict[str, Any]:
    """The one error body of every hal0 HTTP answer, OpenAI's shape: `{"error": {message, type, param, code}}`."""
    kind = {401: "authentication_error", 403: "authentication_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    err: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if detail:
        err["detail"] = detail
    return {"error": err}


#: Anthropic's error `type` for each HTTP status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    529: "overloaded_error"}


def anthropic_error_body(status: int, code: str, message: str,
                         detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """The error body of Anthropic-style endpoints (/v1/messages): `{"type": "error", "error": {type, message}}`,
    with hal0's stable `code` (and `detail`) beside them."""
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    err: dict[str, Any] = {"type": kind, "message": message, "code": code}
    if detail:
        err["detail"] = detail
    return {"type": "error", "error": err}


class Hal0Error(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, detail: dict[str, Any] | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.detail: dict[str, Any] = detail or {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail:
            out["detail"] = self.detail
        return out


class ConfigError(Hal0Error):
    code = "config_error"
    status = 400


class InvalidRequest(Hal0Error):
    code = "invalid_request"
    status = 400


class NotFound(Hal0Error):
    code = "not_found"
    status = 404


class Conflict(Hal0Error):
    code = "conflict"
    status = 409


class IllegalTransition(Hal0Error):
    """A lifecycle transition outside the table: a bug, never a user error."""

    code = "illegal_transition"
    status = 409


class SlotNotFound(NotFound):
    code = "slot_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ModelChanged(Hal0Error):
    """A model's file on disk is not the one its manifest describes (changed or truncated after import)."""

    code = "model_changed"
    status = 409


class PortUnavailable(Hal0Error):
    code = "port_unavailable"
    status = 409


class DiskFull(Hal0Error):
    """hal0 could not write its own state: the disk (or quota) is full. Nothing changed."""

    code = "disk_full"
    status = 507


class BackendError(Hal0Error):
    """A backend failed to start, warm up or answer; detail holds exit code, log tail and probe."""

    code = "backend_error"
    status = 503


class BinaryNotFound(BackendError):
    code = "binary_not_found"


class UpstreamError(Hal0Error):
    code = "upstream_error"
    status = 502


class PeerUnreachable(UpstreamError):
    """No peer that serves the model took the request (each refused the connection or is down)."""

    code = "peer_unreachable"


class RegistryError(Hal0Error):
    code = "registry_error"
    status = 400


class InvalidRef(InvalidRequest):
    code = "invalid_ref"


class ModelInUse(Conflict):
    code = "model_in_use"


class LoadoutNotFound(NotFound):
    code = "loadout_not_found"


class InsufficientMemory(Conflict):
    code = "insufficient_memory"


class InsufficientDisk(RegistryError):
    code = "insufficient_disk"
    status = 507


class PullError(RegistryError):
    """A pull failed at its source; subclasses name why. Status 502: the fault is upstream, not the caller."""

    code = "pull_failed"
    status = 502


class SourceUnauthorized(PullError):
    code = "source_unauthorized"


class SourceNotFound(PullError):
    code = "source_not_found"
    status = 404


class PullInterrupted(PullError):
    code = "pull_interrupted"


class ChecksumMismatch(PullError):
    code = "checksum_mismatch"

"""What the speech providers share: the command line of a server hal0 ships, its readiness probe, and the
structured errors for a missing runtime or model files.
"""

from __future__ import annotations

import io
import re
import sys
import wave
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from hal0.backends.layout import RUNTIME_EXTRAS, LayoutProblem, missing_modules
from hal0.client import HttpClient, HttpError, Response, Timeout
from hal0.errors import BackendError, BinaryNotFound
from hal0.providers.base import Answering, Command, LaunchSpec, ProbeResult, sentinel_or_held

#: Opens the one real request a probe makes (a transcription, a speech clip).
Sentinel = Callable[[HttpClient, str], AbstractAsyncContextManager[Response]]
PROBE_TIMEOUT = Timeout(total=60, connect=1)
_REASON = re.compile(r"(error|failed|exception|invalid|unable|cannot|not found|no such|not installed|missing)",
                     re.IGNORECASE)


class RuntimeNotInstalled(BinaryNotFound):
    """The Python runtime of a speech engine is absent: install the speech extra."""

    code = "runtime_not_installed"


class ModelFilesMissing(BackendError):
    """The slot's model is not in a layout the provider's engine can load."""

    code = "model_files_missing"
    status = 409


def require_runtime(engine: str, provider: str) -> None:
    missing = missing_modules(engine)
    if missing:
        extra = RUNTIME_EXTRAS[engine]
        raise RuntimeNotInstalled(
            f"the {engine} runtime of provider {provider} is not installed (missing Python module "
            f"{', '.join(missing)}): install it with `pip install '{extra}'`",
            detail={"engine": engine, "missing_modules": missing, "install": f"pip install '{extra}'"})


def require_layout(problem: LayoutProblem, provider: str, model_path: Path, hint: str) -> BackendError:
    return ModelFilesMissing(f"{problem.message}; {hint}",
                             detail={"provider": provider, "model_path": str(model_path),
                                     "missing": list(problem.missing)})


def server_command(module: str, spec: LaunchSpec, *extra: str) -> Command:
    """`python -m hal0.backends.<module>` with the interpreter hal0 runs on (its venv holds the runtime)."""
    argv = [sys.executable, "-m", f"hal0.backends.{module}", "--host", spec.host, "--port", str(spec.port),
            "--model", str(spec.model_path), "--alias", spec.slot, *extra, *spec.extra_args]
    env = {"PYTHONUNBUFFERED": "1", **spec.env}
    return Command(tuple(argv), env)


def silent_wav(seconds: float = 0.25, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))
    return buf.getvalue()


async def probe_server(client: HttpClient, base_url: str, listing: str,
                       sentinel: Sentinel, answering: Answering | None = None,
                       ) -> ProbeResult:
    """/health 200 (503 while the model loads), a non-empty listing, then one real request."""
    try:
        async with client.get(f"{base_url}/health", timeout=PROBE_TIMEOUT) as resp:
            if resp.status != 200:
                body = await resp.text()
                return ProbeResult(False, "health", resp.status, body[:300], loading=resp.status == 503)
        async with client.get(f"{base_url}{listing}", timeout=PROBE_TIMEOUT) as resp:
            data = await resp.json() if resp.status == 200 else None
            if not (isinstance(data, dict) and data.get("data")):
                return ProbeResult(False, "models", resp.status, f"nothing listed by {listing}")
        held = answering() if answering is not None else None
        return await sentinel_or_held(held, lambda: _sentinel_call(client, base_url, sentinel))
    except (HttpError, OSError, ValueError) as exc:
        return ProbeResult(False, "connect", None, f"{type(exc).__name__}: {exc}")


async def _sentinel_call(client: HttpClient, base_url: str, sentinel: Sentinel) -> ProbeResult:
    async with sentinel(client, base_url) as resp:
        body_bytes = await resp.read()
        if resp.status != 200:
            return ProbeResult(False, "sentinel", resp.status, body_bytes[:300].decode(errors="replace"),
                               loading=resp.status == 503)
        if not body_bytes:
            return ProbeResult(False, "sentinel", resp.status, "the sentinel request returned nothing")
    return ProbeResult(True, "sentinel", 200, "ok")


def explain(what: str, exit_code: int | None, log_tail: list[str]) -> str:
    reasons = [line.strip() for line in log_tail if _REASON.search(line) and not line.startswith("=== hal0")]
    if reasons:
        return "; ".join(reasons[-2:])
    if exit_code is not None:
        return f"{what} exited with code {exit_code}"
    return f"{what} stopped answering"

"""The CLI's HTTP client: every `hal0` command except `serve` talks to the running API through it.

Errors from the API come back as `Hal0Error` with the API's code and message, so the CLI prints them plainly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from hal0.errors import Hal0Error


class ApiUnreachable(Hal0Error):
    code = "api_unreachable"


class ApiClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnreachable(
                f"cannot reach the hal0 API at {self.base_url} ({exc}); is `hal0 serve` running?"
            ) from exc
        return _decode(resp)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def stream_events(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Yield the JSON data of each server-sent event from `path` until the server closes."""
        try:
            with self._client.stream("GET", path, params=params, timeout=None) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _decode(resp)
                data: list[str] = []
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif line == "" and data:
                        yield json.loads("\n".join(data))
                        data = []
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"cannot reach the hal0 API at {self.base_url} ({exc})") from exc


def _decode(resp: httpx.Response) -> Any:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code >= 400:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            raise Hal0Error(str(err.get("message", "")), code=str(err.get("code", "error")),
                            detail=err.get("detail") or None, status=resp.status_code)
        raise Hal0Error(f"HTTP {resp.status_code}: {resp.text[:500]}", status=resp.status_code)
    return body

"""Security defaults: loopback only, optional API keys on /v1 and /api, CORS closed."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import Hal0


def test_api_keys_guard_v1_and_api(hal0_factory: Any) -> None:
    h: Hal0 = hal0_factory(None)
    h.start(env={"HAL0_API_KEYS": "k-one,k-two"})
    for path in ("/v1/models", "/api/slots", "/api/decisions"):
        resp = h.client.get(path)
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert h.client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert h.client.get(path, headers={"Authorization": "Bearer k-two"}).status_code == 200
    assert h.client.get("/v1/models", headers={"x-api-key": "k-one"}).status_code == 200
    assert h.client.get("/api/health").status_code == 200
    client = openai.OpenAI(base_url=f"{h.url}/v1", api_key="k-one")
    assert client.models.list().data == []
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{h.url}/v1", api_key="nope").models.list()
    with pytest.raises(anthropic.AuthenticationError) as refused:  # /v1/messages refuses in Anthropic's shape
        anthropic.Anthropic(base_url=h.url, api_key="nope", max_retries=0).messages.create(
            model="primary", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.body == {"type": "error", "error": {
        "type": "authentication_error", "code": "invalid_api_key", "message": refused.value.body["error"]["message"]}}


def test_cors_is_closed_by_default(hal0_factory: Any) -> None:
    h: Hal0 = hal0_factory(None)
    h.start()
    resp = h.client.get("/api/slots", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in resp.headers
    preflight = h.client.options("/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_non_loopback_bind_needs_api_keys(tmp_path: Any) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hal0.cli", "serve", "--host", "0.0.0.0", "--port", "1", "--no-demo"],
        env={"HAL0_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "HAL0_API_KEYS" in proc.stderr


def test_request_id_is_echoed_and_hostile_ids_replaced(hal0_factory: Any) -> None:
    h: Hal0 = hal0_factory(None)
    h.start()
    assert h.client.get("/v1/models", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    hostile = h.client.get("/v1/models", headers={"X-Request-Id": "a b\tc" + "x" * 300})
    assert hostile.headers["x-request-id"] != "a b\tc" and len(hostile.headers["x-request-id"]) == 32

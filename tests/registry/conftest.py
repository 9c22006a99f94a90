"""Fixtures of the registry tests: a temp HAL0_HOME and a real loopback file server with failure modes."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from hal0.registry.pull import Registry
from hal0.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(config_dir=tmp_path / "config", state_dir=tmp_path / "state", log_dir=tmp_path / "logs")
    s.ensure_dirs()
    return s


@pytest.fixture
async def registry(settings: Settings, file_server: FileServer) -> AsyncIterator[Registry]:
    reg = Registry(settings, hf_endpoint=file_server.url + "/hf", hf_token="hf_secret", retries=0,
                   retry_delay=0.0, progress_interval=0.0)
    yield reg
    await reg.aclose()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FileServer:
    """Serves `files` with Range support. Paths:
    /files/NAME            plain
    /drop/NAME             sends half the body then drops the connection, `drops_left` times
    /lie/NAME              advertises a wrong sha256 (x-linked-etag)
    /auth/NAME             401 unless the request carries `Authorization: Bearer hf_secret`
    /hf/OWNER/REPO/resolve/REV/NAME  redirects to /cdn/NAME with x-linked-etag = the real sha256
    anything else          404
    """

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    ranges: list[str] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    drops_left: int = 1

    def add(self, name: str, size: int) -> bytes:
        data = os.urandom(size)
        self.files[name] = data
        return data


_RANGE_RE = re.compile(r"^bytes=(\d+)-$")


async def _send(request: web.Request, data: bytes, *, drop: bool = False,
                headers: dict[str, str] | None = None) -> web.StreamResponse:
    start = 0
    status = 200
    out_headers = dict(headers or {})
    rng = request.headers.get("Range")
    if rng:
        m = _RANGE_RE.match(rng)
        assert m, rng
        start = int(m.group(1))
        if start >= len(data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        status = 206
        out_headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
    body = data[start:]
    resp = web.StreamResponse(status=status, headers=out_headers)
    resp.content_length = len(body)
    await resp.prepare(request)
    if drop:
        await resp.write(body[: len(body) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp
    await resp.write(body)
    await resp.write_eof()
    return resp


@pytest.fixture
async def file_server() -> AsyncIterator[FileServer]:
    server = FileServer()

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        server.requests[path] += 1
        server.ranges.append(request.headers.get("Range", ""))
        server.auth_headers.append(request.headers.get("Authorization"))
        parts = path.strip("/").split("/")
        kind, name = parts[0], parts[-1]
        data = server.files.get(name)
        if data is None:
            return web.Response(status=404, text="no such file")
        if kind == "files" or kind == "cdn":
            return await _send(request, data)
        if kind == "drop":
            drop = server.drops_left > 0
            server.drops_left -= 1
            return await _send(request, data, drop=drop)
        if kind == "lie":
            return await _send(request, data, headers={"X-Linked-ETag": f'"{"0" * 64}"'})
        if kind == "auth":
            if request.headers.get("Authorization") != "Bearer hf_secret":
                return web.Response(status=401, text="unauthorized")
            return await _send(request, data)
        if kind == "hf" and len(parts) >= 6 and parts[3] == "resolve":
            return web.Response(status=302, headers={"Location": f"{server.url}/cdn/{name}",
                                                     "X-Linked-ETag": f'"{sha256(data)}"'})
        return web.Response(status=404, text="not found")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()

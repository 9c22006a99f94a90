"""The client: requests over pooled keep-alive connections, with connect, read and total timeouts.

A request on a reused connection that the server closed in that instant (it answered nothing) goes once more on
a fresh one: the server never saw it. Nothing else is retried.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import os
from collections.abc import Generator, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from hal0.client.connection import Connection, Response
from hal0.client.errors import ConnectFailed, ConnectTimeout, Disconnected
from hal0.datatypes import datatype
from hal0.eventloop import tls_protocol

if TYPE_CHECKING:
    import ssl as _ssl_types

Headers = Iterable[tuple[bytes, bytes]] | Mapping[str, str]
_Key = tuple[str, str, int]
_PORTS = {"http": 80, "https": 443}
#: Idle connections kept per server: more than any backend's in-flight limit, so a burst's connections are
#: reused by the next one.
IDLE_PER_SERVER = 64


@datatype(frozen=True, slots=True)
class Timeout:
    """`connect`: to open a connection; `read`: each wait for the next bytes of the answer (a long stream is fine,
    a silent server is not); `total`: the whole exchange, connect to the last body byte. None: no limit."""

    total: float | None = None
    connect: float | None = None
    read: float | None = None


class HttpClient:
    """HTTP/1.1 to backends and peers (plain HTTP, or TLS for an https peer); one per process, closed by its
    owner. No decompression, no cookies, no redirects: the bytes of the answer are the backend's."""

    def __init__(self, keepalive_s: float = 30.0) -> None:
        self._keepalive_s = keepalive_s
        self._idle: dict[_Key, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._ssl: _ssl_types.SSLContext | None = None

    def request(self, method: str, url: str, *, body: bytes = b"", json: Any = None, headers: Headers = (),
                timeout: Timeout = Timeout()) -> _Pending:
        """`await client.request(...)` gives the response once its head arrived; `async with` releases it too."""
        return _Pending(self._exchange(method, url, body, json, headers, timeout))

    def get(self, url: str, *, headers: Headers = (), timeout: Timeout = Timeout()) -> _Pending:
        return self.request("GET", url, headers=headers, timeout=timeout)

    def post(self, url: str, *, body: bytes = b"", json: Any = None, headers: Headers = (),
             timeout: Timeout = Timeout()) -> _Pending:
        return self.request("POST", url, body=body, json=json, headers=headers, timeout=timeout)

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()

    # -- inside --------------------------------------------------------------------------------------------
    async def _exchange(self, method: str, url: str, body: bytes, json: Any, headers: Headers,
                        timeout: Timeout) -> Response:
        loop = asyncio.get_running_loop()
        deadline = None if timeout.total is None else loop.time() + timeout.total
        scheme, host, port, authority, target = _split_url(url)
        if json is not None:
            body = jsonlib.dumps(json).encode()
        head = _head(method, target, authority, body, json is not None, headers)
        key = (scheme, host, port)
        conn = self._reuse(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(key, timeout, deadline)
            resp = Response(conn, self._put_back, method == "HEAD", timeout.read, deadline)
            try:
                conn.send(head, body, resp)
                await resp.wait_head()
            except Disconnected:
                conn.close()
                if reused and not resp.received:
                    conn, reused = None, False
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return resp

    def _reuse(self, key: _Key) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                if conn.idle_timer is not None:
                    conn.idle_timer.cancel()
                    conn.idle_timer = None
                return conn
        return None

    async def _connect(self, key: _Key, timeout: Timeout, deadline: float | None) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        conn = Connection(key, self._lost)
        limit = timeout.connect
        if deadline is not None:
            left = deadline - loop.time()
            limit = left if limit is None else min(limit, left)
        # TLS through asyncio's protocol over a plain connection, not the loop's `ssl=`: the API imports uvloop
        # without ssl (hal0.eventloop), and this way works on every loop.
        handshake: asyncio.Future[None] | None = None
        protocol: asyncio.BaseProtocol = conn
        if scheme == "https":
            handshake = loop.create_future()
            protocol = tls_protocol(loop, conn, self._ssl_context(), host, handshake)
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(limit):
                transport, _ = await loop.create_connection(lambda: protocol, host, port)
                if handshake is not None:
                    await handshake
        except BaseException as exc:  # a timeout, a refusal, a failed handshake, the caller's cancel
            conn.close()
            if transport is not None:  # connected, the handshake not done: the plain connection is closed too
                transport.close()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"{host}:{port} did not take the connection within {limit:.3g}s") from None
            if isinstance(exc, OSError):
                raise ConnectFailed(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
            raise
        self._open.add(conn)
        return conn

    def _put_back(self, conn: Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= IDLE_PER_SERVER:
            conn.close()
            return
        conn.idle_timer = asyncio.get_running_loop().call_later(self._keepalive_s, conn.close)
        idle.append(conn)

    def _lost(self, conn: Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def _ssl_context(self) -> _ssl_types.SSLContext:
        if self._ssl is None:  # built once, for the first https peer: most nodes never need it
            import ssl

            self._ssl = ssl.create_default_context()
        return self._ssl


class _Pending:
    """A request on its way: awaitable (the response) and an async context manager (released on the way out)."""

    __slots__ = ("_exchange", "_response")

    def __init__(self, exchange: Any) -> None:
        self._exchange = exchange
        self._response: Response | None = None

    def __await__(self) -> Generator[Any, None, Response]:
        return self._exchange.__await__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> Response:
        self._response = await self._exchange
        return self._response

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._response is not None
        await self._response.__aexit__(exc_type, exc, tb)


def _split_url(url: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, authority, target) of an http(s) URL; ValueError for anything else."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _PORTS:
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    slash = rest.find("/")
    authority, target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    if authority.startswith("["):  # an IPv6 literal: [::1]:8080
        host, _, port_part = authority[1:].partition("]")
        port_part = port_part.removeprefix(":")
    else:
        host, _, port_part = authority.rpartition(":") if ":" in authority else (authority, "", "")
    if not host or (port_part and not port_part.isdigit()):
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    return scheme, host, int(port_part) if port_part else _PORTS[scheme], authority, target


def _head(method: str, target: str, authority: str, body: bytes, is_json: bool, headers: Headers) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n".encode("latin-1")]
    pairs = ((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()) \
        if isinstance(headers, Mapping) else headers
    typed = False
    for name, value in pairs:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
            raise ValueError(f"header {name[:100]!r} holds a line break")
        lowered = name.lower()
        if lowered in (b"host", b"content-length", b"transfer-encoding"):
            continue
        typed = typed or lowered == b"content-type"
        lines.append(name + b": " + value + b"\r\n")
    if is_json and not typed:
        lines.append(b"Content-Type: application/json\r\n")
    if body or method not in ("GET", "HEAD"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    return b"".join(lines)


def form_body(fields: Mapping[str, str], files: Iterable[tuple[str, str, str, bytes]] = ()) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type: text `fields`, then `files` as (field, filename,
    content type, bytes)."""
    boundary = "hal0-" + os.urandom(12).hex()
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + value.encode() + b"\r\n")
    for name, filename, content_type, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"

"""hal0's HTTP/1.1 server on a loopback port: what clients see on the wire (raw sockets for the protocol's edges,
httpx as a real client), flow control both ways, deadlines, failures of the app and the graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from hal0.server import HIGH_WATER, MAX_HEAD_BYTES, STARTUP_FAILED, Server, listen
from hal0.server.connection import _STATUS_LINES, DISCONNECT, status_line

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        chunks.append(message["body"])
        if not message["more_body"]:
            return b"".join(chunks)


class Echo:
    """Answers with what it was asked: the method, path, query and body; records every scope."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        body = await read_body(receive)
        text = f"{scope['method']} {scope['path']} {scope['query_string'].decode()} {len(body)}".encode()
        headers = [(b"content-type", b"text/plain")]
        if scope["path"] != "/chunked":
            headers.append((b"content-length", str(len(text)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": text})


@contextlib.asynccontextmanager
async def serving(app: Any, **kw: Any) -> AsyncIterator[tuple[Server, int, asyncio.Task[int]]]:
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = Server(app, **{"lifespan": False, **kw})
    task = asyncio.create_task(server.serve([sock]))
    async with asyncio.timeout(10):
        await server.started.wait()
    try:
        yield server, port, task
    finally:
        server.exit(force=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


async def exchange(port: int, raw: bytes, *, until_close: bool = True, timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read() if until_close else await reader.read(65536)
    finally:
        writer.close()


async def test_keep_alive_and_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    app = Echo()
    async with serving(app) as (_, port, _task):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            first = await client.get("/a?x=1")
            second = await client.post("/b", content=b"hello")
            assert (first.text, second.text) == ("GET /a x=1 0", "POST /b  5")
            assert first.headers["date"].endswith(" GMT")
        # Two requests in one write: the second waits for the first, and both come back in order.
        raw = (b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
               b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
        answer = await exchange(port, raw)
        assert answer.count(b"HTTP/1.1 200 OK") == 2
        assert answer.index(b"GET /one") < answer.index(b"POST /two  3")
        assert answer.rstrip().endswith(b"POST /two  3")
    assert [s["path"] for s in app.scopes][-2:] == ["/one", "/two"]
    scope = app.scopes[0]
    assert scope["client"][0] == "127.0.0.1" and scope["server"][1] == port
    assert scope["headers"][0][0] == scope["headers"][0][0].lower()


async def test_framing_chunked_http10_head_and_percent_decoded_paths() -> None:
    async with serving(Echo()) as (_, port, _task):
        chunked = await exchange(port, b"GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"transfer-encoding: chunked" in chunked and chunked.endswith(b"0\r\n\r\n")
        # HTTP/1.0 knows no chunks: the body runs to the connection's end.
        old = await exchange(port, b"GET /chunked HTTP/1.0\r\n\r\n")
        assert b"transfer-encoding" not in old and b"connection: close" in old
        assert old.endswith(b"GET /chunked  0")
        head = await exchange(port, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"content-length: 10" in head and head.endswith(b"\r\n\r\n")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/a%20b/c")).text == "GET /a b/c  0"
            # A chunked request body (no content-length) arrives whole.
            parts = [b"x" * 1000] * 50

            async def gen() -> AsyncIterator[bytes]:
                for part in parts:
                    yield part

            assert (await client.post("/up", content=gen())).text == "POST /up  50000"


def test_status_lines_are_worded_as_the_stdlib_words_them() -> None:
    """hal0's own table (kept so that a start need not import `http`) says what `http.HTTPStatus` says, on this
    Python; a status outside it gets the stdlib's phrase, and one with no phrase a line that still parses."""
    from http import HTTPStatus

    for code in _STATUS_LINES:
        assert status_line(code) == f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\n".encode()
    assert status_line(418) == f"HTTP/1.1 418 {HTTPStatus(418).phrase}\r\n".encode()
    assert status_line(599) == b"HTTP/1.1 599 \r\n"


async def test_an_answer_carries_the_status_line_of_its_code() -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": int(scope["path"][1:]),
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async with serving(app) as (_, port, _task):
        for code, line in ((200, b"HTTP/1.1 200 OK\r\n"), (503, b"HTTP/1.1 503 Service Unavailable\r\n"),
                           (507, b"HTTP/1.1 507 Insufficient Storage\r\n"), (599, b"HTTP/1.1 599 \r\n")):
            answer = await exchange(port, b"GET /%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % code)
            assert answer.startswith(line), answer


async def test_bad_requests_are_refused_and_closed() -> None:
    async with serving(Echo()) as (_, port, _task):
        answer = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer
        huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n\r\n"
        answer = await exchange(port, huge)
        assert answer.startswith(b"HTTP/1.1 431 ")


async def test_expect_100_continue_gets_its_interim_answer_when_the_app_reads() -> None:
    async with serving(Echo()) as (_, port, _task):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"body")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(10) == b"POST /c  4"
        writer.close()


async def test_a_request_head_has_a_deadline_and_so_has_an_idle_connection() -> None:
    async with serving(Echo(), head_timeout_s=0.3, keep_alive_s=0.5) as (_, port, _task):
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = loop.time()
        writer.write(b"GET / HTTP/1.1\r\n")
        for _ in range(20):  # a byte now and then does not buy time
            await asyncio.sleep(0.05)
            with contextlib.suppress(ConnectionError):
                writer.write(b"X")
        async with asyncio.timeout(5):
            try:
                assert await reader.read() == b""
            except ConnectionError:  # the server closed it while a byte was on its way: closed all the same
                pass
        assert loop.time() - started < 3
        writer.close()
        # A kept-alive connection is closed once idle past keep_alive_s, not before.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"GET /k  0")
            await asyncio.sleep(0.2)
            writer.write(b"GET /k2 HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"GET /k2  0")
            assert await reader.read() == b""
        writer.close()


async def test_a_client_that_goes_away_is_seen_by_the_app_as_a_disconnect() -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        message = await receive()  # waits: the body is over, the response is not
        await seen.put(message["type"])
        await send({"type": "http.response.body", "body": b"late", "more_body": True})  # dropped, no error

    async with serving(app) as (_, port, _task):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"first")
            writer.close()
            assert await seen.get() == "http.disconnect"


async def test_the_disconnect_extension_calls_back_once_when_the_client_goes_and_not_after_unwatch() -> None:
    calls: list[str] = []
    watching = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await read_body(receive)
        extension = scope["extensions"][DISCONNECT]
        extension["watch"](lambda: calls.append("watched"))
        taken_back = lambda: calls.append("taken back")  # noqa: E731
        extension["watch"](taken_back)
        extension["unwatch"](taken_back)
        watching.set()
        if scope["path"] == "/answered":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await asyncio.sleep(30)  # no `receive`: only the extension can tell the client went

    async with serving(app) as (_, port, _task):
        # A complete answer is not a disconnect: closing the kept-alive connection after it calls nothing.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /answered HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"ok")
        writer.close()
        await asyncio.sleep(0.1)
        assert calls == []
        watching.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /waits HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await watching.wait()
            writer.close()
            while not calls:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert calls == ["watched"]


async def test_a_failing_app_gets_500_before_its_answer_and_a_closed_connection_after() -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["path"] == "/late":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        elif scope["path"] == "/started":
            await send({"type": "http.response.start", "status": 200, "headers": []})  # no body bytes yet
        elif scope["path"] == "/quiet":
            return  # returns without an answer
        elif scope["path"] == "/fine":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        raise RuntimeError("boom")

    async with serving(app) as (_, port, _task):
        early = await exchange(port, b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n")
        assert early.startswith(b"HTTP/1.1 500 ") and early.endswith(b"Internal Server Error")
        quiet = await exchange(port, b"GET /quiet HTTP/1.1\r\nHost: x\r\n\r\n")
        assert quiet.startswith(b"HTTP/1.1 500 ")
        # A head not yet written when the app fails (it waits for the body's first bytes) becomes a 500.
        started = await exchange(port, b"GET /started HTTP/1.1\r\nHost: x\r\n\r\n")
        assert started.startswith(b"HTTP/1.1 500 ") and b"200" not in started
        late = await exchange(port, b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
        # The head went out: the client sees a body cut short (no closing chunk), never a second status line.
        assert late.startswith(b"HTTP/1.1 200 OK") and b"partial" in late and not late.endswith(b"0\r\n\r\n")
        # The server still serves.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/fine")).text == "ok"


async def test_a_body_the_app_does_not_read_stops_the_socket_and_a_reader_that_does_not_read_stops_send() -> None:
    gate = asyncio.Event()
    sent = 0
    total = 32 << 20

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        nonlocal sent
        if scope["path"] == "/upload":
            await gate.wait()  # not reading: the server must stop reading too
            size = len(await read_body(receive))
            body = str(size).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(total).encode())]})
        chunk = b"z" * (1 << 20)
        while sent < total:
            sent += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": sent < total})

    async with serving(app) as (server, port, _task):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        upload = 64 << 20
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % upload)
        writer.write(b"u" * upload)
        await asyncio.sleep(0.5)
        conn = next(iter(server.connections))
        assert conn.read_paused
        assert conn.exchange is not None and len(conn.exchange.body) <= HIGH_WATER + (4 << 20)
        gate.set()
        async with asyncio.timeout(30):
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(len(str(upload))) == str(upload).encode()
        # Download, not read for a while: the app's send waits instead of buffering 32 MiB.
        writer.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.5)
        assert sent < total // 2, f"{sent} bytes handed to a client that reads nothing"
        got = 0
        async with asyncio.timeout(30):
            await reader.readuntil(b"\r\n\r\n")
            while got < total:
                got += len(await reader.read(1 << 20))
        assert got == total
        writer.close()


async def test_lifespan_runs_around_serving_and_a_stop_lets_a_response_in_progress_finish() -> None:
    events: list[str] = []
    release = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            events.append("startup")
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            events.append("shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return
        events.append("request")
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"done"})

    async with serving(app, graceful_s=10, lifespan=True) as (server, port, task):
        assert events == ["startup"]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            pending = asyncio.create_task(client.get("/slow"))
            while "request" not in events:
                await asyncio.sleep(0.01)
            server.exit()
            await asyncio.sleep(0.2)
            with pytest.raises(httpx.ConnectError):  # the listening socket is closed
                await httpx.AsyncClient().get(f"http://127.0.0.1:{port}/new")
            assert not task.done() and "shutdown" not in events
            release.set()
            resp = await pending
            assert resp.text == "done" and resp.headers["connection"] == "close"
        assert await asyncio.wait_for(task, 10) == 0
    assert events == ["startup", "request", "shutdown"]


async def test_a_lifespan_that_fails_to_start_never_serves() -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no state folder"})

    sock = listen("127.0.0.1", 0)
    assert await asyncio.wait_for(Server(app).serve([sock]), 10) == STARTUP_FAILED
    sock.close()


async def test_a_second_stop_during_the_graceful_wait_cancels_what_still_runs() -> None:
    """The graceful wait ends with the last request, or at once on a second signal (`exit` again, as a second
    SIGTERM does): the request still running is cancelled and the server returns, long before `graceful_s`."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving(app, graceful_s=3600) as (server, port, task):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            pending = asyncio.create_task(client.get("/forever"))
            await asyncio.wait_for(started.wait(), 10)
            server.exit()
            await asyncio.sleep(0.1)
            assert not task.done(), "the first stop waits for the request"
            server.exit()
            assert await asyncio.wait_for(task, 10) == 0
            assert cancelled.is_set()
            try:
                answer = (await pending).status_code
            except httpx.TransportError:
                answer = None
            assert answer is None or answer >= 500, answer  # never answered as if it had run

"""hal0's HTTP client (hal0.client) against a loopback server that answers exactly the bytes each test scripts:
the body framings, keep-alive reuse, a server that closes without saying, one that goes silent, flow control."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
import uvloop

from hal0.client import ConnectFailed, Disconnected, HttpClient, ReadTimeout, Timeout
from hal0.client.connection import HIGH_WATER

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Scripted:
    """A server whose handler sees each request (head and body) and writes the answer; it returns whether the
    connection stays open for the next request."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                if not await self.handler(request, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


#: The head of a chunked answer and its first chunk, "a": a stream whose rest each test sends its own way.
STREAM_A = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n"


def answer(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), b"".join(x + b"\r\n" for x in extra),
                                                                    body)


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[HttpClient]:
    c = HttpClient()
    try:
        yield c
    finally:
        await c.close()


async def test_bodies_by_length_chunks_and_close_are_read_whole() -> None:
    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if b"/length" in request:
            writer.write(answer(b'{"a": 1}', b"Content-Type: application/json"))
        elif b"/chunked" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        else:  # no length: the body ends where the server closes
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            await writer.drain()
            return False
        await writer.drain()
        return True

    async with Scripted(handler) as server, client() as c:
        async with c.get(f"{server.url}/length") as resp:
            assert resp.status == 200 and resp.header(b"content-type") == "application/json"
            assert await resp.json() == {"a": 1}
        async with c.post(f"{server.url}/chunked", body=b"x") as resp:
            assert await resp.read() == b"hello world"
        async with c.get(f"{server.url}/close") as resp:
            assert await resp.text() == "until the end"
        assert server.connections == 1  # all three on one kept-alive connection, which the server then closed
        assert server.requests[1].endswith(b"Content-Length: 1\r\n\r\nx")
        async with c.get(f"{server.url}/length") as resp:
            assert await resp.read() == b'{"a": 1}'
        assert server.connections == 2


async def test_a_kept_alive_connection_the_server_closed_silently_is_retried_once_on_a_fresh_one() -> None:
    # llama-server closes the connection after an event stream without `Connection: close`.
    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(b"ok"))
        await writer.drain()
        return False

    async with Scripted(handler) as server, client() as c:
        for _ in range(3):
            async with c.post(f"{server.url}/v1/completions", json={"prompt": "a"}) as resp:
                assert await resp.read() == b"ok"
        assert len(server.requests) == 3  # each request reached the server exactly once


async def test_a_fresh_connection_that_dies_before_the_answer_is_not_retried() -> None:
    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False  # reads the request, answers nothing, closes

    async with Scripted(handler) as server, client() as c:
        with pytest.raises(Disconnected):
            await c.post(f"{server.url}/v1/completions", json={"prompt": "a"})
        assert len(server.requests) == 1


async def test_a_server_that_closes_mid_body_is_a_disconnect_and_its_connection_is_not_reused() -> None:
    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        return False

    async with Scripted(handler) as server, client() as c:
        resp = await c.get(f"{server.url}/")
        assert resp.status == 200
        with pytest.raises(Disconnected):
            await resp.read()
        resp.release()
        with pytest.raises(Disconnected):
            await (await c.get(f"{server.url}/")).read()
        assert server.connections == 2


async def test_a_silent_server_times_out_and_the_connection_is_closed() -> None:
    async def handler(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if b"/head" in request:
            await reader.read()  # never answers: returns once the client closes
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await writer.drain()
        await reader.read()
        return False

    async with Scripted(handler) as server, client() as c:
        with pytest.raises(ReadTimeout):
            await c.get(f"{server.url}/head", timeout=Timeout(read=0.2))
        resp = await c.get(f"{server.url}/body", timeout=Timeout(read=0.2))
        assert await resp.read_some() == b"first"
        with pytest.raises(TimeoutError):  # ReadTimeout is a TimeoutError, as callers catch it
            await resp.read_some()
        resp.close()
        with pytest.raises(ReadTimeout):  # the total limit covers the body as well
            await (await c.get(f"{server.url}/body", timeout=Timeout(total=0.3))).read()
        assert not c._open or all(conn.closed for conn in c._open)


async def test_a_refused_connection_is_connect_failed() -> None:
    async with Scripted(lambda *_: asyncio.sleep(0, False)) as server:
        url = server.url
    async with client() as c:
        with pytest.raises(ConnectFailed):
            await c.get(url + "/health")


async def test_a_slow_reader_stops_reading_the_socket_past_the_high_water_mark() -> None:
    total = 64 << 20
    sent = 0

    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * (1 << 20)
        while sent < total:
            writer.write(block)
            await writer.drain()
            sent += len(block)
        return True

    async with Scripted(handler) as server, client() as c:
        resp = await c.get(f"{server.url}/big")
        await asyncio.sleep(0.5)
        # What the client buffered plus what the kernel's socket buffers hold: far less than the body.
        assert sent < 32 << 20
        assert resp._size <= HIGH_WATER + (1 << 20)
        received = 0
        while data := await resp.read_some():
            received += len(data)
        assert received == total
        resp.release()


async def test_interim_answers_are_skipped_and_lines_are_read_one_at_a_time() -> None:
    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(answer(b"data: 1\n\ndata: 2\n\ntail"))
        await writer.drain()
        return True

    async with Scripted(handler) as server, client() as c:
        async with c.get(f"{server.url}/events") as resp:
            assert resp.status == 200
            lines = [await resp.readline() for _ in range(6)]
        assert lines == [b"data: 1\n", b"\n", b"data: 2\n", b"\n", b"tail", b""]


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(b"ok"))
        return True

    async with Scripted(handler) as server, client() as c:
        with pytest.raises(ValueError, match="line break"):
            await c.get(f"{server.url}/", headers={"X-Injected": "a\r\nHost: elsewhere"})
        assert server.requests == []


async def test_held_reading_resumes_and_the_connection_is_reused() -> None:
    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(STREAM_A)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"1\r\nb\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async with Scripted(handler) as server, client() as c:
        for _ in range(2):
            resp = await c.get(f"{server.url}/stream")
            assert await resp.read_some() == b"a"
            assert resp.hold()
            await asyncio.sleep(0.1)
            resp.resume()
            assert await resp.read() == b"b"
            resp.release()
        assert server.connections == 1


async def test_gathering_ends_as_soon_as_the_server_closes_not_at_the_end_of_the_window() -> None:
    # llama-server closes the connection right after a stream's last event: a proxy gathering events for a
    # window must hand those on at once, or every stream's end waits out the rest of the window.
    await _gathering_ends_when_the_server_closes()


def test_gathering_ends_when_the_server_closes_on_the_api_s_own_loop() -> None:
    # uvloop, which the API runs: the socket of a transport closed meanwhile refuses its options differently.
    uvloop.run(_gathering_ends_when_the_server_closes())


async def test_bytes_already_read_do_not_cut_a_gather_short() -> None:
    # What came while the last batch was being written waits for the window with what comes next: one write.
    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(STREAM_A)
        await writer.drain()
        await asyncio.sleep(0.03)
        writer.write(b"1\r\nb\r\n")
        await writer.drain()
        await asyncio.sleep(0.6)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async with Scripted(handler) as server, client() as c:
        resp = await c.get(f"{server.url}/stream")
        assert await resp.read_some() == b"a"
        await asyncio.sleep(0.1)  # "b" is read meanwhile
        gather = asyncio.ensure_future(resp.gather(0.3))
        await asyncio.sleep(0.05)
        assert not gather.done()
        await gather
        assert await resp.read() == b"b"
        resp.release()


def test_a_server_that_drops_the_connection_during_a_gather_ends_it_with_the_answer_s_error() -> None:
    async def scenario() -> None:
        gathering = asyncio.Event()

        async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
            writer.write(STREAM_A)
            await writer.drain()
            await gathering.wait()
            return False  # closes mid-body

        async with Scripted(handler) as server, client() as c:
            resp = await c.get(f"{server.url}/stream")
            assert await resp.read_some() == b"a"
            gather = asyncio.ensure_future(resp.gather(60))
            await asyncio.sleep(0)
            gathering.set()
            await asyncio.wait_for(gather, 10)
            with pytest.raises(Disconnected):
                await resp.read()
            resp.close()

    uvloop.run(scenario())


async def _gathering_ends_when_the_server_closes() -> None:
    gathering = asyncio.Event()

    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(STREAM_A)
        await writer.drain()
        await gathering.wait()
        writer.write(b"1\r\nb\r\n0\r\n\r\n")
        await writer.drain()
        return False  # closes

    async with Scripted(handler) as server, client() as c:
        resp = await c.get(f"{server.url}/stream")
        assert await resp.read_some() == b"a"
        gather = asyncio.ensure_future(resp.gather(60))
        await asyncio.sleep(0)
        gathering.set()
        await asyncio.wait_for(gather, 10)  # the window is 60 s
        assert await resp.read() == b"b"
        resp.release()


async def test_gathering_holds_a_few_bytes_for_the_window_and_the_connection_is_reused() -> None:
    sent = asyncio.Event()

    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if request.startswith(b"GET /again"):
            writer.write(answer(b"again"))
            await writer.drain()
            return True
        writer.write(STREAM_A)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"1\r\nb\r\n")
        await writer.drain()
        sent.set()
        await asyncio.sleep(0.5)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async with Scripted(handler) as server, client() as c:
        resp = await c.get(f"{server.url}/stream")
        assert await resp.read_some() == b"a"
        gather = asyncio.ensure_future(resp.gather(0.3))
        await sent.wait()
        await asyncio.sleep(0.05)
        assert not gather.done(), "a few bytes do not end the window"
        await gather
        assert await resp.read_some() == b"b"
        assert await resp.read() == b""
        resp.release()
        # The socket wakes the client for every byte again: a short answer on the same connection is read.
        async with c.get(f"{server.url}/again") as again:
            assert await asyncio.wait_for(again.read(), 10) == b"again"
        assert server.connections == 1


async def test_the_answer_to_a_head_request_has_no_body_and_its_connection_is_not_reused() -> None:
    async def handler(request: bytes, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = b"" if request.startswith(b"HEAD") else b"hello"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        await writer.drain()
        return True

    async with Scripted(handler) as server, client() as c:
        async with c.request("HEAD", f"{server.url}/") as resp:
            assert resp.status == 200 and await resp.read() == b""
        async with c.get(f"{server.url}/") as resp:
            assert await resp.read() == b"hello"
        assert server.connections == 2


# -- TLS (an https peer) ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


async def over_tls(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(answer(b"over tls"))
    return True


@pytest.fixture
def tls_server(tls_ca: trustme.CA, tmp_path: Path) -> tuple[Scripted, Path]:
    """A server with a certificate for 127.0.0.1 that answers "over tls", and its CA's PEM (`SSL_CERT_FILE`)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(context)
    tls_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return Scripted(over_tls, context), tmp_path / "ca.pem"


async def test_https_is_spoken_over_asyncios_tls_protocol_and_kept_alive(
        tls_server: tuple[Scripted, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    scripted, ca = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # what create_default_context trusts
    async with scripted as server, client() as c:
        for _ in range(2):
            async with await c.get(server.url + "/x") as resp:
                assert (resp.status, await resp.read()) == (200, b"over tls")
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /x HTTP/1.1\r\n")


async def test_a_certificate_for_another_name_is_refused_at_connect(
        tls_server: tuple[Scripted, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    scripted, ca = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    async with scripted as server, client() as c:
        with pytest.raises(ConnectFailed, match=r"localhost:\d+: .*CERTIFICATE_VERIFY_FAILED.*localhost"):
            await c.get(f"https://localhost:{server.port}/x")
    assert server.requests == []


#: A process that imports its event loop as `hal0 serve` does (hal0.eventloop), then asks for the server's URL
#: twice over TLS and prints what it got.
_NO_SSL_CLIENT = textwrap.dedent("""
    import sys
    from hal0.eventloop import import_without_ssl
    assert import_without_ssl()
    import asyncio, uvloop
    assert "ssl" not in sys.modules, "ssl imported with the event loop"
    from hal0.client import HttpClient

    async def main():
        import ssl
        try:  # uvloop's own TLS is the stand-in's: proof that hal0's does not go through it
            await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", int(sys.argv[2]),
                                                               ssl=ssl.create_default_context())
        except RuntimeError as exc:
            print("uvloop tls:", type(exc).__name__)
        c = HttpClient()
        for _ in range(2):
            async with await c.get(sys.argv[1]) as resp:
                print(resp.status, (await resp.read()).decode())
        await c.close()

    uvloop.run(main())
""")


async def test_https_works_in_a_process_whose_event_loop_was_imported_without_ssl(
        tls_server: tuple[Scripted, Path]) -> None:
    scripted, ca = tls_server
    async with scripted as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _NO_SSL_CLIENT, server.url + "/x", str(server.port),
            env={**os.environ, "SSL_CERT_FILE": str(ca)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["uvloop tls: UvloopTLSUnavailable", "200 over tls", "200 over tls"]
    assert server.connections == 1  # one kept-alive TLS connection


async def test_a_request_cancelled_during_the_tls_handshake_closes_its_connection() -> None:
    # A server that takes the connection and never answers the handshake: the client gives up (its caller's
    # cancel), and the half-made TLS connection must not be left open.
    connected, closed = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        while await reader.read(65536):
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client() as c:
            request = asyncio.ensure_future(c.get(f"https://127.0.0.1:{port}/x"))
            await asyncio.wait_for(connected.wait(), 5)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            await asyncio.wait_for(closed.wait(), 5)
    finally:
        server.close()

"""One HTTP/1.1 connection to a server (an asyncio protocol fed to httptools' response parser) and the response
being received on it: head, then body bytes as they arrive, with flow control.

One exchange at a time per connection (no pipelining); the client's pool owns idle connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import httptools

from hal0.client.errors import Disconnected, ProtocolError, ReadTimeout

#: Bytes a response may buffer unread before the connection stops reading from the socket (the server then
#: blocks on its send): a client that reads slowly costs the server's socket buffer, not this process's memory.
HIGH_WATER = 4 << 20

#: While an answer's bytes are gathered (`Response.gather`), the kernel wakes this process for the socket only once
#: this many bytes wait there, or the server has closed it (SO_RCVLOWAT): ~60 streamed tokens' events.
GATHER_BYTES = 16 << 10


class Connection(asyncio.Protocol):
    """A connection the client opened. `key` is (scheme, host, port); `lost` tells the client it closed."""

    def __init__(self, key: tuple[str, str, int], lost: Callable[[Connection], None]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: The response being received, None while the connection is idle.
        self.response: Response | None = None
        #: The pool's timer that closes the connection once it has been idle too long.
        self.idle_timer: asyncio.TimerHandle | None = None
        self._lost = lost
        self._parser = httptools.HttpResponseParser(self)

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # an idle connection has nothing to say: a server that talks anyway is not reused
            self.close()
            return
        resp.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp.fail(ProtocolError(f"the server's answer is not HTTP/1.1: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return False  # a half-closed connection is of no use: let the transport close it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self._lost(self)
        if self.response is not None:
            self.response.lost(exc)

    # -- httptools callbacks ------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response.head(self._parser.get_status_code(), self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response.complete()

    # -- use ----------------------------------------------------------------------------------------------
    def send(self, head: bytes, body: bytes, response: Response) -> None:
        assert self.transport is not None
        self.response = response
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class Response:
    """An answer as it arrives: `status` and `headers` (names lower-cased) once `head` is awaited, then the body
    through `read_some`, `chunks`, `read`. Hand the connection back with `release` (reused when the answer was
    read to its end) or `close` (which tells the server to stop)."""

    def __init__(self, conn: Connection, release: Callable[[Connection], None], head_only: bool,
                 read_s: float | None, deadline: float | None) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        #: True once any byte of the answer arrived: a request on a reused connection that dies before is retried.
        self.received = False
        self._conn = conn
        self._release = release
        self._head_only = head_only
        self._read_s = read_s
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._chunks: list[bytes] = []
        self._size = 0
        self._keep_alive = False
        self._has_head = False
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._flow_paused = False
        self._held = False
        self._done = False

    # -- fed by the connection ----------------------------------------------------------------------------
    def head(self, status: int, keep_alive: bool) -> None:
        if status < 200:  # an interim answer (100 Continue): the real one follows on the same connection
            self.headers.clear()
            return
        self.status = status
        self._keep_alive = keep_alive
        self._has_head = True
        if self._head_only:  # the parser would take the next answer's bytes for this one's body: not reused
            self._complete = True
            self._keep_alive = False
        self._wake()

    def feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._size += len(body)
        if self._size > HIGH_WATER and not self._flow_paused:
            self._flow_paused = True
            self._set_reading()
        self._wake()

    def complete(self) -> None:
        if self._has_head:
            self._complete = True
            self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def lost(self, exc: Exception | None) -> None:
        if self._complete:
            return
        if self._has_head and not self._keep_alive and self._delimited_by_close():
            self._complete = True  # a body without a length ends where the server closes
            self._wake()
            return
        why = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        self.fail(Disconnected(f"the server closed the connection before its answer was complete{why}"))

    # -- read by the caller -------------------------------------------------------------------------------
    async def wait_head(self) -> None:
        while not self._has_head:
            if self._error is not None:
                raise self._error
            await self._wait()

    def header(self, name: bytes) -> str | None:
        """The value of header `name` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    async def read_some(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); b"" at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._flow_paused:
            self._flow_paused = False
            self._set_reading()
        return data

    def chunks(self) -> _Chunks:
        """`async for chunk in response.chunks()`: the body as it arrives."""
        return _Chunks(self)

    async def readline(self) -> bytes:
        """The next line of the body with its b"\\n" (the rest of the body at its end; b"" after it)."""
        pending = b""
        while True:
            chunk = await self.read_some()
            if not chunk:
                return pending
            data = pending + chunk
            end = data.find(b"\n")
            if end >= 0:
                if end + 1 < len(data):
                    self._chunks.insert(0, data[end + 1:])
                    self._size += len(data) - end - 1
                return data[:end + 1]
            pending = data

    async def read(self) -> bytes:
        parts = []
        while data := await self.read_some():
            parts.append(data)
        return b"".join(parts)

    async def text(self) -> str:
        return (await self.read()).decode("utf-8", "replace")

    async def json(self) -> Any:
        return json.loads(await self.read())

    def at_eof(self) -> bool:
        """The body has ended and every byte of it was read."""
        return self._complete and not self._chunks

    @property
    def ended(self) -> bool:
        """The server has sent the whole body (some may still be unread)."""
        return self._complete

    async def gather(self, window: float) -> None:
        """Leave the socket unread for up to `window` seconds, so what the server sends meanwhile is read and
        parsed (and forwarded by the caller) together: per read, a process pays a few system calls and a wake-up
        of its event loop. The wait ends early once GATHER_BYTES wait in the socket or the server closes it, as
        llama-server does right after a stream's last event: the kernel withholds the socket's readiness until
        then (SO_RCVLOWAT), so the end of an answer is not held back for the rest of the window. Where the
        option cannot be set, reading pauses for the whole window."""
        transport = self._conn.transport
        if self._complete or self._held or transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, GATHER_BYTES)
        except (AttributeError, OSError, ValueError):
            if self.hold():
                try:
                    await asyncio.sleep(window)
                finally:
                    self.resume()
            return
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(window, _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self._waiter is waiter:
                self._waiter = None
            # Back to waking for every byte; the kernel signals at once what waits already. A connection the
            # server closed meanwhile has no socket left (uvloop's says so with ValueError).
            if not self._conn.closed:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                except (OSError, ValueError):
                    self._conn.close()  # a socket whose wake-ups cannot be restored is not read again

    def hold(self) -> bool:
        """Stop reading the socket for a while (see `resume`); False where there is nothing to hold."""
        transport = self._conn.transport
        if self._complete or self._held or transport is None or transport.is_closing():
            return False
        self._held = True
        self._set_reading()
        return True

    def resume(self) -> None:
        if self._held:
            self._held = False
            self._set_reading()

    def release(self) -> None:
        """Done with the answer: a connection whose answer ended (and may be kept alive) goes back to the pool."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if self._complete and self._keep_alive and self._error is None and not conn.closed:
            conn.response = None
            if self._held or self._flow_paused:
                self._held = self._flow_paused = False
                self._set_reading()
            self._release(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Done with the answer, which may not have ended: the connection is closed."""
        self._done = True
        self._conn.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        if exc is None:
            self.release()
        else:
            self.close()

    # -- inside --------------------------------------------------------------------------------------------
    def _delimited_by_close(self) -> bool:
        return not any(k in (b"content-length", b"transfer-encoding") for k, _ in self.headers)

    def _set_reading(self) -> None:
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            return
        if self._held or self._flow_paused:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        wait_s = self._read_s
        if self._deadline is not None:
            left = self._deadline - self._loop.time()
            wait_s = left if wait_s is None else min(wait_s, left)
        if wait_s is None:
            await waiter
            return
        if wait_s <= 0:
            self._conn.close()
            raise ReadTimeout("the server's answer took longer than its timeout")
        timer = self._loop.call_later(wait_s, _expire, waiter, wait_s)
        try:
            await waiter
        except ReadTimeout:
            self._conn.close()  # what the server sends later belongs to no one
            raise
        finally:
            timer.cancel()


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None], wait_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeout(f"the server sent nothing for {wait_s:.3g}s"))


class _Chunks:
    __slots__ = ("_response",)

    def __init__(self, response: Response) -> None:
        self._response = response

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        data = await self._response.read_some()
        if not data:
            raise StopAsyncIteration
        return data


"""One HTTP/1.1 connection a client opened (an asyncio protocol fed to httptools' request parser), and the exchange
of one request and its response on it, as ASGI's `receive` and `send`.

Requests on a connection are answered one at a time, in order: a pipelined request waits, its bytes unread, until
the one before it is answered. Flow control both ways: a request body the app does not read stops the socket
being read past `HIGH_WATER` bytes, and a response the client does not read makes `send` wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools

if TYPE_CHECKING:
    from hal0.server.core import Server

Message = dict[str, Any]
Scope = dict[str, Any]
#: An ASGI 3 app: `await app(scope, receive, send)`.
App = Callable[..., Awaitable[None]]

log = logging.getLogger("hal0.server")

#: Request body bytes buffered unread before the socket stops being read (the client then blocks on its send).
HIGH_WATER = 64 * 1024
#: A request head (request line and headers) longer than this is answered 431 and the connection closed.
MAX_HEAD_BYTES = 64 * 1024

#: Bytes a response header's name (RFC 9110 token) or value (no control character but tab) may not hold: a
#: header is refused when deleting them changes it (`bytes.translate` in C, without a regular expression).
_BAD_NAME = bytes(range(0x20)) + b'\x7f()<>@,;:[]={} \t\\"'
_BAD_VALUE = bytes(range(0x09)) + bytes(range(0x0a, 0x20)) + b"\x7f"
_SAME = bytes(range(256))
ASGI = {"version": "3.0", "spec_version": "2.3"}
#: The scope extension through which an app learns that the client went away without a task that waits on
#: `receive` for `http.disconnect`: `scope["extensions"][DISCONNECT]["watch"](callback)` calls `callback` once,
#: when the client goes before the response is complete; `["unwatch"](callback)` takes it back.
DISCONNECT = "hal0.disconnect"


#: The status lines of the answers hal0 gives itself and most often relays, worded as `http.HTTPStatus` words them
#: on every Python hal0 runs on (tests/test_server.py checks). Any other status's line is built when it is sent,
#: from `http.HTTPStatus`, imported by the first: its two enums were ~2.5 ms of every start (2 cores).
_STATUS_LINES = {code: b"HTTP/1.1 %d %b\r\n" % (code, phrase) for code, phrase in (
    (200, b"OK"), (201, b"Created"), (202, b"Accepted"), (204, b"No Content"), (304, b"Not Modified"),
    (400, b"Bad Request"), (401, b"Unauthorized"), (403, b"Forbidden"), (404, b"Not Found"),
    (405, b"Method Not Allowed"), (408, b"Request Timeout"), (409, b"Conflict"), (429, b"Too Many Requests"),
    (431, b"Request Header Fields Too Large"), (500, b"Internal Server Error"), (502, b"Bad Gateway"),
    (503, b"Service Unavailable"), (504, b"Gateway Timeout"))}


def status_line(code: int) -> bytes:
    """`HTTP/1.1 <code> <phrase>\\r\\n`; a code with no phrase keeps the space before it (it is not optional)."""
    line = _STATUS_LINES.get(code)
    if line is not None:
        return line
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}".encode() + b"\r\n"


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date: tuple[int, bytes] = (0, b"")


def date_header() -> bytes:
    """`date: ...` in the HTTP format, made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        t = time.gmtime(now)
        _date = (now, (f"date: {_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
                       f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT\r\n").encode())
    return _date[1]


def _plain(code: int, text: str) -> bytes:
    """A whole answer the server gives itself (a bad request, a failed app), closing the connection."""
    body = text.encode()
    return b"".join([status_line(code), date_header(), b"content-type: text/plain; charset=utf-8\r\n",
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body])


class Connection(asyncio.Protocol):
    """A client's connection: parses requests, runs one exchange at a time, times out heads and idle keep-alive."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        #: The exchange being answered (None before the first request), and requests parsed while it was.
        self.exchange: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        self.read_paused = False
        self.write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        # The request whose head is being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._expect_continue = False
        self._parsing: Exchange | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass
        self.client = _address(transport.get_extra_info("peername"))
        self.local = _address(transport.get_extra_info("sockname"))
        self.server.connections.add(self)
        self._arm_head()  # the first request's head has the same deadline as every other

    def data_received(self, data: bytes) -> None:
        self._disarm_idle()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrades (websockets): the request is answered as plain HTTP
        except httptools.HttpParserError as exc:  # what a callback raises comes wrapped in one of these
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"Request head exceeds {MAX_HEAD_BYTES} bytes")
            else:
                self._refuse(400, f"Invalid HTTP request: {exc}")

    def eof_received(self) -> bool | None:
        return False  # a half-closed connection gets no answer it could read on: let the transport close it

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.server.stopping:
            self.server.note_gone()
        self._disarm_head()
        self._disarm_idle()
        for exchange in (self.exchange, *self.pipeline, self._parsing):
            if exchange is not None:
                exchange.lost()
        self.pipeline.clear()
        self._resume_writing()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self._resume_writing()

    # -- httptools callbacks --------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._expect_continue = False
        self._arm_head()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4  # `_count`, inlined: this runs for every header
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace, which is not part of a value
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._disarm_head()
        parsed = httptools.parse_url(self._url)
        raw_path: bytes = parsed.path
        path = raw_path.decode("latin-1")
        version = self.parser.get_http_version()
        scope: Scope = {
            "type": "http", "asgi": ASGI, "http_version": version,
            "method": self.parser.get_method().decode("ascii"), "scheme": "http",
            "path": unquote(path) if "%" in path else path, "raw_path": raw_path,
            "query_string": parsed.query or b"", "root_path": "", "headers": self._headers,
            "client": self.client, "server": self.local, "state": {},
        }
        keep_alive = version != "1.0" and self.parser.should_keep_alive()
        exchange = Exchange(self, scope, keep_alive, self._expect_continue)
        self._parsing = exchange
        if self.exchange is None or self.exchange.complete:
            self._start(exchange)
        else:
            self.pipeline.append(exchange)
            self.pause_reading()  # the rest waits in the socket until the request before is answered

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is None or exchange.complete:
            return  # already answered (an early 413, say): the rest of the body is read and dropped
        exchange.body += body
        if len(exchange.body) > HIGH_WATER:
            self.pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange, self._parsing = self._parsing, None
        if exchange is not None:
            exchange.more_body = False
            exchange.wake()

    # -- helpers --------------------------------------------------------------------------------------------
    def _start(self, exchange: Exchange) -> None:
        self.exchange = exchange
        task = self.loop.create_task(exchange.run(self.server.app))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def answered(self, exchange: Exchange) -> None:
        """`exchange`'s response is complete: start the next request, or wait for one."""
        if self.transport is None or self.transport.is_closing():
            return
        if not exchange.keep_alive or self.server.stopping:
            self.transport.close()
            return
        self.resume_reading()
        if self.pipeline:
            self._start(self.pipeline.popleft())
        elif self._parsing is None:
            self._idle_timer = self.loop.call_later(self.server.keep_alive_s, self._expired)

    def shutdown(self) -> None:
        """The server stops: close an idle connection now, a busy one once its response is complete."""
        if self.transport is None:
            return
        if self.exchange is None or self.exchange.complete:
            self.transport.close()
        else:
            self.exchange.keep_alive = False

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()

    def resume_reading_for(self, exchange: Exchange) -> None:
        # Only for the request being answered: pipelined requests stay in the socket until their turn.
        if exchange is self.exchange and not self.pipeline:
            self.resume_reading()

    async def drain(self) -> None:
        if self.write_paused:
            if self._writable is None:
                self._writable = self.loop.create_future()
            await self._writable

    def _resume_writing(self) -> None:
        self.write_paused = False
        if self._writable is not None:
            if not self._writable.done():
                self._writable.set_result(None)
            self._writable = None

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def _refuse(self, code: int, text: str) -> None:
        assert self.transport is not None
        log.debug("closing %s: %s", self.client, text)
        if self.exchange is None or self.exchange.complete:  # never in the middle of another response
            self.transport.write(_plain(code, text))
        self.transport.close()

    def _arm_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.server.head_timeout_s, self._expired)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _expired(self) -> None:
        self._head_timer = self._idle_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over MAX_HEAD_BYTES."""


class Exchange:
    """One request and its response: the ASGI `receive` and `send` of the app call that answers it."""

    def __init__(self, conn: Connection, scope: Scope, keep_alive: bool, expect_continue: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.more_body = True
        self.disconnected = False
        self.started = False
        self.complete = False
        self._continue = expect_continue
        self._waiters: list[asyncio.Future[None]] = []
        self._ended = False  # the body's last message has been received by the app
        self._chunked = False
        self._left: int | None = None  # content-length bytes still to send
        self._head_only = scope["method"] == "HEAD"
        self._pending: bytes | None = None  # the response head, not written yet
        self._watchers: list[Callable[[], None]] = []
        scope["extensions"] = {DISCONNECT: {"watch": self.watch_disconnect, "unwatch": self.unwatch_disconnect}}

    def watch_disconnect(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the client goes away before the response is complete (soon, if it is gone)."""
        if self.disconnected:
            self.conn.loop.call_soon(self._call_if_watched, callback)
        self._watchers.append(callback)

    def unwatch_disconnect(self, callback: Callable[[], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def _call_if_watched(self, callback: Callable[[], None]) -> None:
        if callback in self._watchers:
            self.unwatch_disconnect(callback)
            callback()

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def lost(self) -> None:
        if not self.complete:
            self.disconnected = True
            watchers, self._watchers = self._watchers, []
            for callback in watchers:
                callback()
        self.wake()

    async def run(self, app: App) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self._fail()  # the server's graceful shutdown ran out of time
            raise
        except Exception as exc:
            log.error("the app failed on %s %s", self.scope["method"], self.scope["path"], exc_info=exc)
            self._fail()
        else:
            if not self.complete and not self.disconnected:
                log.error("the app returned without completing its response to %s %s", self.scope["method"],
                          self.scope["path"])
                self._fail()

    def _fail(self) -> None:
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            return
        if not self.started or self._pending is not None:  # nothing of the answer is on the wire yet
            self.started = self.complete = True
            self._pending = None
            transport.write(_plain(500, "Internal Server Error"))
        transport.close()

    # -- ASGI ---------------------------------------------------------------------------------------------
    async def receive(self) -> Message:
        conn = self.conn
        if self._continue and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._continue = False
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if self.body or (not self.more_body and not self._ended):
                body, self.body = bytes(self.body), bytearray()
                self._ended = not self.more_body
                conn.resume_reading_for(self)
                return {"type": "http.request", "body": body, "more_body": self.more_body}
            # Nothing buffered: wait for bytes, the body's end, the response's end or the client leaving.
            conn.resume_reading_for(self)
            waiter = conn.loop.create_future()
            self._waiters.append(waiter)
            await waiter

    async def send(self, message: Message) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected:
            return  # the client is gone: the app learns it from `receive`
        transport = conn.transport
        assert transport is not None
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self.started = True
            self._continue = False
            # Held until the body's first bytes, so that a small answer leaves in one write (one segment, one
            # wake-up of the client), and sent on the loop's next turn if the app has no body bytes yet.
            self._pending = self._head(message)
            conn.loop.call_soon(self._flush)
            return
        if self.complete:
            raise RuntimeError(f"{kind!r} sent after the response was complete")
        if kind != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {kind!r}")
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        data = b""
        if self._head_only:
            pass
        elif self._chunked:
            if body:
                data = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if not more else b"%x\r\n%b\r\n" % (
                    len(body), body)
            elif not more:
                data = b"0\r\n\r\n"
        else:
            if self._left is not None:
                if len(body) > self._left:
                    raise RuntimeError("response body longer than its content-length")
                self._left -= len(body)
            data = body
        if self._pending is not None:
            data, self._pending = self._pending + data, None
        if data:
            transport.write(data)
        if not more:
            if self._left and not self._head_only:
                raise RuntimeError("response body shorter than its content-length")
            self.complete = True
            self.wake()
            conn.answered(self)

    def _flush(self) -> None:
        transport = self.conn.transport
        if self._pending is not None and transport is not None and not transport.is_closing():
            transport.write(self._pending)
        self._pending = None

    def _head(self, message: Message) -> bytes:
        status: int = message["status"]
        out = [status_line(status), date_header()]
        closing = False
        framed = False
        for name, value in message.get("headers", ()):
            if name.translate(_SAME, _BAD_NAME) != name or value.translate(_SAME, _BAD_VALUE) != value:
                raise RuntimeError(f"invalid response header {name!r}: {value!r}")
            name = name.lower()
            if name == b"content-length" and not self._chunked:
                self._left = int(value)
                framed = True
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self._chunked = framed = True
                self._left = None
            elif name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                closing = True
            out += [name, b": ", value, b"\r\n"]
        if not framed and not self._head_only and status not in (204, 304) and status >= 200:
            if self.scope["http_version"] == "1.1":
                self._chunked = True
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads the body to the connection's end
        if not self.keep_alive and not closing:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        return b"".join(out)


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


__all__ = ["ASGI", "DISCONNECT", "HIGH_WATER", "MAX_HEAD_BYTES", "App", "Connection", "Exchange", "date_header"]

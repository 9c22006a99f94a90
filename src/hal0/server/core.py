"""The server: an ASGI app's lifespan, its listening sockets, and a graceful stop on SIGTERM or SIGINT.

A stop closes the listening sockets, closes idle connections, lets busy ones finish their response (for at most
`graceful_s`; then their tasks are cancelled), and ends the app's lifespan. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import MutableMapping, Sequence
from typing import Any

from hal0.server.connection import ASGI, App, Connection, Message, log

#: `serve`'s result when the app's lifespan refused to start (uvicorn's code for it, kept for scripts).
STARTUP_FAILED = 3
#: The first descriptor a socket-activating service manager passes (sd_listen_fds(3)'s SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host has a colon), before any app is started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def inherited_sockets(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The listening sockets a service manager passed this process: systemd's socket activation (`LISTEN_FDS`
    descriptors from 3 on, for the process that `LISTEN_PID` names), as hal0-api.socket does. The variables are
    taken out of the environment whether or not they were meant for this process, so that no backend it spawns
    sees them; [] where none were passed. Such a socket outlives the process: while no API runs (a crash, a
    restart), a client waits in its backlog instead of being refused. OSError for a descriptor that is not a
    listening TCP socket."""
    pid, count = environ.pop("LISTEN_PID", ""), environ.pop("LISTEN_FDS", "")
    environ.pop("LISTEN_FDNAMES", None)
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return []
    out: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise OSError(exc.errno, f"descriptor {fd} is not a socket ({exc.strerror})") from None
        if (sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            sock.detach()
            raise OSError(f"descriptor {fd} is not a listening TCP socket")
        out.append(sock)
    return out


class Server:
    """Serves `app` on sockets that are already listening (the API binds its port before it starts the app)."""

    def __init__(self, app: App, *, head_timeout_s: float = 10.0, keep_alive_s: float = 75.0,
                 graceful_s: float = 5.0, lifespan: bool = True) -> None:
        self.app = app
        #: A request's head (from the connection's open, or from its first byte on a kept-alive connection)
        #: must be complete within this, or the connection is closed: a slow-loris client holds no socket.
        self.head_timeout_s = head_timeout_s
        #: How long an idle kept-alive connection stays open: longer than clients keep theirs (httpx and openai:
        #: 5 s), so the server never closes one in the instant a client reuses it.
        self.keep_alive_s = keep_alive_s
        self.graceful_s = graceful_s
        self.lifespan = lifespan
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by `serve`
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        #: Set once the lifespan has started and the sockets accept connections.
        self.started = asyncio.Event()
        self._exit = asyncio.Event()
        #: Set while stopping once no connection is open and no request runs (or when the wait is skipped).
        self._drained = asyncio.Event()
        self._force = False

    async def serve(self, sockets: Sequence[socket.socket]) -> int:
        """Start the lifespan, serve until `exit`, then stop gracefully. 0, or STARTUP_FAILED."""
        self.loop = asyncio.get_running_loop()
        life = _Lifespan(self.app) if self.lifespan else None
        if life is not None and not await life.startup():
            return STARTUP_FAILED
        servers = [await self.loop.create_server(lambda: Connection(self), sock=sock, backlog=2048)
                   for sock in sockets]
        self.started.set()
        try:
            await self._exit.wait()
        finally:
            await self._stop(servers)
            if life is not None:
                await life.shutdown()
        return 0

    def exit(self, force: bool = False) -> None:
        """Stop serving (from the server's loop); `force`: without waiting for responses in progress."""
        self._force = self._force or force or self._exit.is_set()
        self._exit.set()
        if self._force:
            self._drained.set()

    def note_gone(self) -> None:
        """A connection closed or a request ended while stopping: the stop's wait ends with the last of them."""
        if not self.connections and not self.tasks:
            self._drained.set()

    def run(self, sockets: Sequence[socket.socket]) -> int:
        """Serve on uvloop (asyncio's loop without it) until SIGTERM or SIGINT."""
        factory: Any = None
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(self.serve_with_signals(sockets))

    async def serve_with_signals(self, sockets: Sequence[socket.socket]) -> int:
        """`serve`, stopping on SIGTERM or SIGINT (the second skips the wait for responses in progress)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.exit)
        return await self.serve(sockets)

    async def _stop(self, servers: Sequence[asyncio.AbstractServer]) -> None:
        self.stopping = True
        for server in servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        # Woken by the last connection or request to end, not polled: an idle API stops at once.
        for task in list(self.tasks):
            task.add_done_callback(lambda _task: self.note_gone())
        self.note_gone()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.graceful_s):
                await self._drained.wait()
        if self.tasks:
            log.warning("stopping: %d request(s) still running after %gs, cancelled", len(self.tasks),
                        self.graceful_s)
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)


class _Lifespan:
    """ASGI's lifespan protocol: the app's startup before the first connection, its shutdown after the last."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._started: asyncio.Future[bool] | None = None
        self._stopped: asyncio.Future[bool] | None = None
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> bool:
        loop = asyncio.get_running_loop()
        self._started, self._stopped = loop.create_future(), loop.create_future()
        self._task = loop.create_task(self._main())
        await self._inbox.put({"type": "lifespan.startup"})
        return await self._started

    async def shutdown(self) -> None:
        assert self._task is not None and self._stopped is not None
        if self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._stopped
        await self._task

    async def _main(self) -> None:
        try:
            await self.app({"type": "lifespan", "asgi": ASGI, "state": {}}, self._inbox.get, self._send)
        except Exception as exc:
            log.error("the app's lifespan failed", exc_info=exc)
        finally:
            for done in (self._started, self._stopped):
                if done is not None and not done.done():
                    done.set_result(False)

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
            log.error("%s: %s", kind, message.get("message", ""))
        done = self._started if kind.startswith("lifespan.startup.") else self._stopped
        if done is not None and not done.done():
            done.set_result(kind.endswith(".complete"))


__all__ = ["LISTEN_FDS_START", "STARTUP_FAILED", "Server", "inherited_sockets", "listen"]

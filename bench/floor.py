"""The floor of a Python control plane's restart: a process that binds its port, imports asyncio and uvloop (what
hal0's edge runs on, where installed; without ssl, as hal0 does), and answers every request 200 at once. With
`--hal0-imports` it also imports hal0's start path (`hal0.cli`, `hal0.server`, `hal0.api.app`) before it
answers, and does nothing else of a start (no settings, no adoption). `bench.restart` times both from the spawn
to the first answer, beside hal0 itself, so a restart's figure splits into the interpreter with its event loop,
hal0's imports, and the rest of hal0's start.

Run by `bench.restart` as `python bench/floor.py PORT [--hal0-imports]` (a path, not `-m`: nothing of the bench
package is imported).
"""

import socket
import sys

port = int(sys.argv[1])
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.listen(128)

# The event loop without ssl, as `hal0 serve` imports it (hal0.eventloop); the plain imports where hal0 is not.
try:
    from hal0.eventloop import import_without_ssl

    import_without_ssl()
except ImportError:
    pass
import asyncio  # noqa: E402 - after the bind, as hal0 does: a client waits in the backlog meanwhile
from typing import Any  # noqa: E402

factory: Any = None
try:
    import uvloop

    factory = uvloop.new_event_loop
except ImportError:  # hal0 runs on asyncio's own loop then, and so does its floor
    pass

if "--hal0-imports" in sys.argv:
    import hal0.api.app
    import hal0.cli
    import hal0.server  # noqa: F401

BODY = b'{"floor":true}'
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(BODY), BODY)


class Answer(asyncio.Protocol):
    """Answers each complete request (head and content-length body) with ANSWER; keeps the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(ANSWER)


async def serve() -> None:
    server = await asyncio.get_running_loop().create_server(Answer, sock=sock)
    async with server:
        await server.serve_forever()


with asyncio.Runner(loop_factory=factory) as runner:  # as hal0's Server.run starts
    runner.run(serve())

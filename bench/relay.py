"""The floor of a Python proxy's added latency: a process that relays bytes between each client connection and
a connection of its own to the backend, on uvloop (asyncio's loop where it is not installed), and does nothing
else: no HTTP parsing, no routing, no pool. What hal0's `/v1` adds beyond this is hal0's own work; what this
adds over direct is two more hops through the kernel and one event loop.

Run by `bench.proxy` as `python bench/relay.py PORT BACKEND_PORT` (a path, not `-m`).
"""

import asyncio
import sys
from typing import Any

port, backend = int(sys.argv[1]), int(sys.argv[2])


class Half(asyncio.Protocol):
    """One side of a relayed connection: what it receives is written to `peer`'s transport."""

    def __init__(self, peer: "Half | None" = None) -> None:
        self.peer = peer
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=1 << 20)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class Client(Half):
    """A client's connection: what arrives before its own connection to the backend is open waits for it."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.early: list[bytes] = []
        asyncio.get_running_loop().create_task(self.open())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = Half(self)
        try:
            await loop.create_connection(lambda: upstream, "127.0.0.1", backend)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left meanwhile
            upstream.transport.close()
            return
        self.peer = upstream
        upstream.transport.writelines(self.early)


async def main() -> None:
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


try:
    import uvloop

    run: Any = uvloop.run
except ImportError:
    run = asyncio.run
run(main())

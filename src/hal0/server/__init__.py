"""hal0's HTTP/1.1 server: serves the API's ASGI apps (the /v1 edge, the management app) over asyncio and httptools.

Small on purpose, like `hal0.client` beside it: keep-alive, pipelined requests answered in order, chunked
responses, `Expect: 100-continue`, flow control both ways, a deadline on every request head and on idle
connections, a bound on the head's size, the ASGI lifespan and a graceful stop. No TLS, websockets or HTTP/2:
the API binds loopback by default, and a reverse proxy in front of it brings those where they are needed.
uvicorn served the API before; its import alone (with click, logging.config and multiprocessing) was ~30 ms of
every start of a restarted API, paid before it answers /v1 again.
"""

from hal0.server.connection import HIGH_WATER, MAX_HEAD_BYTES
from hal0.server.core import STARTUP_FAILED, Server, inherited_sockets, listen

__all__ = ["HIGH_WATER", "MAX_HEAD_BYTES", "STARTUP_FAILED", "Server", "inherited_sockets", "listen"]

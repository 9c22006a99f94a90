"""What can go wrong between hal0 and a backend or peer, below HTTP: the connection, the wire, the clock.

An answer with an error status is not an error here: it is a response, relayed or judged by the caller.
"""

from __future__ import annotations


class HttpError(Exception):
    """The exchange with the server failed: no answer, or only part of one."""


class ConnectFailed(HttpError):
    """No connection was made (refused, unreachable, a name that does not resolve): the request never left."""


class ConnectTimeout(ConnectFailed, TimeoutError):
    """The server did not take the connection in time: the request never left."""


class Disconnected(HttpError):
    """The server closed the connection before its answer was complete."""


class ReadTimeout(HttpError, TimeoutError):
    """The server sent nothing for longer than the read timeout (or the total one ran out)."""


class ProtocolError(HttpError):
    """The server's bytes are not an HTTP/1.1 response."""

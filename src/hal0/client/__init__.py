"""hal0's HTTP/1.1 client: how the API talks to its backends (requests, probes, liveness) and to its peers.

Small on purpose: one exchange per pooled connection, httptools (which hal0.server uses too) to parse answers,
and nothing the request path does not use, so a restarted API imports it in a few milliseconds.
"""

from hal0.client.connection import Response
from hal0.client.errors import ConnectFailed, ConnectTimeout, Disconnected, HttpError, ProtocolError, ReadTimeout
from hal0.client.session import HttpClient, Timeout, form_body

__all__ = ["ConnectFailed", "ConnectTimeout", "Disconnected", "HttpClient", "HttpError", "ProtocolError",
           "ReadTimeout", "Response", "Timeout", "form_body"]

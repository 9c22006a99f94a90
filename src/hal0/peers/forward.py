"""A peer as the upstream of one forwarded request: the peer's key, the hop mark, one connect attempt.

The dispatcher relays the answer with the same code as a local slot's (`hal0.dispatch.proxy.Dispatcher._relay`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hal0.client import ConnectFailed, HttpClient, HttpError, Response, Timeout
from hal0.errors import PeerUnreachable, UpstreamError
from hal0.settings import PeerConfig

if TYPE_CHECKING:  # the views come with `Peers`, which only a hal0 with peers imports
    from hal0.peers.view import RemoteSlot

#: Marks a request one node forwarded to another. A node never forwards a marked request again: a model it
#: does not serve itself is `model_not_found`, so two nodes that list each other cannot bounce a request.
HOP_HEADER = "X-Hal0-Hop"
#: A peer that takes this long to accept a connection is treated as refusing it: the request has not left, so
#: the next peer that serves the model gets it. (A peer on a LAN accepts in well under a millisecond.)
CONNECT_S = 2.0
_HOP = HOP_HEADER.lower().encode()


class PeerBackend:
    """The upstream of one request forwarded to `remote` on `peer`."""

    def __init__(self, client: HttpClient, peer: PeerConfig, remote: RemoteSlot, timeout: Timeout) -> None:
        self.peer = peer
        self.remote = remote
        self._client = client
        self._timeout = Timeout(total=timeout.total, connect=CONNECT_S, read=timeout.read)

    @property
    def label(self) -> str:
        return f"peer {self.peer.url} (slot {self.remote.name})"

    async def open(self, method: str, target: str, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> Response:
        """Send the request on to the peer. A connect that fails raises PeerUnreachable (the request never
        left, so another peer may take it); a failure after that is the request's end (UpstreamError)."""
        out = [(k, v) for k, v in headers if k.lower() != b"authorization"]
        out.append((_HOP, b"1"))
        if self.peer.api_key:
            out.append((b"authorization", f"Bearer {self.peer.api_key}".encode("latin-1")))
        try:
            return await self._client.request(method, self.peer.url + target, body=body, headers=out,
                                              timeout=self._timeout)
        except ConnectFailed as exc:
            raise PeerUnreachable(f"{self.label} did not take the connection: {type(exc).__name__}: {exc}",
                                  detail={"peer": self.peer.url, "slot": self.remote.name}) from exc
        except (HttpError, OSError, ValueError) as exc:
            raise UpstreamError(f"{self.label} failed before it answered: {type(exc).__name__}: {exc}",
                                code="peer_failed",
                                detail={"peer": self.peer.url, "slot": self.remote.name}) from exc

    def failed(self) -> None:
        """The peer broke off an answer. Nothing to do here: if the peer itself is gone, its event stream
        has dropped with it and the follower has marked it down."""

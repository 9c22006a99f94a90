"""A peer as the upstream of one forwarded request: the peer's key, the hop mark, one connect attempt.

The dispatcher relays the answer with the same code as a local slot's (`hal0.dispatch.proxy.Dispatcher._relay`).
"""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDict

from hal0.errors import PeerUnreachable, UpstreamError
from hal0.peers.view import RemoteSlot
from hal0.settings import PeerConfig

#: Marks a request one node forwarded to another. A node never forwards a marked request again: a model it
#: does not serve itself is `model_not_found`, so two nodes that list each other cannot bounce a request.
HOP_HEADER = "X-Hal0-Hop"
#: A peer that takes this long to accept a connection is treated as refusing it: the request has not left, so
#: the next peer that serves the model gets it. (A peer on a LAN accepts in well under a millisecond.)
CONNECT_S = 2.0


class PeerBackend:
    """The upstream of one request forwarded to `remote` on `peer`."""

    def __init__(self, session: aiohttp.ClientSession, peer: PeerConfig, remote: RemoteSlot,
                 timeout: aiohttp.ClientTimeout) -> None:
        self.peer = peer
        self.remote = remote
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout.total, sock_connect=CONNECT_S,
                                              sock_read=timeout.sock_read)

    @property
    def label(self) -> str:
        return f"peer {self.peer.url} (slot {self.remote.name})"

    async def open(self, method: str, target: str, body: bytes,
                   headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
        """Send the request on to the peer. A connect that fails raises PeerUnreachable (the request never
        left, so another peer may take it); a failure after that is the request's end (UpstreamError)."""
        out = CIMultiDict(headers)
        out[HOP_HEADER] = "1"
        out.popall("Authorization", None)
        if self.peer.api_key:
            out["Authorization"] = f"Bearer {self.peer.api_key}"
        try:
            return await self._session.request(method, self.peer.url + target, data=body, headers=out,
                                               timeout=self._timeout, skip_auto_headers=("User-Agent",))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise PeerUnreachable(f"{self.label} did not take the connection: {type(exc).__name__}: {exc}",
                                  detail={"peer": self.peer.url, "slot": self.remote.name}) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamError(f"{self.label} failed before it answered: {type(exc).__name__}: {exc}",
                                code="peer_failed",
                                detail={"peer": self.peer.url, "slot": self.remote.name}) from exc

    def failed(self) -> None:
        """The peer broke off an answer. Nothing to do here: if the peer itself is gone, its event stream
        has dropped with it and the follower has marked it down."""

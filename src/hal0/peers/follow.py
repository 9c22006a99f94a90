"""Follow each peer's slots live through its `/api/events` stream; hold the views that resolution reads.

One task per peer, owned by `Peers` (entered by the app's lifespan): cancelled and awaited on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from hal0.client import HttpClient, HttpError, Response, Timeout
from hal0.datatypes import datatype
from hal0.events import EventBus
from hal0.peers.view import PeerView, RemoteSlot
from hal0.settings import PeerConfig

log = logging.getLogger("hal0.peers")

#: Reconnect backoff: the first retry comes quickly (a restarting peer is back in well under a second), later
#: ones less often, so a peer that is off for the night costs one connect attempt every few seconds.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
#: A peer's event stream sends a keep-alive comment every 15 s (hal0.api.sse.HEARTBEAT_S): a stream silent for
#: longer belongs to a peer that vanished without closing its connection (power, cable). A peer whose API
#: process dies is seen at once: its kernel closes the connection.
STREAM_SILENCE_S = 20.0
_CONNECT_S = 2.0
_SNAPSHOT_TIMEOUT = Timeout(total=10, connect=_CONNECT_S)
_STREAM_TIMEOUT = Timeout(connect=_CONNECT_S, read=STREAM_SILENCE_S)


class StreamRefused(Exception):
    """The peer answered its event stream with an error (a wrong key, an old hal0)."""


@datatype(frozen=True, slots=True)
class SseEvent:
    id: int | None
    topic: str
    data: dict[str, Any]


async def read_sse(content: Response) -> AsyncIterator[SseEvent]:
    """The events of a text/event-stream body; comments (keep-alives) and malformed frames are skipped."""
    event_id: int | None = None
    topic = "message"
    data: list[str] = []
    while True:
        raw = await content.readline()
        if not raw:
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line == "":
            if data:
                try:
                    payload = json.loads("\n".join(data))
                except ValueError:
                    payload = None
                if isinstance(payload, dict):
                    yield SseEvent(event_id, topic, payload)
            event_id, topic, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            topic = value
        elif name == "id" and value.isdigit():
            event_id = int(value)


def auth_headers(peer: PeerConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {peer.api_key}"} if peer.api_key else {}


class Peers:
    """Every configured peer's view, kept current by one follower task each.

    The followers have a connection pool of their own: a forwarded request never rides a connection opened for a
    snapshot, so whether a peer takes new connections is seen by the request itself (see `PeerBackend.open`)."""

    def __init__(self, peers: tuple[PeerConfig, ...], bus: EventBus) -> None:
        self.views: dict[str, PeerView] = {p.url: PeerView(p) for p in peers}
        self._bus = bus
        self._client: HttpClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """One follower task per peer, until `aclose` cancels and awaits them."""
        if not self.views:
            return
        self._client = HttpClient()
        self._tasks = [asyncio.create_task(self._follow(view, self._client), name=f"peer:{view.url}")
                       for view in self.views.values()]

    async def __aenter__(self) -> Peers:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._client is not None:
            await self._client.close()
            self._client = None

    def remote_slots(self) -> list[RemoteSlot]:
        """The slots of the peers that are up, in the order the peers are configured."""
        return [slot for view in self.views.values() if view.up
                for slot in sorted(view.slots.values(), key=lambda s: s.name)]

    def avoided(self) -> frozenset[str]:
        """Peers to try last: a request could not connect to them a moment ago."""
        return frozenset(url for url, view in self.views.items() if view.avoided)

    def to_list(self) -> list[dict[str, Any]]:
        return [view.to_dict() for view in self.views.values()]

    # -- following ----------------------------------------------------------------------------------------
    async def _follow(self, view: PeerView, client: HttpClient) -> None:
        backoff = BACKOFF_FIRST_S
        while True:
            connects = view.connects
            try:
                await self._stream(view, client)
                reason = "its event stream ended"
            except (HttpError, OSError, ValueError, StreamRefused) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except Exception as exc:
                # A bug here must not freeze the peer as `up` with what it last said: log it, drop, reconnect.
                log.exception("following peer %s failed", view.url)
                reason = f"internal error ({type(exc).__name__}); see hal0's log"
            if view.mark_down(reason):
                log.warning("peer %s is down: %s", view.url, reason)
                self._publish(view)
            if view.connects != connects:
                backoff = BACKOFF_FIRST_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _stream(self, view: PeerView, client: HttpClient) -> None:
        peer = view.config
        headers = {**auth_headers(peer), "Accept": "text/event-stream"}
        if view.last_event_id is not None:
            headers["Last-Event-ID"] = str(view.last_event_id)
        async with client.get(f"{peer.url}/api/events?topics=slot", headers=headers,
                              timeout=_STREAM_TIMEOUT) as resp:
            if resp.status != 200:
                raise StreamRefused(f"{peer.url}/api/events answered HTTP {resp.status}: "
                                    f"{(await resp.text())[:300]}")
            # The stream subscribes before its headers go out, so the snapshot read now misses no change:
            # whatever happens meanwhile is in the stream as well, ordered by each slot's seq.
            view.apply_snapshot(await self._snapshot(peer, client))
            log.info("peer %s is up with %d slot(s)", peer.url, len(view.slots))
            self._publish(view)
            async for event in read_sse(resp):
                if event.topic == "slot" and view.apply_event({**event.data, "id": event.id}):
                    self._publish(view)

    @staticmethod
    async def _snapshot(peer: PeerConfig, client: HttpClient) -> list[dict[str, Any]]:
        async with client.get(f"{peer.url}/api/slots", headers=auth_headers(peer),
                              timeout=_SNAPSHOT_TIMEOUT) as resp:
            if resp.status != 200:
                raise StreamRefused(f"{peer.url}/api/slots answered HTTP {resp.status}: "
                                    f"{(await resp.text())[:300]}")
            data = await resp.json()
        slots = data.get("data") if isinstance(data, dict) else None
        if not isinstance(slots, list):
            raise StreamRefused(f"{peer.url}/api/slots did not list slots")
        return [s for s in slots if isinstance(s, dict)]

    def _publish(self, view: PeerView) -> None:
        self._bus.publish("peer", view.to_dict())

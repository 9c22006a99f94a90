"""What this node knows of one peer: up or down, and its slots as its event stream last described them.

Pure state: the follower feeds it a snapshot and events; resolution reads it. No I/O here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import field
from enum import StrEnum
from typing import Any

from hal0.datatypes import datatype
from hal0.settings import PeerConfig

#: How long a peer that a forwarded request could not connect to is tried after the others.
UNREACHABLE_S = 10.0


class PeerStatus(StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


@datatype(frozen=True, slots=True)
class RemoteSlot:
    """One slot of a peer, as much of it as routing needs."""

    node: str
    name: str
    type: str
    model: str | None
    aliases: tuple[str, ...]
    state: str
    seq: int

    @classmethod
    def from_record(cls, node: str, record: Mapping[str, Any]) -> RemoteSlot | None:
        """From a slot's JSON (`/api/slots` entries and the `record` of slot events); None if it is not one."""
        name = record.get("name")
        config = record.get("config")
        state = record.get("state")
        if not isinstance(name, str) or not isinstance(config, Mapping) or not isinstance(state, str):
            return None
        model = config.get("model")
        aliases = config.get("aliases") or ()
        seq = record.get("seq")
        return cls(node=node, name=name, type=str(record.get("type") or config.get("type") or ""),
                   model=model if isinstance(model, str) else None,
                   aliases=tuple(a for a in aliases if isinstance(a, str)) if isinstance(aliases, list) else (),
                   state=state, seq=seq if isinstance(seq, int) else 0)

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "slot": self.name, "type": self.type, "model": self.model,
                "aliases": list(self.aliases), "state": self.state}


@datatype(slots=True)
class PeerView:
    config: PeerConfig
    status: PeerStatus = PeerStatus.CONNECTING
    since: float = field(default_factory=time.time)
    #: Why the peer is down (or was last): the error of its stream or of the connect.
    reason: str = ""
    slots: dict[str, RemoteSlot] = field(default_factory=dict)
    #: The id of the last event read from the peer's stream: sent as Last-Event-ID on a reconnect.
    last_event_id: int | None = None
    #: How many times the follower connected (the first one included).
    connects: int = 0
    #: Until then (time.monotonic) the peer is tried last: a forwarded request could not connect to it, though
    #: its event stream is open (a half-broken link, a firewall). Reset by a request that connects.
    unreachable_until: float = 0.0

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def up(self) -> bool:
        return self.status is PeerStatus.UP

    def apply_snapshot(self, records: Iterable[Mapping[str, Any]]) -> None:
        """The peer's whole slot list (read after its stream was opened): it replaces what was known, so a
        slot deleted while the stream was down does not linger. Events that follow are ordered by `seq`."""
        fresh: dict[str, RemoteSlot] = {}
        for record in records:
            slot = RemoteSlot.from_record(self.url, record)
            if slot is not None:
                fresh[slot.name] = slot
        self.slots = fresh
        self._set(PeerStatus.UP, "")
        self.connects += 1

    def apply_event(self, data: Mapping[str, Any]) -> bool:
        """One `slot` event of the peer's stream; True when it changed what is known."""
        event_id = data.get("id")
        if isinstance(event_id, int):
            self.last_event_id = event_id
        name = data.get("slot")
        if not isinstance(name, str):
            return False
        if data.get("event") == "deleted":
            return self.slots.pop(name, None) is not None
        record = data.get("record")
        if not isinstance(record, Mapping):
            return False
        slot = RemoteSlot.from_record(self.url, record)
        if slot is None:
            return False
        known = self.slots.get(name)
        # A transition replayed from before the snapshot is older than what the snapshot said. Config changes
        # (created/updated) keep the seq and always apply: replaying one is harmless, the next one follows.
        if known is not None and "event" not in data and slot.seq < known.seq:
            return False
        self.slots[name] = slot
        return known != slot

    def note_unreachable(self, for_s: float = UNREACHABLE_S) -> None:
        self.unreachable_until = time.monotonic() + for_s

    def note_reachable(self) -> None:
        self.unreachable_until = 0.0

    @property
    def avoided(self) -> bool:
        return self.unreachable_until > time.monotonic()

    def mark_down(self, reason: str) -> bool:
        """The stream broke or could not be opened: nothing of this peer is offered until it is back.
        True when this changed the status."""
        self.slots = {}
        return self._set(PeerStatus.DOWN, reason)

    def _set(self, status: PeerStatus, reason: str) -> bool:
        changed = status is not self.status
        if changed:
            self.since = time.time()
        self.status = status
        self.reason = reason
        return changed

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "status": self.status.value, "since": self.since, "reason": self.reason,
                "connects": self.connects, "last_event_id": self.last_event_id, "avoided": self.avoided,
                "slots": [s.to_dict() for s in sorted(self.slots.values(), key=lambda s: s.name)]}

"""Resolve a request's `model` to the slot that owns it: slot name, model ref, or alias; and, when no local
slot serves it, to the peers' slots that do.

The slot's type must fit the endpoint; every slot looked at is kept as a candidate for the decision log.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from hal0.datatypes import datatype
from hal0.errors import InvalidRequest, ModelNotFound
from hal0.kinds import ENDPOINT_TYPES
from hal0.slots.slot import Slot
from hal0.slots.state import LOADED

if TYPE_CHECKING:
    from hal0.peers.view import RemoteSlot


@datatype(frozen=True, slots=True, compiled_init=True)
class Candidate:
    """A local slot considered for a request, and how it matched."""
    slot: str
    ref: str | None
    state: str
    type: str
    matched_by: str
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "ref": self.ref, "state": self.state, "type": self.type,
                "matched_by": self.matched_by, "fits": self.fits}


@datatype(frozen=True, slots=True, compiled_init=True)
class Resolution:
    """The slot a request goes to, why, and every candidate that was weighed."""
    slot: Slot
    reason: str
    candidates: tuple[Candidate, ...]


def _matches(slot: Slot, model: str) -> str | None:
    config = slot.config  # read once: every request looks at every slot
    if config.name == model:
        return "slot-name"
    if config.model is not None and config.model == model:
        return "ref"
    if model in config.aliases:
        return "alias"
    return None


def resolve(slots: Iterable[Slot], model: str, endpoint: str) -> Resolution:
    fitting_types = ENDPOINT_TYPES[endpoint]
    matched: list[tuple[Slot, str]] = []
    all_slots = list(slots)
    for slot in all_slots:
        how = _matches(slot, model)
        if how is not None:
            matched.append((slot, how))
    candidates = tuple(
        Candidate(s.config.name, s.config.model, str(s.record.state), s.config.type, how,
                  s.config.type in fitting_types)
        for s, how in matched
    )
    if not matched:
        raise _not_found(all_slots, model)
    fitting = [(s, how) for s, how in matched if s.config.type in fitting_types]
    if not fitting:
        slot, _ = matched[0]
        raise InvalidRequest(
            f"model {model[:200]!r} is served by slot {slot.name}, a {slot.config.type} slot, which cannot "
            f"answer {endpoint} (needs a {' or '.join(sorted(fitting_types))} slot)",
            code="wrong_slot_type", detail={"slot": slot.name, "slot_type": slot.config.type,
                                            "endpoint": endpoint, "candidates": [c.to_dict() for c in candidates]},
        )
    # Prefer the most specific match, then a slot that is already loaded (no cold start).
    rank = {"slot-name": 0, "ref": 1, "alias": 2}
    fitting.sort(key=lambda pair: (rank[pair[1]], pair[0].state not in LOADED, pair[0].name))
    slot, how = fitting[0]
    return Resolution(slot, how, candidates)


def find_model(slots: Iterable[Slot], model: str) -> Slot:
    """The slot a model name (slot name, ref or alias) means, whatever its type: `GET /v1/models/{id}`."""
    all_slots = list(slots)
    rank = {"slot-name": 0, "ref": 1, "alias": 2}
    matched = sorted(((rank[how], s.name, s) for s in all_slots if s.config.model
                      for how in [_matches(s, model)] if how is not None), key=lambda t: (t[0], t[1]))
    if not matched:
        raise _not_found(all_slots, model)
    return matched[0][2]


def _not_found(all_slots: list[Slot], model: str) -> ModelNotFound:
    available = sorted({s.name for s in all_slots if s.config.model}
                       | {s.config.model for s in all_slots if s.config.model}
                       | {a for s in all_slots if s.config.model for a in s.config.aliases})
    return ModelNotFound(
        f"model {model[:200]!r} is not served by any slot; available: {', '.join(available) or 'none'}",
        detail={"available": available},
    )


#: How eagerly a peer's slot is picked, by its state: loaded and free first, loaded and busy next, then one that is
#: loading, then a cold one (the peer loads it), and a failed or unloading one last (the peer retries the load).
_REMOTE_STATE_RANK = {"ready": 0, "idle": 0, "serving": 1, "warming": 2, "starting": 2, "pulling": 3,
                      "offline": 3, "error": 4, "unloading": 4}


@datatype(frozen=True, slots=True, compiled_init=True)
class RemoteCandidate:
    """A peer's slot considered for a request no local slot serves."""
    slot: RemoteSlot
    matched_by: str

    @property
    def why(self) -> str:
        """Why it was ranked where it is, in the words of the decision record."""
        return f"peer {self.slot.node} has it {self.slot.state} (slot {self.slot.name}, by {self.matched_by})"

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.slot.node, "slot": self.slot.name, "ref": self.slot.model, "state": self.slot.state,
                "type": self.slot.type, "matched_by": self.matched_by, "fits": True}


def _remote_matches(slot: RemoteSlot, model: str) -> str | None:
    if slot.model is None:
        return None
    if slot.model == model:
        return "ref"
    if model in slot.aliases:
        return "alias"
    if slot.name == model:
        return "slot-name"
    return None


def resolve_remote(slots: Iterable[RemoteSlot], model: str, endpoint: str,
                   avoid: frozenset[str] = frozenset()) -> list[RemoteCandidate]:
    """The peers' slots that can answer `model` on `endpoint`, best first: a ready one before a busy, loading or
    cold one, a ref or alias match before a slot name (every node has a `primary`), then in the order the peers
    are configured; the peers in `avoid` (a request could not connect to them just now) after all others. Slots
    without a model, or of a type that cannot answer the endpoint, are left out."""
    fitting_types = ENDPOINT_TYPES[endpoint]
    rank = {"ref": 0, "alias": 1, "slot-name": 2}
    found = [(i, RemoteCandidate(s, how)) for i, s in enumerate(slots) if s.type in fitting_types
             for how in [_remote_matches(s, model)] if how is not None]
    found.sort(key=lambda pair: (pair[1].slot.node in avoid, _REMOTE_STATE_RANK.get(pair[1].slot.state, 4),
                                 rank[pair[1].matched_by], pair[0]))
    return [c for _, c in found]

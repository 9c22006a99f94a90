"""Resolve a request's `model` to the slot that owns it: slot name, model ref, or alias.

The slot's type must fit the endpoint; every slot looked at is kept as a candidate for the decision log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hal0.errors import InvalidRequest, ModelNotFound
from hal0.kinds import ENDPOINT_TYPES
from hal0.slots.slot import Slot
from hal0.slots.state import LOADED


@dataclass(frozen=True, slots=True)
class Candidate:
    slot: str
    ref: str | None
    state: str
    type: str
    matched_by: str
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "ref": self.ref, "state": self.state, "type": self.type,
                "matched_by": self.matched_by, "fits": self.fits}


@dataclass(frozen=True, slots=True)
class Resolution:
    slot: Slot
    reason: str
    candidates: tuple[Candidate, ...]


def _matches(slot: Slot, model: str) -> str | None:
    if slot.name == model:
        return "slot-name"
    if slot.config.model is not None and slot.config.model == model:
        return "ref"
    if model in slot.config.aliases:
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
        Candidate(s.name, s.config.model, s.state.value, s.config.type, how, s.config.type in fitting_types)
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

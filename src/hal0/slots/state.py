"""The slot lifecycle: the state enum and the one table of legal transitions.

Anything outside the table is a bug and raises `IllegalTransition`.
"""

from __future__ import annotations

from enum import StrEnum

from hal0.errors import IllegalTransition


class SlotState(StrEnum):
    OFFLINE = "offline"
    PULLING = "pulling"
    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    SERVING = "serving"
    IDLE = "idle"
    UNLOADING = "unloading"
    ERROR = "error"


S = SlotState

TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    S.OFFLINE: frozenset({S.PULLING, S.STARTING}),
    S.PULLING: frozenset({S.STARTING, S.OFFLINE, S.ERROR}),
    S.STARTING: frozenset({S.WARMING, S.UNLOADING, S.ERROR}),
    S.WARMING: frozenset({S.READY, S.UNLOADING, S.ERROR}),
    S.READY: frozenset({S.SERVING, S.IDLE, S.UNLOADING, S.ERROR}),
    S.SERVING: frozenset({S.READY, S.UNLOADING, S.ERROR}),
    S.IDLE: frozenset({S.SERVING, S.UNLOADING, S.ERROR}),
    S.UNLOADING: frozenset({S.OFFLINE, S.ERROR}),
    # error is a sideband: acknowledged (offline) or left by the next load.
    S.ERROR: frozenset({S.OFFLINE, S.PULLING, S.STARTING}),
}

#: States in which a backend process exists and is expected to answer.
LOADED = frozenset({S.READY, S.SERVING, S.IDLE})
#: States in which a load is under way.
LOADING = frozenset({S.PULLING, S.STARTING, S.WARMING})
#: States with a live (or starting) backend process.
ACTIVE = LOADED | frozenset({S.STARTING, S.WARMING, S.UNLOADING})
#: States in which the slot is doing something with its model: loading it (a pull included) or running it.
BUSY = ACTIVE | LOADING


def is_legal(src: SlotState, dst: SlotState) -> bool:
    return dst in TRANSITIONS[src]


def check_transition(src: SlotState, dst: SlotState) -> None:
    if not is_legal(src, dst):
        raise IllegalTransition(
            f"illegal slot transition {src.value} -> {dst.value}",
            detail={"from": src.value, "to": dst.value,
                    "allowed": sorted(s.value for s in TRANSITIONS[src])},
        )

"""Per-second aggregates of the last 15 minutes, per slot: what the dashboard's charts and `hal0 top` draw.

Fed by the event bus (decision records, slot transitions) and a once-a-second sample of each slot (state,
memory); WINDOW_S cells per slot, reused round the clock, so memory stays fixed however long hal0 runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypedDict

from hal0.datatypes import datatype
from hal0.events import Event

WINDOW_S = 900
#: Time-to-first-token samples kept per slot and second; a second's quantiles need no more.
TTFT_SAMPLES = 64
#: The state a second shows when the slot passed through several in it: the one that explains a wait best.
STATE_RANK = {"error": 8, "pulling": 7, "starting": 6, "warming": 5, "unloading": 4, "serving": 3, "ready": 2,
              "idle": 1, "offline": 0}


class SlotStats(TypedDict):
    requests: list[int]
    errors: list[int]
    waited: list[int]
    ttft_p50_ms: list[float | None]
    ttft_p95_ms: list[float | None]
    prompt_tokens: list[int]
    completion_tokens: list[float]
    memory_bytes: list[int | None]
    memory_estimate_bytes: list[int | None]
    state: list[str | None]


class StatsView(TypedDict):
    interval_s: int
    window_s: int
    start: int
    end: int
    t: list[int]
    slots: dict[str, SlotStats]


@datatype(frozen=True, slots=True)
class SlotSample:
    """One slot as the once-a-second sample sees it."""

    name: str
    state: str
    in_flight: int = 0
    memory_estimate_bytes: int | None = None
    memory_measured_bytes: int | None = None


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile of `values` (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class _Series:
    """One slot's ring: cell `sec % WINDOW_S` holds second `sec` while `stamp` says so."""

    __slots__ = ("completion", "errors", "estimate", "memory", "prompt", "requests", "stamp", "state", "ttft",
                 "waited")

    def __init__(self) -> None:
        n = WINDOW_S
        self.stamp = [-1] * n
        self.requests = [0] * n
        self.errors = [0] * n
        self.waited = [0] * n
        self.prompt = [0] * n
        self.completion = [0.0] * n
        self.ttft: list[list[float] | None] = [None] * n
        self.memory: list[int | None] = [None] * n
        self.estimate: list[int | None] = [None] * n
        self.state: list[str | None] = [None] * n

    def cell(self, sec: int) -> int:
        i = sec % WINDOW_S
        if self.stamp[i] != sec:
            self.stamp[i] = sec
            self.requests[i] = self.errors[i] = self.waited[i] = self.prompt[i] = 0
            self.completion[i] = 0.0
            self.ttft[i] = self.memory[i] = self.estimate[i] = self.state[i] = None
        return i

    def mark_state(self, sec: int, *states: str) -> None:
        i = self.cell(sec)
        for state in states:
            shown = self.state[i]
            if shown is None or STATE_RANK.get(state, 0) > STATE_RANK.get(shown, 0):
                self.state[i] = state


class StatsRing:
    def __init__(self) -> None:
        self._slots: dict[str, _Series] = {}
        #: The newest second anything was recorded for: a record older than the window is dropped.
        self._newest = 0
        self._memory: dict[str, tuple[int | None, int | None]] = {}

    def _series(self, slot: str) -> _Series:
        series = self._slots.get(slot)
        if series is None:
            series = self._slots[slot] = _Series()
        return series

    def _live(self, sec: int) -> bool:
        return sec > self._newest - WINDOW_S

    # -- feeding -----------------------------------------------------------------------------------------------
    def observe(self, event: Event) -> None:
        """The bus tap: decision records and slot transitions."""
        data = event.data
        if event.topic == "decision":
            self.record_decision(data)
        elif event.topic == "slot":
            slot = data.get("slot")
            if not isinstance(slot, str):
                return
            if data.get("event") == "deleted":
                self._slots.pop(slot, None)
                self._memory.pop(slot, None)
            elif isinstance(data.get("to"), str):
                sec = int(data.get("time", event.time))
                self._newest = max(self._newest, sec)
                if self._live(sec):
                    self._series(slot).mark_state(sec, str(data.get("from") or data["to"]), data["to"])

    def record_decision(self, d: dict[str, Any]) -> None:
        slot = d.get("slot")
        if not isinstance(slot, str) or d.get("outcome") == "evicted":
            return
        began = float(d.get("time") or 0.0)
        duration = float(d.get("duration_ms") or 0.0) / 1000
        end = began + duration
        sec = int(end)
        self._newest = max(self._newest, sec)
        if not self._live(sec):
            return
        series = self._series(slot)
        i = series.cell(sec)
        series.requests[i] += 1
        status = d.get("status")
        if not isinstance(status, int) or status >= 400 or d.get("outcome") not in ("ok", None):
            series.errors[i] += 1
        if float(d.get("wait_ms") or 0.0) > 0:
            series.waited[i] += 1
        ttft = d.get("ttft_ms")
        if isinstance(ttft, (int, float)):
            samples = series.ttft[i]
            if samples is None:
                samples = series.ttft[i] = []
            if len(samples) < TTFT_SAMPLES:
                samples.append(float(ttft))
        prompt = d.get("prompt_tokens")
        completion = d.get("completion_tokens")
        # Tokens are spread over the seconds the answer was generated in (from its first token, or from the
        # end of a cold wait), so a long stream shows as the rate it ran at, not one spike at its end.
        gen_from = began + (float(ttft) / 1000 if isinstance(ttft, (int, float))
                            else float(d.get("wait_ms") or 0.0) / 1000)
        # A cell is reused round the clock: a second older than the window must never be written (it would
        # wipe the current second that shares its cell).
        if isinstance(prompt, int) and prompt > 0 and self._live(int(min(gen_from, end))):
            series.prompt[series.cell(int(min(gen_from, end)))] += prompt
        if isinstance(completion, int) and completion > 0:
            self._spread(series, completion, min(gen_from, end), end)

    def _spread(self, series: _Series, tokens: int, start: float, end: float) -> None:
        length = end - start
        if length < 1e-3 or int(start) == int(end):
            series.completion[series.cell(int(end))] += tokens
            return
        sec = max(int(start), self._newest - WINDOW_S + 1)
        while sec <= int(end):
            overlap = min(end, sec + 1) - max(start, sec)
            if overlap > 0:
                series.completion[series.cell(sec)] += tokens * overlap / length
            sec += 1

    def sample(self, now: float, slots: Iterable[SlotSample]) -> None:
        """The once-a-second sample: each slot's state and memory now."""
        sec = int(now)
        self._newest = max(self._newest, sec)
        for s in slots:
            series = self._series(s.name)
            series.mark_state(sec, s.state)
            i = series.cell(sec)
            series.memory[i] = s.memory_measured_bytes
            series.estimate[i] = s.memory_estimate_bytes
            self._memory[s.name] = (s.memory_estimate_bytes, s.memory_measured_bytes)

    # -- reading -----------------------------------------------------------------------------------------------
    def view(self, end: int, seconds: int = WINDOW_S, slots: Iterable[str] | None = None) -> StatsView:
        """Seconds `end - seconds + 1` to `end` (unix seconds, both included), oldest first; a second the ring no
        longer (or not yet) holds is zeros and nulls."""
        seconds = max(1, min(seconds, WINDOW_S))
        start = end - seconds + 1
        wanted = sorted(self._slots) if slots is None else list(slots)
        out: dict[str, SlotStats] = {}
        for name in wanted:
            out[name] = self._slot_view(self._slots.get(name) or _Series(), start, end)
        return {"interval_s": 1, "window_s": WINDOW_S, "start": start, "end": end,
                "t": list(range(start, end + 1)), "slots": out}

    def _slot_view(self, series: _Series, start: int, end: int) -> SlotStats:
        oldest = self._newest - WINDOW_S
        cells = [sec % WINDOW_S if series.stamp[sec % WINDOW_S] == sec and sec > oldest else -1
                 for sec in range(start, end + 1)]

        def column(values: list[Any], empty: Any) -> list[Any]:
            return [values[i] if i >= 0 else empty for i in cells]

        ttft = column(series.ttft, None)
        return {
            "requests": column(series.requests, 0), "errors": column(series.errors, 0),
            "waited": column(series.waited, 0),
            "ttft_p50_ms": [quantile(v, 0.5) if v else None for v in ttft],
            "ttft_p95_ms": [quantile(v, 0.95) if v else None for v in ttft],
            "prompt_tokens": column(series.prompt, 0),
            "completion_tokens": [round(v, 3) for v in column(series.completion, 0.0)],
            "memory_bytes": column(series.memory, None), "memory_estimate_bytes": column(series.estimate, None),
            "state": column(series.state, None),
        }

    def memory(self, slot: str) -> tuple[int | None, int | None]:
        """The newest (estimate, measured) memory of one slot, for the scrape-time gauges."""
        return self._memory.get(slot, (None, None))

"""hal0's Prometheus metrics: one set per app, counters and histograms fed by the event bus as events are
published (decision records, slot transitions, pulls), gauges read from live state at scrape time.

The counters and histograms are plain numbers here (a request adds to a few of them, on the event loop);
prometheus_client renders them, with the gauges, when /metrics is scraped, and is imported only then: it is not
part of an API start (~15 ms of imports). Counters carry no `_created` series.

Label values are bounded: slot names, the fixed set of /v1 endpoints, status codes, outcomes, state names.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from hal0.datatypes import datatype
from hal0.events import Event
from hal0.stats import SlotSample

if TYPE_CHECKING:
    from prometheus_client.core import Metric

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: A state a load starts from, passes through, and the state it succeeds in.
_COLD = frozenset({"offline", "error"})
_LOADING = frozenset({"pulling", "starting", "warming"})
#: Eviction reasons are the memory admission's words; cut so a long one cannot blow up a label.
REASON_MAX = 80


class Hold:
    """One request held for a cold load (`hal0_requests_held`), from creation until `release` (idempotent)."""

    __slots__ = ("_counts", "_done", "_slot")

    def __init__(self, counts: dict[str, int], slot: str) -> None:
        self._counts = counts
        self._slot = slot
        self._done = False
        counts[slot] = counts.get(slot, 0) + 1

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._counts[self._slot] -= 1

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1  # `le`: a value on a bound counts in it
        self.sum += value


class Family:
    """One counter or histogram and its children by label values, rendered at scrape time."""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (),
                 buckets: tuple[float, ...] | None = None) -> None:
        self.name = name
        self.doc = doc
        self.label_names = tuple(labels)
        self.buckets = buckets
        self.children: dict[tuple[str, ...], Any] = {}
        if not self.label_names:
            self.labels()  # an unlabelled one is reported from the start, at 0

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = (
                CounterChild() if self.buckets is None else HistogramChild(self.buckets))
        return child

    def snapshot(self) -> list[tuple[tuple[str, ...], Any]]:
        """The children's figures as they are now (taken on the event loop; rendered in a thread)."""
        if self.buckets is None:
            return [(labels, child.value) for labels, child in list(self.children.items())]
        return [(labels, (list(child.counts), child.sum)) for labels, child in list(self.children.items())]


def _render(family: Family, figures: list[tuple[tuple[str, ...], Any]]) -> Metric:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    if family.buckets is None:
        counter = CounterMetricFamily(family.name, family.doc, labels=family.label_names)
        for labels, value in figures:
            counter.add_metric(list(labels), value)
        return counter
    histogram = HistogramMetricFamily(family.name, family.doc, labels=family.label_names)
    bounds = [repr(float(b)) for b in family.buckets] + ["+Inf"]  # 0.005, 1.0: as prometheus_client writes them
    for labels, (counts, total) in figures:
        cumulative, running = [], 0
        for bound, n in zip(bounds, counts, strict=True):
            running += n
            cumulative.append((bound, running))
        histogram.add_metric(list(labels), cumulative, total)
    return histogram


@datatype(frozen=True, slots=True)
class DeviceSample:
    """One memory pool admission budgets (`host`, `gpu:N`): its figures and what each slot holds there."""

    device: str
    total_bytes: int
    budget_bytes: int
    free_bytes: int
    held_bytes: Mapping[str, int]


@datatype(frozen=True, slots=True)
class _Route:
    """The metric children one slot, endpoint and status update on every request."""

    requests: Any
    duration: Any
    ttft: Any
    prompt_tokens: Any
    completion_tokens: Any


class Metrics:
    """The metric objects of one hal0 app. `slots` and `write_failures` are read at scrape time (the app passes
    them in, so this module reads no slot internals); `states` are the names `hal0_slot_state` reports."""

    def __init__(self, states: Sequence[str] = (), slots: Callable[[], Iterable[SlotSample]] | None = None,
                 write_failures: Callable[[], Mapping[str, int]] | None = None,
                 devices: Callable[[], Iterable[DeviceSample]] | None = None) -> None:
        self.requests = Family("hal0_requests", "Requests routed through /v1, by slot, endpoint and HTTP status "
                               "(slot is empty when none was found)", ["slot", "endpoint", "status"])
        self.duration = Family("hal0_request_duration_seconds", "From a request's arrival to the last byte of "
                               "its answer (a cold load's wait included)", ["slot", "endpoint"],
                               buckets=REQUEST_BUCKETS)
        self.ttft = Family("hal0_time_to_first_token_seconds", "Streamed answers: from the request's arrival "
                           "to its first event relayed", ["slot", "endpoint"], buckets=TTFT_BUCKETS)
        self.prompt_tokens = Family("hal0_prompt_tokens", "Prompt tokens, as the backend's answers reported them",
                                    ["slot"])
        self.completion_tokens = Family("hal0_completion_tokens", "Generated tokens, as the backend's answers "
                                        "reported them", ["slot"])
        self.loads = Family("hal0_loads", "Slot loads by outcome (ok, error, cancelled)", ["slot", "outcome"])
        self.load_duration = Family("hal0_load_duration_seconds", "From a load's start (pull included) to its "
                                    "slot passing the readiness probe", ["slot"], buckets=LOAD_BUCKETS)
        self.evictions = Family("hal0_evictions", "Slots unloaded to make room, by reason", ["slot", "reason"])
        self.decisions = Family("hal0_decisions", "Decision records by outcome", ["outcome"])
        self.pull_bytes = Family("hal0_pull_bytes", "Bytes downloaded by model pulls")
        self._families = (self.requests, self.duration, self.ttft, self.prompt_tokens, self.completion_tokens,
                          self.loads, self.load_duration, self.evictions, self.decisions, self.pull_bytes)
        self._held: dict[str, int] = {}
        self._states = tuple(states)
        self._slots = slots or (lambda: ())
        self._write_failures = write_failures or (lambda: {})
        self._devices = devices or (lambda: ())
        self._load_began: dict[str, float | None] = {}
        self._pulled: dict[tuple[str, str], int] = {}
        self._routes: dict[tuple[str, str, Any], _Route] = {}

    def hold(self, slot: str) -> Hold:
        return Hold(self._held, slot)

    def held(self, slot: str) -> int:
        return self._held.get(slot, 0)

    def snapshot(self) -> list[tuple[Family, list[tuple[tuple[str, ...], Any]]]]:
        """The counters and histograms as they are now: taken where they change (the event loop), so a scrape
        rendered in a thread never sees an observation half made."""
        return [(family, family.snapshot()) for family in self._families]

    def exposition(self, snapshot: list[tuple[Family, list[tuple[tuple[str, ...], Any]]]] | None = None) -> bytes:
        """The Prometheus text of `snapshot` (now, if None) and of the gauges read now."""
        from prometheus_client import CollectorRegistry, generate_latest

        rendered = [_render(family, figures) for family, figures in (snapshot or self.snapshot())]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collected(lambda: [*rendered, *self.live()]))
        return generate_latest(registry)

    # -- the bus tap ------------------------------------------------------------------------------------------
    def observe(self, event: Event) -> None:
        if event.topic == "decision":
            self._decision(event.data)
        elif event.topic == "slot":
            self._slot_event(event.data, event.time)
        elif event.topic == "pull":
            self._pull(event.data)

    def _decision(self, d: dict[str, Any]) -> None:
        outcome = str(d.get("outcome") or "")
        self.decisions.labels(outcome).inc()
        slot = d.get("slot") or ""
        if outcome == "evicted":
            self.evictions.labels(slot, str(d.get("reason") or "")[:REASON_MAX]).inc()
            return
        key = (slot, d.get("endpoint") or "", d.get("status"))
        route = self._routes.get(key)
        if route is None:  # once per slot, endpoint and status: then a request costs one lookup here
            endpoint, status = str(key[1]), key[2]
            route = self._routes[key] = _Route(
                self.requests.labels(slot, endpoint, str(status) if status is not None else "none"),
                self.duration.labels(slot, endpoint), self.ttft.labels(slot, endpoint),
                self.prompt_tokens.labels(slot), self.completion_tokens.labels(slot))
        route.requests.inc()
        route.duration.observe(float(d.get("duration_ms") or 0.0) / 1000)
        ttft = d.get("ttft_ms")
        if isinstance(ttft, (int, float)):
            route.ttft.observe(ttft / 1000)
        prompt, completion = d.get("prompt_tokens"), d.get("completion_tokens")
        if isinstance(prompt, int) and prompt > 0:
            route.prompt_tokens.inc(prompt)
        if isinstance(completion, int) and completion > 0:
            route.completion_tokens.inc(completion)

    def _slot_event(self, data: dict[str, Any], published: float) -> None:
        slot, src, dst = data.get("slot"), data.get("from"), data.get("to")
        if not isinstance(slot, str) or not isinstance(dst, str) or src == dst:
            return
        when = float(data.get("time") or published)
        if src in _COLD and dst in _LOADING:
            self._load_began[slot] = when
        elif src in _LOADING and dst in _LOADING:
            # An adopted half-done load (an API restart) has no start this process saw: counted, not timed.
            self._load_began.setdefault(slot, None)
        elif src in _LOADING:
            began = self._load_began.pop(slot, None)
            outcome = "ok" if dst == "ready" else "error" if dst == "error" else "cancelled"
            self.loads.labels(slot, outcome).inc()
            if outcome == "ok" and began is not None:
                self.load_duration.labels(slot).observe(max(0.0, when - began))

    def _pull(self, data: dict[str, Any]) -> None:
        ref, kind = str(data.get("ref") or ""), data.get("kind")
        if kind in ("done", "error"):
            for key in [k for k in self._pulled if k[0] == ref]:
                del self._pulled[key]
            return
        if kind != "progress":
            return
        done = data.get("bytes_done")
        if not isinstance(done, int):
            return
        key = (ref, str(data.get("file") or ""))
        # A file's first report is where it starts (a resumed download's bytes came in an earlier pull).
        last = self._pulled.get(key)
        self._pulled[key] = done
        if last is not None and done > last:
            self.pull_bytes.labels().inc(done - last)

    # -- scrape time --------------------------------------------------------------------------------------------
    def live(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = GaugeMetricFamily("hal0_slot_state", "1 for the state each slot is in now, 0 for the others",
                                  labels=["slot", "state"])
        in_flight = GaugeMetricFamily("hal0_requests_in_flight", "Requests the slot's backend is serving now",
                                      labels=["slot"])
        held = GaugeMetricFamily("hal0_requests_held", "Requests waiting for the slot's cold load now",
                                 labels=["slot"])
        memory = GaugeMetricFamily("hal0_slot_memory_bytes", "Memory of the slot's model: the estimate before a "
                                   "load, the backend's measured total while loaded", labels=["slot", "source"])
        for s in self._slots():
            for name in self._states or (s.state,):
                state.add_metric([s.name, name], 1.0 if name == s.state else 0.0)
            in_flight.add_metric([s.name], s.in_flight)
            held.add_metric([s.name], self._held.get(s.name, 0))
            if s.memory_estimate_bytes is not None:
                memory.add_metric([s.name, "estimate"], s.memory_estimate_bytes)
            if s.memory_measured_bytes is not None:
                memory.add_metric([s.name, "measured"], s.memory_measured_bytes)
        failures = CounterMetricFamily("hal0_write_failures", "State and decision writes that failed (a full "
                                       "disk)", labels=["channel"])
        counts = {"state": 0, "decisions": 0, **self._write_failures()}
        for channel, count in sorted(counts.items()):
            failures.add_metric([channel], count)
        yield from (state, in_flight, held, memory, failures)
        total = GaugeMetricFamily("hal0_device_memory_total_bytes", "Memory of each pool admission budgets (host, "
                                  "gpu:N)", labels=["device"])
        budget = GaugeMetricFamily("hal0_device_memory_budget_bytes", "What hal0's slots may hold on the device: "
                                   "its total less the reserve, or the budget set", labels=["device"])
        free = GaugeMetricFamily("hal0_device_memory_free_bytes", "Free on the device now (MemAvailable; a GPU's "
                                 "total less used)", labels=["device"])
        slot_device = GaugeMetricFamily("hal0_slot_device_memory_bytes", "What each slot holds on each device, as "
                                        "admission counts it (measured, else estimated)", labels=["slot", "device"])
        for d in self._devices():
            total.add_metric([d.device], d.total_bytes)
            budget.add_metric([d.device], d.budget_bytes)
            free.add_metric([d.device], d.free_bytes)
            for name, n in sorted(d.held_bytes.items()):
                slot_device.add_metric([name, d.device], n)
        yield from (total, budget, free, slot_device)


class _Collected:
    """What one scrape renders, as the collector prometheus_client's registry asks for."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def describe(self) -> Iterable[Metric]:
        return ()

"""In-process event bus: publish/subscribe with numbered events and a bounded replay ring.

SSE endpoints stream from it; `Last-Event-ID` resumes from the ring.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from hal0.datatypes import datatype

log = logging.getLogger("hal0.events")


@datatype(frozen=True, slots=True, compiled_init=True)
class Event:
    """One published event: its id in the bus's order, its topic, what it says, when."""
    id: int
    topic: str
    data: dict[str, Any]
    time: float


class EventBus:
    def __init__(self, ring_size: int = 2048, queue_size: int = 4096) -> None:
        self._ids = itertools.count(1)
        self._ring: deque[Event] = deque(maxlen=ring_size)
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._queue_size = queue_size
        self._taps: list[Callable[[Event], None]] = []

    @property
    def last_id(self) -> int:
        return self._ring[-1].id if self._ring else 0

    def tap(self, listener: Callable[[Event], None]) -> None:
        """Call `listener` with every event as it is published, in the publisher's own call: for counters
        (metrics) that must see each event exactly once and at once, without a queue that can fall behind."""
        self._taps.append(listener)

    def publish(self, topic: str, data: dict[str, Any]) -> Event:
        event = Event(next(self._ids), topic, data, time.time())
        self._ring.append(event)
        for listener in self._taps:
            try:
                listener(event)
            except Exception:  # a counter's bug must never break the event it counts
                log.exception("event listener failed on a %s event", topic)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # A consumer this far behind is dropped rather than allowed to grow memory without bound.
                # The stream ends; the client resumes from the ring with Last-Event-ID.
                self._subscribers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
        return event

    def replay(self, after_id: int, topics: Iterable[str] | None = None) -> list[Event]:
        wanted = set(topics) if topics else None
        return [e for e in self._ring if e.id > after_id and (wanted is None or e.topic in wanted)]

    def subscription(self, topics: Iterable[str] | None = None,
                     last_event_id: int | None = None) -> Subscription:
        wanted = frozenset(topics) if topics else None
        queue: asyncio.Queue[Event | None] = asyncio.Queue(self._queue_size)
        backlog = self.replay(last_event_id, wanted) if last_event_id is not None else []
        self._subscribers.add(queue)
        return Subscription(self, queue, wanted, backlog)

    async def subscribe(
        self, topics: Iterable[str] | None = None, last_event_id: int | None = None
    ) -> AsyncIterator[Event]:
        """Yield events (replayed ones first when resuming) until the bus closes the stream."""
        sub = self.subscription(topics, last_event_id)
        try:
            while True:
                try:
                    event = await sub.get(None)
                except StreamEnded:
                    return
                if event is not None:
                    yield event
        finally:
            sub.close()

    def _unsubscribe(self, queue: asyncio.Queue[Event | None]) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(None)
            except asyncio.QueueFull:
                pass
        self._subscribers.clear()


class StreamEnded(Exception):
    """The bus closed this subscription (shutdown, or the consumer fell too far behind)."""


class Subscription:
    def __init__(self, bus: EventBus, queue: asyncio.Queue[Event | None], wanted: frozenset[str] | None,
                 backlog: list[Event]) -> None:
        self._bus = bus
        self._queue = queue
        self._wanted = wanted
        self._backlog = deque(backlog)
        self._seen = backlog[-1].id if backlog else 0

    async def get(self, timeout: float | None) -> Event | None:
        """The next event; None when `timeout` passes first. Raises StreamEnded when the bus ends it."""
        if self._backlog:
            return self._backlog.popleft()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if not self._queue.empty():
                item = self._queue.get_nowait()  # what is queued is returned even with no time left
            else:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return None
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    return None
            if item is None:
                raise StreamEnded
            if item.id <= self._seen or (self._wanted is not None and item.topic not in self._wanted):
                continue
            return item

    def close(self) -> None:
        self._bus._unsubscribe(self._queue)

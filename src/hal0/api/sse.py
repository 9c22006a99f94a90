"""Server-sent events from the event bus, with event ids and `Last-Event-ID` resume."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable

from starlette.requests import Request
from starlette.responses import StreamingResponse

from hal0.events import Event, EventBus, StreamEnded

HEARTBEAT_S = 15.0


def _frame(event: Event) -> bytes:
    data = json.dumps({"id": event.id, "topic": event.topic, "time": event.time, **event.data},
                      separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.topic}\ndata: {data}\n\n".encode()


def last_event_id(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None:
        return None
    try:
        return max(0, int(raw))
    except ValueError:
        return None


def sse_response(bus: EventBus, request: Request, topics: Iterable[str] | None) -> StreamingResponse:
    topics = list(topics) if topics else None
    resume = last_event_id(request)

    # Subscribed before the headers go out: a client that acts once it sees them misses no event.
    # (Should the body never be iterated, the bus drops the subscription when its queue fills.)
    sub = bus.subscription(topics, resume)

    async def stream() -> AsyncIterator[bytes]:
        yield b": hal0 event stream\nretry: 1000\n\n"
        try:
            while True:
                try:
                    event = await sub.get(HEARTBEAT_S)
                except StreamEnded:
                    return
                yield b": keep-alive\n\n" if event is None else _frame(event)
        finally:
            sub.close()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

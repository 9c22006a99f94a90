"""`GET /metrics` (Prometheus text format) and `GET /api/stats` (the last 15 minutes per second, per slot); the
once-a-second sample both read is `hal0.api.samples`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hal0.api.routing import Query, Router
from hal0.errors import SlotNotFound
from hal0.metrics import Metrics
from hal0.slots.manager import SlotManager
from hal0.stats import WINDOW_S, StatsRing, StatsView

router = Router(tags=["monitoring"])
log = logging.getLogger("hal0.metrics")

#: The text format every Prometheus reads (prometheus_client's newest, 1.0.0, is the same text for hal0's
#: names, but a 2.x server does not know it by that name).
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", media_type="text/plain",
            response_description="Prometheus' text format, version 0.0.4")
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    # In a thread: the device figures read what each loaded backend holds (/proc, NVML), a few ms a scrape. The
    # counters are read here, on the loop that moves them.
    return Response(await asyncio.to_thread(registry.exposition, registry.snapshot()), media_type=EXPOSITION_TYPE)


@router.get("/api/stats", summary="Per-second aggregates per slot over the last 15 minutes", query={
    "seconds": Query(int, WINDOW_S, ge=1, le=WINDOW_S, description="how many seconds, newest last"),
    "end": Query(int, None, ge=0, description="the last second to include (unix time); default the last "
                 "complete second"),
    "slot": Query(str, None, max_length=200, description="one slot only")})
async def stats(request: Request, seconds: int, end: int | None, slot: str | None) -> JSONResponse:
    ring: StatsRing = request.app.state.stats
    manager: SlotManager = request.app.state.manager
    if slot is not None and slot not in manager.slots:
        raise SlotNotFound(f"no slot named {slot[:80]!r}; slots: {', '.join(sorted(manager.slots))}",
                           detail={"available": sorted(manager.slots)})
    last = int(time.time()) - 1
    names = [slot] if slot is not None else [s.name for s in manager.ordered()]
    view: StatsView = ring.view(min(end, last) if end is not None else last, seconds, names)
    # Straight to JSON: 900 seconds of every series are plain numbers; a response model would only slow them.
    return JSONResponse(view)

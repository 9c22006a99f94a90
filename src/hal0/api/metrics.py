"""`GET /metrics` (Prometheus text format) and `GET /api/stats` (the last 15 minutes per second, per slot), and
the once-a-second sample of every slot that both read.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from hal0.api.hardware import memory_totals
from hal0.errors import SlotNotFound
from hal0.hardware.inventory import inventory
from hal0.metrics import DeviceSample, Metrics
from hal0.slots.manager import SlotManager
from hal0.slots.slot import Slot
from hal0.stats import WINDOW_S, SlotSample, StatsRing, StatsView

router = APIRouter(tags=["monitoring"])
log = logging.getLogger("hal0.metrics")

#: The text format every Prometheus reads (prometheus_client's newest, 1.0.0, is the same text for hal0's
#: names, but a 2.x server does not know it by that name).
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def device_samples(manager: SlotManager) -> list[DeviceSample]:
    """Each budgeted memory pool and what every slot holds there (for the scrape, in its thread)."""
    holdings = manager.holdings()
    return [DeviceSample(d, b.total_bytes, b.budget_bytes, b.free_bytes,
                         {h.slot: h.bytes[d] for h in holdings if h.bytes.get(d)})
            for d, b in manager.budgets(inventory()).items()]


def slot_samples(manager: SlotManager, stats: StatsRing) -> list[SlotSample]:
    """Every slot now, memory from the latest sample (a scrape reads no files)."""
    out = []
    for slot in manager.ordered():
        estimate, measured = stats.memory(slot.name)
        out.append(SlotSample(slot.name, slot.state.value, slot.in_flight, estimate, measured))
    return out


def _memory_totals(manager: SlotManager, slots: list[Slot]) -> list[tuple[int | None, int | None]]:
    return [memory_totals(manager, s) for s in slots]


async def sample_every_second(manager: SlotManager, stats: StatsRing) -> None:
    """Record each slot's state and memory once a second, on the second. Memory is read in a thread: the estimate
    reads a GGUF header once per model (the measured figures are the slot's own, see `memory_totals`)."""
    failing = False
    while True:
        slots = manager.ordered()
        try:
            memory = await asyncio.to_thread(_memory_totals, manager, slots)
        except Exception:  # one bad reading must not end the sampling: the states still count
            if not failing:
                log.exception("reading the slots' memory failed (logged once until it works again)")
            failing = True
            memory = [(None, None)] * len(slots)
        else:
            failing = False
        stats.sample(time.time(), [SlotSample(s.name, s.state.value, s.in_flight, est, got)
                                   for s, (est, got) in zip(slots, memory, strict=True)])
        await asyncio.sleep(1.0 - time.time() % 1.0 + 0.001)


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=PlainTextResponse,
            response_description="Prometheus' text format, version 0.0.4")
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    # In a thread: the device figures read what each loaded backend holds (/proc, NVML), a few ms a scrape.
    return Response(await asyncio.to_thread(registry.exposition), media_type=EXPOSITION_TYPE)


@router.get("/api/stats", summary="Per-second aggregates per slot over the last 15 minutes")
async def stats(request: Request,
                seconds: int = Query(WINDOW_S, ge=1, le=WINDOW_S, description="how many seconds, newest last"),
                end: int | None = Query(None, ge=0, description="the last second to include (unix time); default "
                                        "the last complete second"),
                slot: str | None = Query(None, max_length=200, description="one slot only")) -> JSONResponse:
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

"""The once-a-second sample of every slot (state, in flight, memory) and the gauges a scrape reads: what
`/metrics` and `/api/stats` report, kept apart from their routes so the API starts them without the management app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from hal0.metrics import DeviceSample
from hal0.slots.manager import SlotManager
from hal0.slots.slot import Slot
from hal0.slots.state import LOADED
from hal0.stats import SlotSample, StatsRing

if TYPE_CHECKING:
    from hal0.hardware.estimate import MemoryEstimate

log = logging.getLogger("hal0.metrics")

_estimates: dict[tuple[str, str, int | None, tuple[str, ...]], MemoryEstimate | None] = {}


def memory_totals(manager: SlotManager, slot: Slot) -> tuple[int | None, int | None]:
    """The slot's estimated and measured total bytes, for the once-a-second sample: the estimate (a GGUF header
    read) is kept per model and settings; the measurement is the one the slot's watch last read (every
    MEMORY_REFRESH_S, the figures its snapshot carries), so the sample reads no /proc of its own."""
    key = (slot.name, slot.config.model or "", slot.config.ctx_size, tuple(slot.config.args))
    if key not in _estimates:
        for old in [k for k in _estimates if k[0] == slot.name]:
            del _estimates[old]
        _estimates[key] = manager.memory.estimate(slot)
    est = _estimates[key]
    got = (slot.memory or {}).get("measured") if slot.state in LOADED else None
    return (est.total_bytes if est else None), (got["total_bytes"] if got else None)



def device_samples(manager: SlotManager) -> list[DeviceSample]:
    """Each budgeted memory pool and what every slot holds there (for the scrape, in its thread)."""
    from hal0.hardware.inventory import inventory

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
    reads a GGUF header once per model (the measured figures are the slot's own, see `memory_totals`). The first
    sample comes one to two seconds after the start: the first reading (its imports, the GGUF headers) would
    otherwise compete with the requests a restarted API has waiting."""
    failing = False
    await asyncio.sleep(2.0 - time.time() % 1.0 + 0.001)
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

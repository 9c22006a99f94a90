"""/api/hardware and the memory figures of slots: the estimate before a load, what the backend holds after.

The numbers come from hal0.hardware; this module only finds the slot's model file, log and pid.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request

from hal0.errors import InvalidRequest
from hal0.hardware.estimate import LoadSettings, MemoryEstimate, estimate_file
from hal0.hardware.inventory import inventory
from hal0.hardware.measure import MeasuredMemory, measure, parse_buffer_report, read_log_tail
from hal0.slots.manager import SlotManager
from hal0.slots.slot import Slot
from hal0.slots.state import LOADED

router = APIRouter(prefix="/api", tags=["hardware"])

# A backend's buffer report never changes after its load: read its log once per (slot, pid).
_reports: dict[tuple[str, int], dict[str, dict[str, int]]] = {}


def _manager(request: Request) -> SlotManager:
    manager: SlotManager = request.app.state.manager
    return manager


def slot_estimate(manager: SlotManager, slot: Slot, ref: str | None = None) -> MemoryEstimate | None:
    """What loading `ref` (the slot's own model by default) would cost; None where it cannot be told (no model,
    not installed, not a GGUF, not a llama.cpp slot)."""
    ref = ref or slot.config.model
    if ref is None or slot.config.provider != "llama.cpp":
        return None
    path = manager.ctx.models.path(ref)
    if path is None:
        return None
    try:
        return estimate_file(path, LoadSettings.from_args(slot.config.ctx_size, slot.config.args))
    except (ValueError, OSError):
        return None


def slot_measured(manager: SlotManager, slot: Slot) -> MeasuredMemory | None:
    """What the slot's backend holds now; None while no backend is loaded."""
    pid = slot.record.pid
    if pid is None or slot.state not in LOADED:
        return None
    key = (slot.name, pid)
    buffers = _reports.get(key)
    if buffers is None:
        # Loaded means the report is already written (llama-server prints it before it listens), so an empty
        # answer (another provider, a lower -lv) is kept too: the log is read once per backend, never per request.
        buffers = parse_buffer_report(read_log_tail(manager.supervisor.log_path(slot.name)))
        for old in [k for k in list(_reports) if k[0] == slot.name]:  # list(): the sampler thread reads too
            del _reports[old]
        _reports[key] = buffers
    live = measure(pid, None)
    return MeasuredMemory(buffers, live.process, live.gpu_process_bytes)


_estimates: dict[tuple[str, str, int | None, tuple[str, ...]], MemoryEstimate | None] = {}


def memory_totals(manager: SlotManager, slot: Slot) -> tuple[int | None, int | None]:
    """The slot's estimated and measured total bytes, for the once-a-second sample: the estimate (a GGUF header
    read) is kept per model and settings, the measurement is /proc's and NVML's figure now."""
    key = (slot.name, slot.config.model or "", slot.config.ctx_size, tuple(slot.config.args))
    if key not in _estimates:
        for old in [k for k in _estimates if k[0] == slot.name]:
            del _estimates[old]
        _estimates[key] = slot_estimate(manager, slot)
    est = _estimates[key]
    got = slot_measured(manager, slot)
    return (est.total_bytes if est else None), (got.total_bytes if got else None)


def memory_view(manager: SlotManager, slot: Slot) -> dict[str, Any]:
    """The `memory` field of a slot's JSON."""
    est = slot_estimate(manager, slot)
    got = slot_measured(manager, slot)
    return {"estimate": est.to_dict() if est else None, "measured": got.to_dict() if got else None}


@router.get("/hardware", summary="CPU, host memory, GPUs and NPUs of this machine")
async def hardware() -> dict[str, Any]:
    return (await asyncio.to_thread(inventory)).to_dict()


@router.get("/slots/{name}/estimate", summary="What loading a model into this slot would cost, before loading")
async def estimate_route(name: str, request: Request,
                         model: str | None = Query(None, description="model ref; the slot's own by default"),
                         ) -> dict[str, Any]:
    manager = _manager(request)
    slot = manager.get(name)
    est = await asyncio.to_thread(slot_estimate, manager, slot, model)
    if est is None:
        raise InvalidRequest(
            f"no estimate for slot {name!r} with model {(model or slot.config.model)!r}: it needs an installed "
            "GGUF model and the llama.cpp provider", code="no_estimate")
    inv = await asyncio.to_thread(inventory)
    return {"slot": name, "model": model or slot.config.model, "estimate": est.to_dict(),
            "fits": est.total_bytes <= inv.memory.available_bytes if not est.devices.keys() - {"CPU"} else None,
            "available_bytes": inv.memory.available_bytes}

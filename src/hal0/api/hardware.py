"""/api/hardware and the memory figures of slots: the estimate before a load, what the backend holds after.

The numbers come from hal0.hardware; this module only finds the slot's model file, log and pid.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from hal0.api.routing import Query, Router
from hal0.errors import InvalidRequest
from hal0.hardware.inventory import inventory
from hal0.slots.manager import SlotManager
from hal0.slots.slot import Slot

router = Router(prefix="/api", tags=["hardware"])

def _manager(request: Request) -> SlotManager:
    manager: SlotManager = request.app.state.manager
    return manager


def memory_view(manager: SlotManager, slot: Slot) -> dict[str, Any]:
    """The `memory` field of a slot's JSON, read now."""
    return manager.memory.view(slot)


@router.get("/hardware", summary="CPU, host memory, GPUs and NPUs of this machine, and hal0's memory budgets")
async def hardware(request: Request) -> dict[str, Any]:
    manager = _manager(request)
    inv = await asyncio.to_thread(inventory)
    out = inv.to_dict()
    # Each device's budget and what every slot holds there: the numbers admission decides by.
    out["budgets"] = {d: b.to_dict() for d, b in manager.budgets(inv).items()}
    out["holdings"] = [h.to_dict() for h in await asyncio.to_thread(manager.holdings)]
    return out


@router.get("/slots/{name}/estimate", summary="What loading a model into this slot would cost, before loading",
            query={"model": Query(description="model ref; the slot's own by default")})
async def estimate_route(request: Request, name: str, model: str | None) -> dict[str, Any]:
    manager = _manager(request)
    slot = manager.get(name)
    inv = await asyncio.to_thread(inventory)
    fit = await asyncio.to_thread(manager.fit, slot, model, inv)
    if fit is None:
        raise InvalidRequest(
            f"no estimate for slot {name!r} with model {(model or slot.config.model)!r}: it needs an installed "
            "GGUF model and the llama.cpp provider", code="no_estimate")
    return {"slot": name, "model": model or slot.config.model, "available_bytes": inv.memory.available_bytes,
            **fit}

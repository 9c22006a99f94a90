"""/api: slots (list, show, create, update, delete, assign, load, unload, restart, logs) and events.

Thin over the SlotManager; the CLI and the dashboard both use exactly these routes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from hal0.api.hardware import memory_view
from hal0.api.routing import Query, Router
from hal0.api.sse import sse_response
from hal0.dispatch.decisions import DecisionLog
from hal0.slots.manager import SlotManager
from hal0.slots.slot import Slot

router = Router(prefix="/api", tags=["management"])


class SlotFields(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    type: str | None = Field(None, description="chat, embed, rerank, stt or tts")
    provider: str | None = Field(None, description="llama.cpp, moonshine, kokoro or flm")
    model: str | None = Field(None, description="model ref in the registry")
    port: int | None = Field(None, description="fixed backend port; 0 or absent allocates one")
    aliases: list[str] | None = None
    ctx_size: int | None = None
    args: list[str] | None = Field(None, description="extra backend arguments")
    env: dict[str, str] | None = None
    idle_timeout_s: float | None = None
    ttl_s: float | None = None
    warmup_budget_s: float | None = None
    device: str | None = Field(None, description='auto, cpu, gpu, gpu:N or gpu:N,M')
    gpu_layers: int | None = Field(None, description="layers offloaded on a GPU placement; absent: all")
    pinned: bool | None = Field(None, description="never unloaded to make room or under memory pressure")
    group: str | None = Field(None, description="exclusive group: loading one member unloads the others")
    host: str | None = Field(None, description="rpc slots: the address the worker listens on")
    insecure_bind: bool | None = Field(None, description="rpc slots: allow 0.0.0.0 / :: (no authentication!)")
    rpc: list[str] | None = Field(None, description="llama.cpp slots: RPC workers (host:port) to spread over")


class SlotCreate(SlotFields):
    name: str = Field(..., max_length=200)


class ModelAssign(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(..., max_length=200, description="model ref, or null to unassign")


def _manager(request: Request) -> SlotManager:
    manager: SlotManager = request.app.state.manager
    return manager


def _view(slot: Slot, manager: SlotManager | None = None) -> dict[str, Any]:
    view = slot.snapshot()
    if manager is not None:
        view["memory"] = memory_view(manager, slot)
    return view


@router.get("/slots", summary="Every slot with its live state")
async def list_slots(request: Request) -> dict[str, Any]:
    manager = _manager(request)
    return {"data": [_view(s, manager) for s in manager.ordered()]}


@router.post("/slots", status_code=201, summary="Create a user slot", body=SlotCreate)
async def create_slot(request: Request, body: SlotCreate) -> dict[str, Any]:
    slot = await _manager(request).create(body.model_dump(exclude_none=True))
    return _view(slot)


@router.get("/slots/{name}", summary="One slot")
async def show_slot(request: Request, name: str) -> dict[str, Any]:
    manager = _manager(request)
    slot = manager.get(name)
    view = _view(slot, manager)
    view["history"] = slot.history
    return view


@router.patch("/slots/{name}", summary="Change a slot's config (a loaded slot restarts)", body=SlotFields)
async def update_slot(request: Request, name: str, body: SlotFields) -> dict[str, Any]:
    return _view(await _manager(request).update(name, body.model_dump(exclude_unset=True)))


@router.delete("/slots/{name}", status_code=204, summary="Delete a user slot (unloads it first)")
async def delete_slot(request: Request, name: str) -> Response:
    await _manager(request).delete(name)
    return Response(status_code=204)


@router.put("/slots/{name}/model", summary="Assign a model ref to a slot", body=ModelAssign)
async def assign_model(request: Request, name: str, body: ModelAssign) -> dict[str, Any]:
    return _view(await _manager(request).assign(name, body.model))


@router.post("/slots/{name}/load", summary="Load a slot's model; waits for ready unless wait=false",
             query={"wait": Query(bool, True)})
async def load_slot(request: Request, name: str, wait: bool) -> dict[str, Any]:
    manager = _manager(request)
    slot = manager.get(name)
    if wait:
        await slot.ensure_loaded(manager.settings.cold_boot_grace_s)
        await asyncio.to_thread(manager.store.flush)  # the caller may read state.json next
    else:
        slot.start_load()
    return _view(slot)


@router.post("/slots/{name}/unload", summary="Unload a slot (SIGTERM, then SIGKILL after a timeout)")
async def unload_slot(request: Request, name: str) -> dict[str, Any]:
    slot = _manager(request).get(name)
    await slot.unload()
    return _view(slot)


@router.post("/slots/{name}/restart", summary="Unload and load again, waiting for ready")
async def restart_slot(request: Request, name: str) -> dict[str, Any]:
    manager = _manager(request)
    slot = manager.get(name)
    await slot.unload("restart requested")
    await slot.ensure_loaded(manager.settings.cold_boot_grace_s)
    await asyncio.to_thread(manager.store.flush)
    return _view(slot)


@router.get("/slots/{name}/logs", summary="The last lines of a slot's backend log",
            query={"lines": Query(int, 100, ge=1, le=5000)})
async def slot_logs(request: Request, name: str, lines: int) -> dict[str, Any]:
    manager = _manager(request)
    slot = manager.get(name)
    return {"slot": slot.name, "lines": await manager.supervisor.log_tail(slot.name, lines)}


@router.get("/decisions", summary="Recent routing decisions, newest first",
            query={"slot": Query(), "endpoint": Query(), "outcome": Query(), "limit": Query(int, 100, ge=1, le=2000)})
async def decisions(request: Request, slot: str | None, endpoint: str | None, outcome: str | None,
                    limit: int) -> dict[str, Any]:
    log: DecisionLog = request.app.state.decisions
    return {"data": log.query(slot=slot, endpoint=endpoint, outcome=outcome, limit=limit)}


@router.get("/events", summary="Server-sent events: slot transitions, decisions, pulls",
            response_description="text/event-stream; resume with the Last-Event-ID header",
            media_type="text/event-stream", query={"topics": Query()})
async def events(request: Request, topics: str | None) -> Response:
    wanted = [t for t in (topics or "").split(",") if t] or None
    return sse_response(request.app.state.events, request, wanted)

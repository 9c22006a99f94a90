"""/api/models, /api/catalog and /api/loadouts: the registry over HTTP.

Pull progress goes out on the event bus (topic "pull") and as a per-pull SSE stream the CLI follows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from hal0.api.routing import Query, Router
from hal0.hardware.budget import BudgetSettings, device_budgets
from hal0.hardware.estimate import file_size_rule
from hal0.hardware.inventory import inventory
from hal0.registry import catalog, loadouts
from hal0.registry.pull import EventCallback, PullEvent, Registry

router = Router(prefix="/api", tags=["models"])


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(..., max_length=200)
    source: str | None = Field(None, max_length=2000,
                               description="hf:owner/repo/path/file, an https URL or a file path; "
                                           "absent: the catalog entry of `ref`")
    sha256: str | None = Field(None, max_length=64)
    slot_type: str | None = Field(None, description="hint: chat, embed, stt or tts")
    provider: str | None = None
    wait: bool = Field(False, description="answer when the pull has finished, with the manifest")


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(..., max_length=200)
    path: str = Field(..., max_length=4096, description="absolute path of a file on the API's host")
    link: bool = Field(False, description="hard-link instead of copying (falls back to copy)")
    slot_type: str | None = None
    provider: str | None = None


class ApplyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="apply even when the estimate exceeds the machine's memory")


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def _publisher(request: Request) -> EventCallback:
    bus = request.app.state.events

    def publish(event: PullEvent) -> None:
        bus.publish("pull", event.to_dict())

    return publish


@router.get("/models", summary="Installed models and pulls in flight")
async def list_models(request: Request) -> dict[str, Any]:
    registry = _registry(request)
    manager = request.app.state.manager
    models = [{**m.to_dict(), "slots": manager.slots_using(m.ref)} for m in registry.list_models()]
    return {"models": models, "pulling": registry.pulling()}


@router.get("/catalog", summary="Search the built-in catalog",
            query={"q": Query(str, "", max_length=200), "type": Query(description="chat, embed, stt or tts")})
async def search_catalog(request: Request, q: str, type: str | None) -> dict[str, Any]:
    registry = _registry(request)
    memory = await _machine_memory(request)
    # Before a pull there is no GGUF header to estimate from: the file size rule (x1.2) stands in for it.
    return {"catalog": [{**e.to_dict(), "installed": registry.exists(e.ref),
                         "fits": file_size_rule(e.size) <= memory.total if e.size else None}
                        for e in catalog.search(q, type)]}


@router.post("/models/pull", summary="Pull a model (from the catalog or a source)", status_code=202,
             body=PullRequest)
async def pull_model(request: Request, body: PullRequest) -> dict[str, Any] | JSONResponse:
    registry = _registry(request)
    events_url = f"/api/models/{body.ref}/pull"
    if body.wait:
        manifest = await registry.pull(body.ref, body.source, sha256=body.sha256, slot_type=body.slot_type,
                                       provider=body.provider, on_event=_publisher(request))
        return JSONResponse({"ref": body.ref, "status": "installed", "manifest": manifest.to_dict()})
    if registry.exists(body.ref) and not body.source:
        return JSONResponse({"ref": body.ref, "status": "installed",
                             "manifest": registry.get(body.ref).to_dict(), "events": events_url})
    registry.start_pull(body.ref, body.source, sha256=body.sha256, slot_type=body.slot_type,
                        provider=body.provider, on_event=_publisher(request))
    return {"ref": body.ref, "status": "pulling", "events": events_url}


@router.get("/models/{ref}/pull", summary="Progress of the pull of `ref` (SSE), ending with done or error",
            media_type="text/event-stream")
async def pull_events(request: Request, ref: str) -> StreamingResponse:
    registry = _registry(request)
    events = registry.watch(ref)
    # The first event is taken here so an unknown ref answers 404 instead of an empty stream.
    first = await anext(events)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield _frame(first)
            async for event in events:
                yield _frame(event)
        finally:
            await events.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _frame(event: PullEvent) -> bytes:
    return f"event: pull\ndata: {json.dumps(event.to_dict(), separators=(',', ':'))}\n\n".encode()


@router.post("/models/import", summary="Install a local file as a model", status_code=201,
             body=ImportRequest)
async def import_model(request: Request, body: ImportRequest) -> dict[str, Any]:
    registry = _registry(request)
    manifest = await asyncio.to_thread(registry.import_file, body.ref, Path(body.path), link=body.link,
                                       slot_type=body.slot_type, provider=body.provider)
    return manifest.to_dict()


@router.get("/models/{ref}", summary="One installed model's manifest")
async def show_model(request: Request, ref: str) -> dict[str, Any]:
    manifest = _registry(request).get(ref)
    return {**manifest.to_dict(), "slots": request.app.state.manager.slots_using(ref)}


@router.post("/models/{ref}/verify", summary="Hash every file of `ref` against its manifest (reads them whole)")
async def verify_model(request: Request, ref: str) -> dict[str, Any]:
    registry = _registry(request)
    result: dict[str, Any] = await asyncio.to_thread(registry.store.verify, ref)
    return result


@router.delete("/models/{ref}", summary="Remove a model (refused while a slot uses it)")
async def remove_model(request: Request, ref: str) -> dict[str, Any]:
    manifest = _registry(request).remove(ref, request.app.state.manager.slots_using)
    return {"removed": manifest.ref, "freed_bytes": manifest.size}


@router.get("/loadouts", summary="Recommended model-per-slot sets by hardware tier")
async def list_loadouts(request: Request) -> dict[str, Any]:
    return {"loadouts": [lo.to_dict() for lo in loadouts.list_loadouts()]}


async def _machine_memory(request: Request) -> loadouts.MemInfo:
    """What loadouts are checked against: the budgets admission uses, with this hal0's memory settings."""
    inv = await asyncio.to_thread(inventory)
    return loadouts.machine_memory(device_budgets(inv, BudgetSettings.from_settings(request.app.state.settings)))


@router.get("/loadouts/{name}", summary="A loadout with its memory estimate for this machine")
async def show_loadout(request: Request, name: str) -> dict[str, Any]:
    return loadouts.plan_loadout(_registry(request), name, await _machine_memory(request)).to_dict()


@router.post("/loadouts/{name}/apply", summary="Pull what is missing and assign every slot", body=ApplyRequest,
             body_required=False)
async def apply_loadout(request: Request, name: str, body: ApplyRequest | None) -> dict[str, Any]:
    manager = request.app.state.manager

    async def assign(slot: str, ref: str) -> None:
        await manager.assign(slot, ref)

    report = await loadouts.apply_loadout(_registry(request), name, assign,
                                          force=body.force if body else False,
                                          memory=await _machine_memory(request),
                                          on_event=_publisher(request))
    return report.to_dict()

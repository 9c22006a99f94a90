"""/api/peers: the other hal0 nodes this one follows, whether each is up, and the slots each serves."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from hal0.api.routing import Router
from hal0.peers.follow import Peers

router = Router(prefix="/api", tags=["peers"])


@router.get("/peers", summary="Peers: status (connecting, up, down), why, and their slots")
async def list_peers(request: Request) -> dict[str, Any]:
    peers: Peers | None = request.app.state.peers  # None: no peers configured
    return {"data": peers.to_list() if peers is not None else []}

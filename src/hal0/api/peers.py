"""/api/peers: the other hal0 nodes this one follows, whether each is up, and the slots each serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from hal0.peers import Peers

router = APIRouter(prefix="/api", tags=["peers"])


@router.get("/peers", summary="Peers: status (connecting, up, down), why, and their slots")
async def list_peers(request: Request) -> dict[str, Any]:
    peers: Peers = request.app.state.peers
    return {"data": peers.to_list()}

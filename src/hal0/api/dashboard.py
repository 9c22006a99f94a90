"""The dashboard: `/` serves the page, `/dashboard/*` its static assets, straight from the installed package.

Nothing is built or fetched at run time; the page talks to /api and /v1 like any other client.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from hal0.api.routing import Router
from hal0.errors import NotFound

router = Router(include_in_schema=False)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
# The page only loads its own files and talks to its own origin.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _root() -> Traversable:
    return resources.files("hal0").joinpath("dashboard")


def _asset(path: str) -> tuple[bytes, str]:
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") or p.startswith(".") or "\\" in p for p in parts):
        raise NotFound(f"no dashboard asset {path[:200]!r}")
    node = _root()
    for part in parts:
        node = node.joinpath(part)
    suffix = "." + parts[-1].rsplit(".", 1)[-1] if "." in parts[-1] else ""
    if suffix not in _TYPES or not node.is_file():
        raise NotFound(f"no dashboard asset {path[:200]!r}")
    return node.read_bytes(), _TYPES[suffix]


def _respond(path: str) -> Response:
    body, media_type = _asset(path)
    # no-cache: the browser revalidates, so an upgraded hal0 never runs a stale page.
    return Response(body, media_type=media_type,
                    headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP,
                             "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@router.get("/")
async def index(request: Request) -> Response:
    return _respond("index.html")


@router.get("/dashboard")
async def dashboard_root(request: Request) -> RedirectResponse:
    return RedirectResponse("/", status_code=307)


@router.get("/dashboard/{path:path}")
async def asset(request: Request, path: str) -> Response:
    return _respond(path)

"""The management app's routing: routes declared with their parameters, matched, validated and answered, and the
OpenAPI document built from the same declarations.

hal0's own, over Starlette's requests and responses and pydantic's body models: FastAPI did this until the
fifteenth round and cost an API that had served one `/api` request ~15 MB (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import PurePath
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from hal0.api.errors import (
    HTTP_CODES,
    Invalid,
    error_response,
    hal0_error_response,
    invalid_response,
    unexpected_response,
)
from hal0.datatypes import datatype
from hal0.errors import Hal0Error

log = logging.getLogger("hal0.api")

Handler = Callable[..., Awaitable[Any]]

_TRUE, _FALSE = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off"}


@datatype(frozen=True)
class Query:
    """One query parameter: its type (`str`, `int` or `bool`), default and bounds."""

    type: type = str
    default: Any = None
    ge: int | None = None
    le: int | None = None
    max_length: int | None = None
    description: str | None = None

    def parse(self, name: str, raw: str | None) -> Any:
        if raw is None:
            return self.default
        loc = ["query", name]
        if self.type is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise Invalid([{"loc": loc, "msg": "Input should be a valid boolean, unable to interpret input"}])
        if self.type is int:
            try:
                value = int(raw)
            except ValueError:
                raise Invalid([{"loc": loc, "msg": "Input should be a valid integer, unable to parse string as "
                                                   "an integer"}]) from None
            if self.ge is not None and value < self.ge:
                raise Invalid([{"loc": loc, "msg": f"Input should be greater than or equal to {self.ge}"}])
            if self.le is not None and value > self.le:
                raise Invalid([{"loc": loc, "msg": f"Input should be less than or equal to {self.le}"}])
            return value
        if self.max_length is not None and len(raw) > self.max_length:
            raise Invalid([{"loc": loc, "msg": f"String should have at most {self.max_length} characters"}])
        return raw

    def schema(self) -> dict[str, Any]:
        own: dict[str, Any] = {"type": {bool: "boolean", int: "integer"}.get(self.type, "string")}
        for key, value in (("minimum", self.ge), ("maximum", self.le), ("maxLength", self.max_length)):
            if value is not None:
                own[key] = value
        if self.default is None:
            return {"anyOf": [own, {"type": "null"}]}
        return {**own, "default": self.default}


@datatype
class Route:
    method: str
    path: str
    handler: Handler
    summary: str | None = None
    status_code: int = 200
    query: dict[str, Query] = dataclasses.field(default_factory=dict)
    body: type[BaseModel] | None = None
    body_required: bool = True
    #: What a success answers with: JSON unless said otherwise (the SSE streams, the Prometheus text).
    media_type: str = "application/json"
    response_description: str = "Successful Response"
    tags: tuple[str, ...] = ()
    include_in_schema: bool = True

    def __post_init__(self) -> None:
        self.params = re.findall(r"{(\w+)(?::path)?}", self.path)
        pattern = re.sub(r"{(\w+):path}", r"(?P<\1>.*)", self.path)
        self.pattern = re.compile("^" + re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", pattern) + "$")

    async def respond(self, request: Request, path_params: dict[str, str]) -> Response:
        kwargs: dict[str, Any] = dict(path_params)
        errors: list[dict[str, Any]] = []
        for name, query in self.query.items():
            try:
                kwargs[name] = query.parse(name, request.query_params.get(name))
            except Invalid as exc:
                errors += exc.errors
        if self.body is not None:
            try:
                kwargs["body"] = self._body(await request.body())
            except Invalid as exc:
                errors += exc.errors
        if errors:
            raise Invalid(errors)
        result = await self.handler(request, **kwargs)
        if isinstance(result, Response):
            return result
        return JSONResponse(jsonable(result), status_code=self.status_code)

    def _body(self, raw: bytes) -> BaseModel | None:
        assert self.body is not None
        if not raw.strip() or (not self.body_required and raw.strip() == b"null"):
            if self.body_required:
                raise Invalid([{"loc": ["body"], "msg": "Field required"}])
            return None
        try:
            return self.body.model_validate_json(raw)
        except ValidationError as exc:
            raise Invalid([{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]) from None


class Router:
    """Routes under one prefix, declared with a decorator per method (as FastAPI's `APIRouter` reads)."""

    def __init__(self, prefix: str = "", tags: Sequence[str] = (), include_in_schema: bool = True) -> None:
        self.prefix = prefix
        self.tags = tuple(tags)
        self.include_in_schema = include_in_schema
        self.routes: list[Route] = []

    def route(self, method: str, path: str, **options: Any) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            options.setdefault("tags", self.tags)
            options.setdefault("include_in_schema", self.include_in_schema)
            self.routes.append(Route(method, self.prefix + path, handler, **options))
            return handler

        return register

    def get(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **options)

    def post(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **options)

    def put(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, **options)

    def patch(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, **options)

    def delete(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **options)


class ManagementApp:
    """An ASGI app over routers: the first route whose path and method match answers; a path that matches under
    another method is 405, none 404. Every error is OpenAI-shaped. `/openapi.json` and `/docs` describe it."""

    def __init__(self, routers: Iterable[Router], state: SimpleNamespace, title: str = "hal0",
                 version: str = "0", description: str = "") -> None:
        self.state = state
        self.routes = [r for router in routers for r in router.routes]
        self.info = {"title": title, "version": version, "description": description}
        self._openapi: dict[str, Any] | None = None
        docs = Router(include_in_schema=False)
        docs.get("/openapi.json")(self._openapi_route)
        docs.get("/docs")(self._docs_route)
        self.routes += docs.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        scope["app"] = self  # what Starlette's `request.app` reads: the routes find the shared objects there
        request = Request(scope, receive)
        try:
            response = await self._answer(request)
        except Hal0Error as exc:
            response = hal0_error_response(exc)
        except Invalid as exc:
            response = invalid_response(exc)
        except Exception as exc:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = unexpected_response(exc)
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        method = "GET" if method == "HEAD" else method  # the server sends a HEAD's headers only
        allowed: list[str] = []
        for route in self.routes:
            match = route.pattern.match(path)
            if match is None:
                continue
            if route.method == method:
                return await route.respond(request, match.groupdict())
            allowed.append(route.method)
        if allowed:
            return error_response(405, HTTP_CODES[405], f"{request.method} is not allowed on "
                                  f"{path[:200]}; allowed: {', '.join(allowed)}", headers={"Allow": ", ".join(allowed)})
        if path.endswith("/") and path != "/" and any(r.pattern.match(path.rstrip("/")) for r in self.routes):
            url = request.url.replace(path=path.rstrip("/"))
            return RedirectResponse(str(url), status_code=307)
        return error_response(404, HTTP_CODES[404], f"no route {request.method} {path[:200]}")

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of every route in the schema, built on first use."""
        if self._openapi is None:
            self._openapi = openapi_document(self.info, [r for r in self.routes if r.include_in_schema])
        return self._openapi

    async def _openapi_route(self, request: Request) -> Response:
        return JSONResponse(self.openapi())

    async def _docs_route(self, request: Request) -> Response:
        return HTMLResponse(_SWAGGER_PAGE.replace("{title}", self.info["title"]))


def jsonable(value: Any) -> Any:
    """`value` with the few non-JSON types the routes hand back made plain (paths, enums, dataclasses, sets)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "detail": {"type": "object"}}}},
}


def openapi_document(info: dict[str, str], routes: list[Route]) -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    models = sorted({r.body for r in routes if r.body is not None}, key=lambda m: m.__name__)
    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    error = {"description": "An OpenAI-shaped error", "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Error"}}}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {"tags": list(route.tags), "summary": route.summary or route.handler.__name__,
                              "operationId": route.handler.__name__}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in route.params]
        for name, query in route.query.items():
            param = {"name": name, "in": "query", "required": False, "schema": query.schema()}
            if query.description:
                param["description"] = query.description
            params.append(param)
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": route.body_required, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}}}}
        ok: dict[str, Any] = {"description": route.response_description}
        if route.status_code != 204:
            schema = {"type": "object"} if route.media_type == "application/json" else {"type": "string"}
            ok["content"] = {route.media_type: {"schema": schema}}
        op["responses"] = {str(route.status_code): ok, "4XX": error}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    schemas = {**top.get("$defs", {}), "Error": _ERROR_SCHEMA}
    return {"openapi": "3.1.0", "info": info, "paths": paths, "components": {"schemas": schemas}}


# Swagger UI from its CDN, as FastAPI's /docs was: the page is for a browser with a network, the document
# (/openapi.json) is served by hal0 itself.
_SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title} - API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"})</script>
</body></html>
"""


__all__ = ["ManagementApp", "Query", "Route", "Router", "jsonable", "openapi_document"]

"""hal0's management routing (`hal0.api.routing`) on the real ASGI app, called in-process: matching, 404/405,
query and body validation in the OpenAI error shape, status codes, and the OpenAPI document built from the routes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from hal0.api.routing import ManagementApp, Query, Router, jsonable
from hal0.errors import SlotNotFound


class Thing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., max_length=10)
    size: int | None = Field(None, description="how big")


router = Router(prefix="/api", tags=["things"])
seen: list[dict[str, Any]] = []


@router.get("/things/{name}", summary="One thing", query={"n": Query(int, 3, ge=1, le=5), "deep": Query(bool, False),
                                                         "tag": Query(str, None, max_length=4)})
async def show_thing(request: Request, name: str, n: int, deep: bool, tag: str | None) -> dict[str, Any]:
    if name == "missing":
        raise SlotNotFound("no slot named 'missing'")
    seen.append({"name": name, "n": n, "deep": deep, "tag": tag, "state": request.app.state.owner})
    return {"name": name, "n": n}


@router.post("/things", status_code=201, body=Thing)
async def create_thing(request: Request, body: Thing) -> dict[str, Any]:
    return body.model_dump()


@router.post("/things/{name}/touch", body=Thing, body_required=False)
async def touch_thing(request: Request, name: str, body: Thing | None) -> dict[str, Any]:
    return {"body": body.model_dump() if body else None}


@router.delete("/things/{name}", status_code=204)
async def delete_thing(request: Request, name: str) -> Response:
    return Response(status_code=204)


@router.get("/boom")
async def boom(request: Request) -> dict[str, Any]:
    raise RuntimeError("a bug")


files = Router(include_in_schema=False)


@files.get("/files/{path:path}")
async def file(request: Request, path: str) -> dict[str, Any]:
    return {"path": path}


@pytest.fixture
async def http() -> Any:
    app = ManagementApp([router, files], SimpleNamespace(owner="me"), title="t", version="1")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hal0") as client:
        yield client


def error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err)
    return err


async def test_a_route_gets_its_path_and_query_parameters_and_the_shared_state(http: httpx.AsyncClient) -> None:
    seen.clear()
    assert (await http.get("/api/things/a?n=5&deep=yes&tag=x")).json() == {"name": "a", "n": 5}
    assert (await http.get("/api/things/b")).json() == {"name": "b", "n": 3}
    assert seen == [{"name": "a", "n": 5, "deep": True, "tag": "x", "state": "me"},
                    {"name": "b", "n": 3, "deep": False, "tag": None, "state": "me"}]
    assert (await http.get("/files/x/y.css")).json() == {"path": "x/y.css"}


@pytest.mark.parametrize(("query", "param", "words"), [
    ("n=0", "n", "greater than or equal to 1"), ("n=6", "n", "less than or equal to 5"),
    ("n=many", "n", "valid integer"), ("deep=maybe", "deep", "valid boolean"),
    ("tag=toolong", "tag", "at most 4 characters")])
async def test_a_bad_query_parameter_is_a_400_naming_it(http: httpx.AsyncClient, query: str, param: str,
                                                        words: str) -> None:
    err = error(await http.get(f"/api/things/a?{query}"), 400)
    assert err["code"] == "invalid_request" and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"] and err["message"].startswith(f"{param}: ")
    assert err["detail"]["errors"][0]["loc"] == ["query", param]


async def test_bodies_are_validated_by_their_model(http: httpx.AsyncClient) -> None:
    ok = await http.post("/api/things", json={"name": "a", "size": 2})
    assert ok.status_code == 201 and ok.json() == {"name": "a", "size": 2}
    for body, param in (({"name": "a", "shell": "sh"}, "shell"), ({"name": "a" * 11}, "name"),
                        ({"size": 1}, "name"), ({"name": "a", "size": "big"}, "size")):
        assert error(await http.post("/api/things", json=body), 400)["param"] == param, body
    assert "Field required" in error(await http.post("/api/things"), 400)["message"]
    assert "JSON" in error(await http.post("/api/things", content=b"{"), 400)["message"]
    assert error(await http.post("/api/things", json=[1]), 400)["code"] == "invalid_request"


async def test_an_optional_body_may_be_absent_or_null(http: httpx.AsyncClient) -> None:
    assert (await http.post("/api/things/a/touch")).json() == {"body": None}
    assert (await http.post("/api/things/a/touch", content=b"null")).json() == {"body": None}
    assert (await http.post("/api/things/a/touch", json={"name": "b"})).json() == {"body": {"name": "b",
                                                                                           "size": None}}
    assert error(await http.post("/api/things/a/touch", json={"name": "b", "nope": 1}), 400)["param"] == "nope"


async def test_unknown_paths_wrong_methods_and_errors_are_openai_shaped(http: httpx.AsyncClient) -> None:
    err = error(await http.get("/api/nothing"), 404)
    assert err["code"] == "not_found" and err["message"] == "no route GET /api/nothing"
    assert len(error(await http.get("/api/" + "x/" * 500), 404)["message"]) < 300
    wrong = await http.put("/api/things/a")
    assert error(wrong, 405)["code"] == "method_not_allowed" and wrong.headers["allow"] == "GET, DELETE"
    assert error(await http.get("/api/things/missing"), 404)["code"] == "slot_not_found"
    assert error(await http.get("/api/boom"), 500)["code"] == "internal_error"
    # A slash inside a path parameter is no match: `{name}` is one segment.
    assert error(await http.get("/api/things/a%2F..%2Fb"), 404)["code"] == "not_found"


async def test_head_answers_as_get_and_a_trailing_slash_redirects(http: httpx.AsyncClient) -> None:
    assert (await http.head("/api/things/a")).status_code == 200
    moved = await http.get("/api/things/a/?n=2")
    assert moved.status_code == 307 and moved.headers["location"] == "http://hal0/api/things/a?n=2"
    assert (await http.delete("/api/things/a")).status_code == 204


async def test_the_openapi_document_describes_every_route_in_the_schema(http: httpx.AsyncClient) -> None:
    doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"] == "t"
    assert set(doc["paths"]) == {"/api/things/{name}", "/api/things", "/api/things/{name}/touch", "/api/boom"}
    show = doc["paths"]["/api/things/{name}"]["get"]
    assert show["summary"] == "One thing" and show["tags"] == ["things"] and show["operationId"] == "show_thing"
    params = {p["name"]: p for p in show["parameters"]}
    assert params["name"] == {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    assert params["n"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 5, "default": 3}
    assert params["tag"]["schema"] == {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}
    create = doc["paths"]["/api/things"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Thing"}
    assert set(create["responses"]) == {"201", "4XX"}
    thing = doc["components"]["schemas"]["Thing"]
    assert thing["required"] == ["name"] and thing["additionalProperties"] is False
    assert "content" not in doc["paths"]["/api/things/{name}"]["delete"]["responses"]["204"]
    assert "swagger-ui" in (await http.get("/docs")).text


def test_jsonable_makes_the_routes_plain_values_json() -> None:
    import enum
    from dataclasses import dataclass
    from pathlib import Path

    class Color(enum.Enum):
        RED = "red"

    @dataclass
    class Point:
        x: int
        where: Path

    assert jsonable({"c": Color.RED, "p": Point(1, Path("a/b")), "s": {3}, 1: (None, 1.5)}) == {
        "c": "red", "p": {"x": 1, "where": "a/b"}, "s": [3], "1": [None, 1.5]}
    with pytest.raises(TypeError):
        jsonable(object())

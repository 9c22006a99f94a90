"""The /api models, catalog and loadout routes and the `hal0 model`/`hal0 loadout` CLI, over a real server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from hal0 import cli
from hal0.api.models import router
from hal0.api.routing import ManagementApp
from hal0.events import EventBus
from hal0.registry.generate import TINY, generate_gguf
from hal0.registry.pull import Registry
from hal0.server import Server, listen
from hal0.settings import Settings

from .conftest import FileServer, sha256


@dataclass
class SlotsStandIn:
    """The two slot-manager calls the registry routes make, backed by a plain dict."""

    models: dict[str, str | None] = field(default_factory=lambda: {"primary": None, "embed": None,
                                                                    "stt": None, "tts": None})

    def slots_using(self, ref: str) -> list[str]:
        return sorted(name for name, model in self.models.items() if model == ref)

    async def assign(self, slot: str, ref: str | None) -> None:
        self.models[slot] = ref


@dataclass
class Api:
    url: str
    bus: EventBus
    slots: SlotsStandIn
    registry: Registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def api(settings: Settings, registry: Registry) -> AsyncIterator[Api]:
    bus, slots = EventBus(), SlotsStandIn()
    app = ManagementApp([router], SimpleNamespace(settings=settings, registry=registry, events=bus, manager=slots))
    port = _free_port()
    server = Server(app, lifespan=False)
    task = asyncio.create_task(server.serve([listen("127.0.0.1", port)]))
    async with asyncio.timeout(10):
        await server.started.wait()
    yield Api(f"http://127.0.0.1:{port}", bus, slots, registry)
    server.exit()
    await task


async def run_cli(api: Api, *argv: str) -> tuple[int, str]:
    """Run `hal0 --url API ARGV...` in a thread (it is a blocking client) and capture its stdout."""
    import contextlib
    import io

    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return cli.main(["--url", api.url, *argv])

    code = await asyncio.to_thread(run)
    return code, out.getvalue()


async def test_pull_over_http_streams_progress_and_publishes_on_the_bus(
        api: Api, file_server: FileServer) -> None:
    data = file_server.add("m.gguf", 64 * 1024)
    async with httpx.AsyncClient(base_url=api.url) as client:
        started = (await client.post("/api/models/pull",
                                     json={"ref": "m", "source": f"{file_server.url}/files/m.gguf"})).json()
        assert started["status"] in ("pulling", "installed")
        events = []
        async with client.stream("GET", "/api/models/m/pull") as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        assert events[-1]["kind"] == "done"
        assert events[-1]["manifest"]["files"][0]["sha256"] == sha256(data)
        listed = (await client.get("/api/models")).json()
        assert [m["ref"] for m in listed["models"]] == ["m"]
    published = [e.data for e in api.bus.replay(0, ["pull"])]
    assert published[0]["kind"] == "start" and published[-1]["kind"] == "done"


async def test_errors_keep_their_codes_over_http(api: Api, file_server: FileServer) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        resp = await client.post("/api/models/pull", json={"ref": "../x", "source": "https://a/b.gguf"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_ref"
        resp = await client.get("/api/models/absent")
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
        resp = await client.post("/api/models/pull", json={"ref": "y", "source": f"{file_server.url}/x/none",
                                                           "wait": True})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "source_not_found"


async def test_cli_import_list_show_and_refused_rm(api: Api, tmp_path: Path) -> None:
    src = generate_gguf(tmp_path / "tiny.gguf", TINY)
    code, out = await run_cli(api, "model", "import", "tiny", str(src))
    assert code == 0 and "imported tiny" in out
    code, out = await run_cli(api, "model", "list")
    assert code == 0 and "tiny" in out and "llama" in out
    code, out = await run_cli(api, "--json", "model", "show", "tiny")
    assert json.loads(out)["metadata"]["context_length"] == TINY.context
    api.slots.models["primary"] = "tiny"
    code, out = await run_cli(api, "--json", "model", "rm", "tiny")
    assert code == 1 and json.loads(out)["error"]["code"] == "model_in_use"
    api.slots.models["primary"] = None
    code, out = await run_cli(api, "model", "rm", "tiny")
    assert code == 0 and "removed tiny" in out


async def test_cli_pull_follows_progress_to_the_end(api: Api, file_server: FileServer) -> None:
    data = file_server.add("p.gguf", 128 * 1024)
    code, out = await run_cli(api, "model", "pull", "p", "--source", f"{file_server.url}/files/p.gguf",
                              "--json")
    assert code == 0 and json.loads(out)["files"][0]["sha256"] == sha256(data)
    code, out = await run_cli(api, "model", "pull", "q", "--source", f"{file_server.url}/lie/p.gguf")
    assert code == 1 and not api.registry.exists("q")


async def test_cli_catalog_search_and_loadouts(api: Api) -> None:
    code, out = await run_cli(api, "model", "search", "qwen")
    assert code == 0 and "qwen2.5-0.5b-instruct-q4_k_m" in out
    code, out = await run_cli(api, "--json", "model", "search", "--type", "embed")
    assert {e["slot_type"] for e in json.loads(out)["catalog"]} == {"embed"}
    code, out = await run_cli(api, "loadout", "list")
    assert code == 0 and "cpu-laptop" in out and "unified-128gb" in out
    code, out = await run_cli(api, "--json", "loadout", "show", "cpu-laptop")
    plan = json.loads(out)
    assert plan["estimate_bytes"] > 0 and "qwen2.5-1.5b-instruct-q4_k_m" in plan["missing"]


async def test_cli_loadout_apply_pulls_and_assigns(api: Api, file_server: FileServer, tmp_path: Path) -> None:
    from .test_loadouts import serve_catalog_files

    for ref in ("qwen2.5-0.5b-instruct-q4_k_m", "bge-small-en-v1.5-q8_0"):
        serve_catalog_files(file_server, ref)
    voice = tmp_path / "kokoro-v1.0.int8.onnx"
    voice.write_bytes(b"onnx" * 100)
    api.registry.import_file("kokoro-82m-int8", voice)
    encoder = tmp_path / "encoder_model.ort"
    encoder.write_bytes(b"ort" * 100)
    api.registry.import_file("moonshine-tiny-en", encoder)
    code, out = await run_cli(api, "--json", "loadout", "apply", "cpu-tiny")
    assert code == 0, out
    report = json.loads(out)
    assert report["assigned"]["primary"] == "qwen2.5-0.5b-instruct-q4_k_m"
    assert "bge-small-en-v1.5-q8_0" in report["pulled"]
    assert api.slots.models == report["assigned"]

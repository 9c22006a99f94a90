"""Requests held by a cold load go to the backend while its readiness sentinel is in flight, and nothing of
their answers reaches the client until the probe passed.

The dispatcher runs in this process (served by hal0.server on a loopback port, called with the official `openai`
client) against a real llama-server; one provider wraps the llama.cpp provider to fail the readiness probe
after the backend really answered, which no real backend does on demand.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from hal0.client import HttpClient
from hal0.dispatch.decisions import DecisionLog
from hal0.dispatch.proxy import Dispatcher
from hal0.events import EventBus
from hal0.providers.base import Answering, ProbeResult
from hal0.providers.llamacpp import LlamaCppProvider
from hal0.registry.store import ModelStore
from hal0.server import Server, listen
from hal0.settings import load_settings
from hal0.slots.manager import SlotManager
from hal0.slots.state import SlotState
from hal0.supervisors.embedded import EmbeddedSupervisor
from tests.conftest import StoreModels, free_port, free_port_range

pytestmark = pytest.mark.llama

#: llama-server logs one of these for every request it computes (sentinels included).
TASK_LINE = re.compile(r"launch_slot_: .*processing task")


class SentinelRefused(LlamaCppProvider):
    """The real probe, with its verdict overturned: the backend answered, but the slot must not become ready."""

    def __init__(self, binary: str) -> None:
        super().__init__(binary)
        self.sentinels = 0

    async def probe(self, session: HttpClient, base_url: str, slot_type: str,
                    answering: Answering | None = None) -> ProbeResult:
        result = await super().probe(session, base_url, slot_type, answering)
        if not result.ok:
            return result
        self.sentinels += 1
        return ProbeResult(False, "sentinel", 500, "refused by the test")


@dataclass
class Edge:
    url: str
    manager: SlotManager
    decisions: DecisionLog
    log_dir: Path


@pytest.fixture
async def edge_factory(tmp_path: Path, model_files: dict[str, Path]) -> AsyncIterator[Any]:
    opened: list[tuple[Server, asyncio.Task[int], SlotManager, HttpClient]] = []

    async def make(provider: LlamaCppProvider, **env: str) -> Edge:
        lo, hi = free_port_range(4)
        settings = load_settings(env={"HAL0_HOME": str(tmp_path), "HAL0_PORT_MIN": str(lo),
                                      "HAL0_PORT_MAX": str(hi), **env})
        settings.ensure_dirs()
        store = ModelStore(settings.models_dir)
        store.import_file("tiny", model_files["tiny"], link=True)
        session = HttpClient()
        manager = SlotManager(settings, EventBus(), EmbeddedSupervisor(settings.slots_state_dir, settings.log_dir),
                              {"llama.cpp": provider}, session, StoreModels(store))
        await manager.start()
        await manager.assign("primary", "tiny")
        decisions = DecisionLog(settings.log_dir / "decisions.jsonl", manager.bus,
                                settings.decision_log_max_bytes)
        port = free_port()
        server = Server(Dispatcher(settings, manager, session, decisions), lifespan=False)
        task = asyncio.create_task(server.serve([listen("127.0.0.1", port)]))
        opened.append((server, task, manager, session))
        async with asyncio.timeout(10):
            await server.started.wait()
        return Edge(f"http://127.0.0.1:{port}/v1", manager, decisions, settings.log_dir)

    yield make
    for server, task, manager, session in opened:
        server.exit()
        await task
        await manager.get("primary").unload("test over")
        await manager.close()
        await session.close()


def tasks_computed(edge: Edge) -> int:
    log = (edge.log_dir / "slots" / "primary.log").read_text(errors="replace")
    return len(TASK_LINE.findall(log))


async def test_a_held_request_goes_early_and_its_answer_waits_for_the_probe(edge_factory: Any,
                                                                          llama_server: str) -> None:
    edge = await edge_factory(LlamaCppProvider(llama_server))
    client = openai.AsyncOpenAI(base_url=edge.url, api_key="unused", max_retries=0)
    sub = edge.manager.bus.subscription(["slot", "decision"])
    chat = await client.chat.completions.create(model="tiny", max_tokens=3,
                                                messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].message.content
    assert edge.manager.get("primary").state is SlotState.READY
    events = []
    while (event := await sub.get(0)) is not None:
        events.append(event)
    decision = next(e.data for e in events if e.topic == "decision")
    assert "cold-load" in decision["reason"] and "sent-early" in decision["reason"]
    # The slot became ready before the request counted as served: ready, then serving, then ready again.
    moves = [e.data["to"] for e in events if e.topic == "slot" and "to" in e.data]
    assert moves[-3:] == ["ready", "serving", "ready"]
    # Its answer, a completion of the loaded model, stood in for the sentinel: nothing else was computed.
    slot = edge.manager.get("primary")
    assert slot.last_probe is not None and slot.last_probe.message == "a held request was answered"
    assert tasks_computed(edge) == 1


async def test_a_held_request_that_decodes_nothing_leaves_readiness_to_the_sentinel(edge_factory: Any,
                                                                                   llama_server: str) -> None:
    edge = await edge_factory(LlamaCppProvider(llama_server))
    async with httpx.AsyncClient(timeout=60) as http:
        resp = await http.post(f"{edge.url}/messages/count_tokens",
                               json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["input_tokens"] > 0
    slot = edge.manager.get("primary")
    assert slot.state is SlotState.READY
    # Counting tokens proves no decode: the sentinel ran, and was the only task llama-server computed.
    assert slot.last_probe is not None and slot.last_probe.message == "ok"
    assert tasks_computed(edge) == 1


async def test_a_failed_probe_drops_the_early_answer_and_explains_the_failure(edge_factory: Any,
                                                                             llama_server: str) -> None:
    provider = SentinelRefused(llama_server)
    edge = await edge_factory(provider, HAL0_WARMUP_BUDGET_S="1")
    client = openai.AsyncOpenAI(base_url=edge.url, api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="tiny", max_tokens=3,
                                             messages=[{"role": "user", "content": "hello"}])
    err = caught.value
    body = err.body if isinstance(err.body, dict) else {}
    assert err.status_code >= 500
    assert body.get("code") == "warmup_timeout", body
    assert "refused by the test" in body.get("message", "")
    assert "choices" not in str(body)
    slot = edge.manager.get("primary")
    assert slot.state is SlotState.ERROR
    assert slot.record.error is not None and slot.record.error.code == "warmup_timeout"
    # llama-server computed the held request (it went early and stood in for the first probe's sentinel), and
    # the sentinel of every probe after it: the answer was dropped.
    assert provider.sentinels >= 1
    assert tasks_computed(edge) == provider.sentinels


async def test_a_held_stream_stands_in_for_the_sentinel(edge_factory: Any, llama_server: str) -> None:
    edge = await edge_factory(LlamaCppProvider(llama_server))
    client = openai.AsyncOpenAI(base_url=edge.url, api_key="unused", max_retries=0)
    # Greedy and past any end-of-text: the tiny model's sampled tokens can all be empty pieces.
    stream = await client.chat.completions.create(model="tiny", max_tokens=8, stream=True, temperature=0,
                                                  extra_body={"ignore_eos": True},
                                                  messages=[{"role": "user", "content": "hello"}])
    chunks = [chunk async for chunk in stream]
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    slot = edge.manager.get("primary")
    assert slot.state is SlotState.READY
    assert slot.last_probe is not None and slot.last_probe.message == "a held request was answered"
    # The stream was the only completion llama-server computed: no sentinel competed with it.
    assert tasks_computed(edge) == 1


async def test_a_held_stream_the_backend_refuses_leaves_readiness_to_the_sentinel(edge_factory: Any,
                                                                                  llama_server: str) -> None:
    edge = await edge_factory(LlamaCppProvider(llama_server))
    client = openai.AsyncOpenAI(base_url=edge.url, api_key="unused", max_retries=0)
    # A prompt over the context is refused with a 400: a real answer, but no proof that the model completes.
    with pytest.raises(openai.BadRequestError, match="context"):
        await client.chat.completions.create(model="tiny", max_tokens=3, stream=True,
                                             messages=[{"role": "user", "content": "hello " * 5000}])
    slot = edge.manager.get("primary")
    assert slot.state is SlotState.READY
    assert slot.last_probe is not None and slot.last_probe.message == "ok"
    assert tasks_computed(edge) == 2  # llama-server launches the refused request before it measures it

"""A stateful property test: random load/unload/request/kill/assign/restart sequences against a real slot.

After every step: each published transition is in the legal table, state.json equals the in-memory record,
`seq` only grows, and the slot never has more than one backend process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hal0.errors import Hal0Error
from hal0.events import EventBus
from hal0.providers.llamacpp import LlamaCppProvider
from hal0.registry.generate import TINY, generate_gguf
from hal0.registry.store import ModelStore
from hal0.settings import load_settings
from hal0.slots.manager import SlotManager
from hal0.slots.state import LOADED, SlotState, is_legal
from hal0.supervisors.embedded import EmbeddedSupervisor
from tests.conftest import StoreModels, find_llama_server, free_port_range

REF = "tiny"


def backend_pids(model_dir: Path) -> list[int]:
    """Every live process whose command line loads a model from `model_dir`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] == "Z":
            continue
        if any(arg.startswith(str(model_dir).encode()) for arg in cmdline):
            pids.append(int(entry.name))
    return pids


class LifecycleMachine(RuleBasedStateMachine):
    binary: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        home = Path(self.tmp.name)
        lo, hi = free_port_range(4)
        self.settings = load_settings(env={"HAL0_HOME": str(home), "HAL0_PORT_MIN": str(lo),
                                           "HAL0_PORT_MAX": str(hi), "HAL0_STOP_TIMEOUT_S": "5"})
        self.settings.ensure_dirs()
        store = ModelStore(self.settings.models_dir)
        store.import_file(REF, generate_gguf(home / "tiny.gguf", TINY))
        self.model_dir = self.settings.models_dir
        self.loop = asyncio.new_event_loop()
        self.bus = EventBus()
        self.events: list[dict[str, Any]] = []
        self.last_seq = 0
        self.run(self._setup(store))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    async def _setup(self, store: ModelStore) -> None:
        self.session = aiohttp.ClientSession()
        self.manager = SlotManager(self.settings, self.bus, EmbeddedSupervisor(
            self.settings.slots_state_dir, self.settings.log_dir), {"llama.cpp": LlamaCppProvider(self.binary)},
            self.session, StoreModels(store))
        await self.manager.start()
        self.sub = self.bus.subscription(["slot"])
        await self.manager.assign("primary", REF)

    @property
    def slot(self) -> Any:
        return self.manager.get("primary")

    async def _drain(self) -> None:
        while (event := await self.sub.get(0)) is not None:
            self.events.append(event.data)

    # -- operations ------------------------------------------------------------------------------------------
    @rule()
    def load(self) -> None:
        async def go() -> None:
            try:
                await self.slot.ensure_loaded(30)
            except Hal0Error:
                pass  # a refused or failed load is a legal outcome; the invariants judge it

        self.run(go())

    @rule()
    def unload(self) -> None:
        self.run(self.slot.unload())

    @rule()
    def restart(self) -> None:
        async def go() -> None:
            try:
                await self.slot.restart()
                await self.slot.ensure_loaded(30)
            except Hal0Error:
                pass

        self.run(go())

    @precondition(lambda self: self.slot.state in LOADED)
    @rule(n=st.integers(1, 3))
    def requests(self, n: int) -> None:
        async def one() -> None:
            async with self.slot.serving():
                url = f"{self.slot.base_url}/v1/completions"
                async with self.session.post(url, json={"prompt": "a", "max_tokens": 2}) as resp:
                    await resp.read()

        async def go() -> None:
            await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)

        self.run(go())

    @precondition(lambda self: self.slot.record.pid is not None and self.slot.state in LOADED)
    @rule()
    def kill_backend(self) -> None:
        pid = self.slot.record.pid
        os.kill(pid, signal.SIGKILL)

        async def noticed() -> None:
            while self.slot.state is not SlotState.ERROR:
                await asyncio.sleep(0.02)

        self.run(noticed())

    @rule(assign=st.booleans())
    def reassign(self, assign: bool) -> None:
        async def go() -> None:
            try:
                await self.manager.assign("primary", REF if assign else None)
            except Hal0Error:
                pass

        self.run(go())

    # -- what must always hold -----------------------------------------------------------------------------------
    @invariant()
    def transitions_are_legal_and_persisted(self) -> None:
        self.run(self._drain())
        for event in self.events:
            if "to" in event and event["from"] != event["to"]:
                assert is_legal(SlotState(event["from"]), SlotState(event["to"])), event
        self.events.clear()
        self.manager.store.flush()
        on_disk = json.loads(self.manager.store.path("primary").read_text())
        rec = self.slot.record
        assert on_disk["state"] == rec.state.value
        assert on_disk["seq"] == rec.seq
        assert rec.seq >= self.last_seq
        self.last_seq = rec.seq

    @invariant()
    def at_most_one_backend(self) -> None:
        pids = backend_pids(self.model_dir)
        assert len(pids) <= 1, pids
        if self.slot.state in LOADED:
            assert pids == [self.slot.record.pid]

    def teardown(self) -> None:
        async def close() -> None:
            await self.slot.unload()
            await self.manager.close()
            await self.session.close()

        try:
            self.run(close())
        finally:
            self.loop.close()
            self.tmp.cleanup()


@pytest.mark.slow
@pytest.mark.llama
def test_random_lifecycle_operations_keep_every_invariant(llama_server: str) -> None:
    LifecycleMachine.binary = llama_server or (find_llama_server() or "")
    test = LifecycleMachine.TestCase
    test.settings = settings(max_examples=12, stateful_step_count=8, deadline=None,
                             suppress_health_check=list(HealthCheck))
    test().runTest()

"""A stateful property test: random load/unload/request/kill/assign/restart sequences against a real slot, also
while it pulls its model from a slow loopback server (load, unload, model change, model removal, a second pull).

After every step: each published transition is in the legal table, state.json equals the in-memory record,
`seq` only grows (every record change is one event), the slot never has more than one backend process, a pulling
slot has a pull in flight, and an installed model is the whole file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hal0.api.app import RegistryModels
from hal0.client import HttpClient
from hal0.errors import Hal0Error
from hal0.events import EventBus
from hal0.providers.llamacpp import LlamaCppProvider
from hal0.registry.generate import TINY, generate_gguf
from hal0.registry.pull import Registry
from hal0.settings import load_settings
from hal0.slots.manager import SlotManager
from hal0.slots.state import LOADED, SlotState, is_legal
from hal0.supervisors.embedded import EmbeddedSupervisor
from tests.conftest import SlowHub, find_llama_server, free_port_range

REF = "tiny"
#: A catalog ref, pulled from the slow hub: its `hf:` source resolves against the hub's address.
PULL_REF = "qwen2.5-0.5b-instruct-q4_k_m"
#: Slow enough that a few operations land while the slot pulls (the tiny model is ~0.65 MB: ~10 s).
SLOW_BPS = 65_000
FAST_BPS = 50_000_000


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
    hub: SlowHub
    #: Which operations landed in which state, over all examples (printed, and checked to cover pulling).
    seen: Counter[str] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        home = Path(self.tmp.name)
        lo, hi = free_port_range(4)
        self.settings = load_settings(env={"HAL0_HOME": str(home), "HAL0_PORT_MIN": str(lo),
                                           "HAL0_PORT_MAX": str(hi), "HAL0_STOP_TIMEOUT_S": "5"})
        self.settings.ensure_dirs()
        self.hub.rate = SLOW_BPS
        self.registry = Registry(self.settings, hf_endpoint=self.hub.url, retries=0, progress_interval=0.05)
        self.registry.store.import_file(REF, generate_gguf(home / "tiny.gguf", TINY))
        self.model_dir = self.settings.models_dir
        self.loop = asyncio.new_event_loop()
        self.bus = EventBus()
        self.events: list[dict[str, Any]] = []
        self.last_seq = 0
        self.last_event_seq = 0
        self.run(self._setup())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    async def _setup(self) -> None:
        self.session = HttpClient()
        self.manager = SlotManager(self.settings, self.bus, EmbeddedSupervisor(
            self.settings.slots_state_dir, self.settings.log_dir), {"llama.cpp": LlamaCppProvider(self.binary)},
            self.session, RegistryModels(self.settings, self.bus, self.registry))
        await self.manager.start()
        self.sub = self.bus.subscription(["slot"])

    @property
    def slot(self) -> Any:
        return self.manager.get("primary")

    async def _drain(self) -> None:
        while (event := await self.sub.get(0)) is not None:
            self.events.append(event.data)

    def _note(self, operation: str) -> None:
        self.seen[f"{operation} in {self.slot.state.value}"] += 1

    @initialize(ref=st.sampled_from([REF, PULL_REF]))
    def assign_first(self, ref: str) -> None:
        """Half the runs start with the model that must be pulled, so pulling is often the state ops meet."""
        self.run(self.manager.assign("primary", ref))

    # -- operations ------------------------------------------------------------------------------------------
    @rule()
    def load(self) -> None:
        self._note("load")
        self.hub.rate = FAST_BPS  # a pull under way (or one this load starts) finishes soon

        async def go() -> None:
            try:
                await self.slot.ensure_loaded(30)
            except Hal0Error:
                pass  # a refused or failed load is a legal outcome; the invariants judge it

        self.run(go())

    @rule()
    def unload(self) -> None:
        self._note("unload")
        self.run(self.slot.unload())

    @rule()
    def restart(self) -> None:
        self._note("restart")
        self.hub.rate = FAST_BPS

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
        self._note("requests")
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
        self._note("kill_backend")
        pid = self.slot.record.pid
        os.kill(pid, signal.SIGKILL)

        async def noticed() -> None:
            while self.slot.state is not SlotState.ERROR:
                await asyncio.sleep(0.02)

        self.run(noticed())

    @rule(ref=st.sampled_from([REF, PULL_REF, None]))
    def reassign(self, ref: str | None) -> None:
        self._note("reassign")
        async def go() -> None:
            try:
                await self.manager.assign("primary", ref)
            except Hal0Error:
                pass

        self.run(go())

    @precondition(lambda self: self.slot.state in (SlotState.OFFLINE, SlotState.ERROR))
    @rule(then=st.sampled_from(["load", "unload", "restart", "reassign", "second_pull", "remove_pulled_model"]))
    def load_while_the_hub_is_slow(self, then: str) -> None:
        """Give the cold slot the model it must pull (removing an installed copy), start its load, and once
        bytes flow do `then` at once, so every such step has an operation land mid-pull (which later steps,
        drawn freely, may or may not do)."""
        self._note("load_while_the_hub_is_slow")
        self.hub.rate = SLOW_BPS
        served = self.hub.served

        async def go() -> None:
            try:
                if self.registry.exists(PULL_REF):
                    await self.manager.assign("primary", None)
                    self.registry.remove(PULL_REF, self.manager.slots_using)
                await self.manager.assign("primary", PULL_REF)
                load = self.slot.start_load()
            except Hal0Error:
                return  # e.g. the model is still being pulled by a second pull: refused, a legal outcome
            while not load.done() and not (self.slot.state is SlotState.PULLING and self.hub.served > served):
                await asyncio.sleep(0.01)

        self.run(go())
        if self.slot.state is SlotState.PULLING:
            if then == "reassign":
                self.reassign(REF)
            else:
                getattr(self, then)()

    @precondition(lambda self: self.slot.state is SlotState.PULLING)
    @rule()
    def second_pull(self) -> None:
        """A pull of the same ref from elsewhere (the API's `hal0 model pull`) joins the slot's download."""
        self._note("second_pull")

        async def go() -> None:
            task = self.registry.start_pull(PULL_REF)
            assert PULL_REF in self.registry.pulling() and not task.done()

        self.run(go())

    @rule()
    def remove_pulled_model(self) -> None:
        self._note("remove_pulled_model")
        try:
            self.registry.remove(PULL_REF, self.manager.slots_using)
        except Hal0Error:
            pass  # refused while it is pulled or assigned, or not installed: legal outcomes

    # -- what must always hold -----------------------------------------------------------------------------------
    @invariant()
    def transitions_are_legal_and_persisted(self) -> None:
        self.run(self._drain())
        for event in self.events:
            if "to" in event and event["from"] != event["to"]:
                assert is_legal(SlotState(event["from"]), SlotState(event["to"])), event
            if "seq" in event and event.get("slot") == "primary":
                # One event per record change: transitions and field updates alike, in order, none twice.
                assert event["seq"] > self.last_event_seq, (event, self.last_event_seq)
                self.last_event_seq = event["seq"]
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

    @invariant()
    def a_pulling_slot_has_its_pull_and_models_are_whole(self) -> None:
        # A pull that just ended reaches its slot a little later (admission reads the inventory in a thread
        # before the move to starting): wait for that, within a bound far beyond any load of this machine.
        deadline = time.monotonic() + 10
        while (self.slot.state is SlotState.PULLING and self.slot.record.model not in self.registry.pulling()
               and time.monotonic() < deadline):
            self.run(asyncio.sleep(0.005))
        if self.slot.state is SlotState.PULLING:
            assert self.slot.record.model in self.registry.pulling(), self.slot.record
        if self.registry.exists(PULL_REF):
            assert self.registry.model_path(PULL_REF).read_bytes() == self.hub.data
        model_dir = self.registry.store.model_dir(PULL_REF)
        partials = [p.name for p in model_dir.iterdir() if ".partial" in p.name] if model_dir.is_dir() else []
        assert len(partials) <= 1, partials

    def teardown(self) -> None:
        async def close() -> None:
            await self.slot.unload()
            await self.manager.close()
            await self.registry.aclose()
            await self.session.close()

        try:
            self.run(close())
        finally:
            self.loop.close()
            self.tmp.cleanup()


@pytest.mark.slow
@pytest.mark.llama
def test_random_lifecycle_operations_keep_every_invariant(llama_server: str, slow_hub: SlowHub) -> None:
    LifecycleMachine.binary = llama_server or (find_llama_server() or "")
    LifecycleMachine.hub = slow_hub
    test = LifecycleMachine.TestCase
    test.settings = settings(max_examples=16, stateful_step_count=10, deadline=None,
                             suppress_health_check=list(HealthCheck))
    LifecycleMachine.seen.clear()
    test().runTest()
    print("\n" + ", ".join(f"{case}: {n}" for case, n in sorted(LifecycleMachine.seen.items())))
    assert any(case.endswith(" in pulling") and not case.startswith("load_while") for case in LifecycleMachine.seen)

"""A loaded slot's watch: its backend's death is seen through a pidfd the moment it happens, so the supervisor
is asked about a watched process only now and then (under systemd each ask is a `systemctl show` process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hal0.client import HttpClient
from hal0.events import EventBus
from hal0.providers.llamacpp import LlamaCppProvider
from hal0.registry.store import ModelStore
from hal0.settings import load_settings
from hal0.slots import slot as slot_module
from hal0.slots.manager import SlotManager
from hal0.slots.state import SlotState
from hal0.supervisors.base import Handle, ProcessStatus
from hal0.supervisors.embedded import EmbeddedSupervisor
from tests.conftest import StoreModels, free_port_range


class CountedSupervisor(EmbeddedSupervisor):
    """The embedded supervisor, counting the status checks the slot makes, with the slot's state at each."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.asked = 0
        self.states: list[SlotState] = []
        self.manager: SlotManager | None = None

    async def status(self, slot: str, handle: Handle) -> ProcessStatus:
        self.asked += 1
        if self.manager is not None:
            self.states.append(self.manager.get(slot).state)
        return await super().status(slot, handle)


@contextlib.asynccontextmanager
async def counted(tmp_path: Path, models: dict[str, Path], llama_server: str) -> AsyncIterator[
        tuple[SlotManager, CountedSupervisor]]:
    lo, hi = free_port_range(4)
    settings = load_settings(env={"HAL0_HOME": str(tmp_path), "HAL0_PORT_MIN": str(lo), "HAL0_PORT_MAX": str(hi)})
    settings.ensure_dirs()
    store = ModelStore(settings.models_dir)
    for ref, path in models.items():
        store.import_file(ref, path, link=True)
    supervisor = CountedSupervisor(settings.slots_state_dir, settings.log_dir)
    client = HttpClient()
    manager = SlotManager(settings, EventBus(), supervisor, {"llama.cpp": LlamaCppProvider(llama_server)}, client,
                          StoreModels(store))
    supervisor.manager = manager
    await manager.start()
    try:
        yield manager, supervisor
    finally:
        await manager.close()
        await client.close()


async def test_a_warming_backend_that_a_pidfd_watches_is_not_asked_about_before_each_probe(
        tmp_path: Path, large_model: Path, llama_server: str) -> None:
    async with counted(tmp_path, {"big": large_model}, llama_server) as (manager, supervisor):
        await manager.assign("primary", "big")
        slot = manager.get("primary")
        assert await slot.ensure_loaded(120) and slot.state is SlotState.READY
        loading = [s for s in supervisor.states if s in (SlotState.STARTING, SlotState.WARMING)]
        assert loading == [], f"asked {len(loading)} times while it loaded"
        await slot.unload("test over")


async def test_a_backend_killed_while_it_warms_up_is_found_through_its_pidfd(
        tmp_path: Path, large_model: Path, llama_server: str) -> None:
    async with counted(tmp_path, {"big": large_model}, llama_server) as (manager, supervisor):
        await manager.assign("primary", "big")
        slot = manager.get("primary")
        load = slot.start_load()
        async with asyncio.timeout(60):
            while slot.state is not SlotState.WARMING or slot.record.pid is None:
                await asyncio.sleep(0.005)
        os.kill(slot.record.pid, signal.SIGKILL)
        await asyncio.wait_for(load, 30)
        assert slot.state is SlotState.ERROR and slot.record.error is not None
        assert slot.record.error.code == "backend_exited" and "SIGKILL" in slot.record.error.message, \
            slot.record.error
        assert SlotState.WARMING in supervisor.states, "the pidfd's news was checked with the supervisor"


async def test_a_watched_backend_is_asked_about_rarely_and_its_death_is_seen_at_once(
        tmp_path: Path, model_files: dict[str, Path], llama_server: str) -> None:
    async with counted(tmp_path, {"tiny": model_files["tiny"]}, llama_server) as (manager, supervisor):
        await manager.assign("primary", "tiny")
        slot = manager.get("primary")
        assert await slot.ensure_loaded(60) and slot.state is SlotState.READY
        pid = slot.record.pid
        assert pid is not None
        await asyncio.sleep(0.5)  # the watch's first check, right after the load
        asked = supervisor.asked
        # Two seconds of a quiet, watched backend: eight checks at the watch's tick, none now.
        await asyncio.sleep(2 * slot_module.WATCH_INTERVAL_S * 4)
        assert supervisor.asked == asked, supervisor.asked - asked
        assert slot_module.STATUS_WITH_PIDFD_S > 2 * slot_module.WATCH_INTERVAL_S * 4
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(10):  # the pidfd wakes the watch
            while slot.state is not SlotState.ERROR:
                await asyncio.sleep(0.01)
        assert supervisor.asked > asked
        assert slot.record.error is not None and slot.record.error.code == "backend_exited", slot.record.error

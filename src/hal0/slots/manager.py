"""All slots of this hal0: configs, ports, adoption at start-up, create/delete/assign.

The manager owns the set of slots; each slot owns its own lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from typing import Any

import aiohttp

from hal0.errors import BackendError, Conflict, InvalidRequest, ModelNotFound, PortUnavailable, SlotNotFound
from hal0.events import EventBus
from hal0.fsio import WriteFailures
from hal0.kinds import BUILTIN_SLOTS
from hal0.providers.base import Provider
from hal0.settings import Settings
from hal0.slots.config import ConfigStore, SlotConfig, validate_ref
from hal0.slots.slot import ModelSource, Slot, SlotContext
from hal0.slots.state import ACTIVE, BUSY, LOADED, SlotState
from hal0.slots.store import CorruptState, SlotError, SlotRecord, StateStore
from hal0.supervisors.base import Supervisor


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class SlotManager:
    def __init__(self, settings: Settings, bus: EventBus, supervisor: Supervisor,
                 providers: dict[str, Provider], session: aiohttp.ClientSession, models: ModelSource,
                 failures: WriteFailures | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.configs = ConfigStore(settings.slots_config_dir)
        self.store = StateStore(settings.slots_state_dir, failures)
        self.ctx = SlotContext(settings=settings, store=self.store, bus=bus, supervisor=supervisor,
                               providers=providers, session=session, models=models,
                               allocate_port=self._allocate_port, make_room=self._make_room)
        self.slots: dict[str, Slot] = {}
        self._mutate = asyncio.Lock()
        self._room = asyncio.Lock()

    @property
    def supervisor(self) -> Supervisor:
        return self.ctx.supervisor

    # -- start-up ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Read every slot's config and state.json, and adopt what an earlier API process left running."""
        for name, config in self.configs.load_all().items():
            self.slots[name] = Slot(config, self._read_record(name), self.ctx)
        await asyncio.gather(*(slot.adopt() for slot in self.slots.values()))

    def _read_record(self, name: str) -> SlotRecord:
        try:
            record = self.store.read(name)
        except CorruptState as exc:
            record = SlotRecord(name=name, reason=str(exc))
            record.error = SlotError("state_corrupt", str(exc), {"quarantined_to": str(exc.quarantined_to)})
            self.store.write(record)
            return record
        if record is None:
            record = SlotRecord(name=name)
            self.store.write(record)
        return record

    async def close(self) -> None:
        await asyncio.gather(*(slot.close() for slot in self.slots.values()))
        await asyncio.to_thread(self.store.close)

    # -- lookup --------------------------------------------------------------------------------------------
    def get(self, name: str) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise SlotNotFound(f"no slot named {name[:80]!r}; slots: {', '.join(sorted(self.slots))}",
                               detail={"available": sorted(self.slots)})
        return slot

    def ordered(self) -> list[Slot]:
        return [self.slots[name] for name in sorted(self.slots, key=_slot_order)]

    def slots_using(self, ref: str) -> list[str]:
        """Slots configured with `ref`, or still running or loading it (a slot whose config moved on)."""
        return sorted(s.name for s in self.slots.values()
                      if s.config.model == ref or (s.record.model == ref and s.state in BUSY))

    # -- changes -------------------------------------------------------------------------------------------
    async def create(self, data: dict[str, Any]) -> Slot:
        config = SlotConfig.from_mapping(data)
        async with self._mutate:
            if config.name in self.slots:
                raise Conflict(f"slot {config.name} already exists", code="slot_exists")
            self._check_port_unique(config)
            self.configs.save(config)
            slot = Slot(config, self._read_record(config.name), self.ctx)
            self.slots[config.name] = slot
        self.bus.publish("slot", {"slot": config.name, "event": "created", "record": slot.snapshot()})
        return slot

    async def delete(self, name: str) -> None:
        slot = self.get(name)
        if slot.config.builtin:
            raise Conflict(f"slot {name} is built in and cannot be deleted", code="builtin_slot")
        await slot.unload("slot deleted")
        async with self._mutate:
            await slot.close()
            self.configs.delete(name)
            with contextlib.suppress(FileNotFoundError):
                self.store.path(name).unlink()
            self.slots.pop(name, None)
        self.bus.publish("slot", {"slot": name, "event": "deleted"})

    async def update(self, name: str, changes: dict[str, Any]) -> Slot:
        """Change a slot's config; a loaded slot is restarted so the change takes effect."""
        slot = self.get(name)
        forbidden = {"name", "builtin"} & set(changes)
        if forbidden:
            raise InvalidRequest(f"cannot change {', '.join(sorted(forbidden))}", code="invalid_field")
        if slot.config.builtin and "type" in changes and changes["type"] != slot.config.type:
            raise Conflict(f"built-in slot {name} keeps its type {slot.config.type}", code="builtin_slot")
        merged = slot.config.to_dict() | changes
        merged.pop("builtin", None)
        config = SlotConfig.from_mapping(merged, builtin=slot.config.builtin)
        async with self._mutate:
            self._check_port_unique(config)
            self.configs.save(config)
        # A load under way counts as loaded: a pull of the old model is cancelled, not left to end ready.
        was_loaded = slot.state in BUSY
        if was_loaded:
            await slot.unload("config changed")
        slot.config = config
        if was_loaded and config.model:
            slot.start_load()
        self.bus.publish("slot", {"slot": name, "event": "updated", "record": slot.snapshot()})
        return slot

    async def assign(self, name: str, ref: str | None) -> Slot:
        if ref is not None:
            validate_ref(ref)
            if self.ctx.models.path(ref) is None and not self.ctx.models.pullable(ref):
                raise ModelNotFound(
                    f"model {ref!r} is not installed and not in the catalog; pull or import it first",
                    detail={"ref": ref})
        return await self.update(name, {"model": ref})

    def _check_port_unique(self, config: SlotConfig) -> None:
        if not config.port:
            return
        for other in self.slots.values():
            if other.name != config.name and other.config.port == config.port:
                raise PortUnavailable(f"port {config.port} is already configured for slot {other.name}")

    # -- room ----------------------------------------------------------------------------------------------
    async def _make_room(self, slot: Slot) -> None:
        """Keep at most `max_loaded_slots` backends: unload the least recently used idle ones first."""
        cap = self.settings.max_loaded_slots
        if cap <= 0:
            return
        async with self._room:
            while True:
                others = [s for s in self.slots.values() if s is not slot and s.state in ACTIVE]
                if len(others) < cap:
                    return
                evictable = [s for s in others if s.state in LOADED and s.in_flight == 0]
                if not evictable:
                    raise BackendError(
                        f"slot {slot.name} cannot load: {len(others)} slot(s) are loaded or loading and busy, "
                        f"and max_loaded_slots is {cap}", code="no_room",
                        detail={"busy": sorted(s.name for s in others), "max_loaded_slots": cap},
                    )
                victim = min(evictable, key=lambda s: s.last_activity)
                await victim.unload(f"unloaded to make room for slot {slot.name} (max_loaded_slots={cap})")

    # -- ports -----------------------------------------------------------------------------------------------
    def _allocate_port(self, slot: Slot) -> int:
        """A port for `slot`'s backend: its configured one, else its last one, else the lowest free one."""
        taken = {s.record.port for s in self.slots.values()
                 if s is not slot and s.record.port and s.state in ACTIVE}
        taken |= {s.config.port for s in self.slots.values() if s is not slot and s.config.port}
        if slot.config.port:
            port = slot.config.port
            if port in taken or not port_is_free(port):
                raise PortUnavailable(
                    f"port {port} of slot {slot.name} is in use by another process",
                    code="port_in_use", detail={"port": port},
                )
            return port
        lo, hi = self.settings.port_min, self.settings.port_max
        candidates = list(range(lo, hi + 1))
        if slot.record.port in candidates:
            candidates.remove(slot.record.port)
            candidates.insert(0, slot.record.port)
        foreign = []
        for port in candidates:
            if port in taken:
                continue
            if port_is_free(port):
                return port
            foreign.append(port)
        raise PortUnavailable(
            f"no free port for slot {slot.name} in {lo}-{hi}",
            code="no_free_port", detail={"range": [lo, hi], "in_use_by_other_processes": foreign},
        )


def _slot_order(name: str) -> tuple[int, str]:
    builtin = list(BUILTIN_SLOTS)
    return (builtin.index(name), "") if name in builtin else (len(builtin), name)


__all__ = ["SlotManager", "SlotState", "port_is_free"]

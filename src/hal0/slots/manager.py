"""All slots of this hal0: configs, ports, adoption at start-up, create/delete/assign.

The manager owns the set of slots; each slot owns its own lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import TYPE_CHECKING, Any

from hal0.client import HttpClient
from hal0.datatypes import datatype
from hal0.errors import (
    BackendError,
    Conflict,
    Hal0Error,
    InsufficientMemory,
    InvalidRequest,
    ModelNotFound,
    PortUnavailable,
    SlotNotFound,
)
from hal0.events import EventBus
from hal0.fsio import WriteFailures
from hal0.hardware.budget import (
    HOST,
    BudgetSettings,
    DeviceBudget,
    Holding,
    choose_gpu,
    device_budgets,
    gpu_device,
    plan,
)
from hal0.hardware.placement import ALL_LAYERS, Placement, requested_gpus
from hal0.kinds import BUILTIN_SLOTS
from hal0.providers.base import Provider
from hal0.settings import Settings
from hal0.slots.config import ConfigStore, SlotConfig, validate_ref
from hal0.slots.memory import HOLDING, SlotMemory, split
from hal0.slots.slot import ModelSource, Slot, SlotContext
from hal0.slots.state import ACTIVE, BUSY, LOADED, SlotState
from hal0.slots.store import CorruptState, SlotError, SlotRecord, StateStore
from hal0.supervisors.base import Supervisor

if TYPE_CHECKING:
    from hal0.hardware.inventory import Inventory

log = logging.getLogger("hal0.slots")

MIB = 1 << 20
#: How often the pressure watcher reads free memory (MemAvailable, and each GPU through the inventory).
PRESSURE_INTERVAL_S = 1.0
#: How often an admission waiting for serving slots to finish looks again.
ADMISSION_POLL_S = 0.05


@datatype(frozen=True, slots=True)
class Eviction:
    """A slot unloaded to make room: for which slot (or for memory pressure), and why. `reason` is one of a few
    words (memory, pressure, group, max_loaded_slots); `message` says it in full, `detail` gives the bytes."""

    slot: str
    model: str | None
    for_slot: str | None
    reason: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


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
                 providers: Mapping[str, Provider], client: HttpClient, models: ModelSource,
                 failures: WriteFailures | None = None, evicted: Callable[[Eviction], None] | None = None,
                 read_inventory: Callable[[float], Inventory] | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.configs = ConfigStore(settings.slots_config_dir)
        self.store = StateStore(settings.slots_state_dir, failures)
        self.memory = SlotMemory(models, supervisor.log_path)
        self.ctx = SlotContext(settings=settings, store=self.store, bus=bus, supervisor=supervisor,
                               providers=providers, client=client, models=models,
                               allocate_port=self._allocate_port, make_room=self._make_room, memory=self.memory)
        self.slots: dict[str, Slot] = {}
        self.budget_settings = BudgetSettings.from_settings(settings)
        self._evicted = evicted
        #: None: the machine's (hal0.hardware.inventory, imported by the first reading, not by every start).
        self._inventory = read_inventory
        self._mutate = asyncio.Lock()
        self._room = asyncio.Lock()
        self._pressure_task: asyncio.Task[None] | None = None

    @property
    def supervisor(self) -> Supervisor:
        return self.ctx.supervisor

    # -- start-up ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Read every slot's config and state.json, and adopt what an earlier API process left running. A loaded
        backend's probe goes on while the API serves (see `Slot.adopt`)."""
        for name, config in self.configs.load_all().items():
            self.slots[name] = Slot(config, self._read_record(name), self.ctx)
        await asyncio.gather(*(slot.adopt() for slot in self.slots.values()))
        if self.settings.memory_pressure_floor_mb > 0:
            self._pressure_task = asyncio.create_task(self._watch_pressure(), name="memory-pressure")

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
        if self._pressure_task is not None:
            self._pressure_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pressure_task
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
    async def _make_room(self, slot: Slot) -> Placement:
        """Admit a load before anything is spawned: unload the other slots of its exclusive group, keep at most
        `max_loaded_slots` backends, place it, and make sure its memory fits every device's budget, unloading the
        least recently used idle slots first. Under one lock, so two loads never spend the same bytes."""
        async with self._room:
            await self._clear_group(slot)
            await self._cap(slot)
            return await self._admit(slot)

    async def _wait_idle(self, victim: Slot, deadline: float) -> bool:
        while (victim.in_flight > 0 or victim.leases > 0) and victim.state in LOADED:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(ADMISSION_POLL_S)
        return True

    async def _clear_group(self, slot: Slot) -> None:
        group = slot.config.group
        if group is None:
            return
        deadline = time.monotonic() + self.settings.cold_boot_grace_s
        for other in sorted(self.slots.values(), key=lambda s: s.name):
            if other is slot or other.config.group != group or other.state not in ACTIVE:
                continue
            if not await self._wait_idle(other, deadline):
                raise BackendError(
                    f"slot {slot.name} cannot load: slot {other.name} of its exclusive group {group!r} is still "
                    "serving", code="group_busy", detail={"group": group, "busy": other.name})
            await self._evict(other, slot.name, "group",
                              f"unloaded to load slot {slot.name} of the same exclusive group {group!r}",
                              {"group": group})

    async def _cap(self, slot: Slot) -> None:
        """Keep at most `max_loaded_slots` backends: unload the least recently used idle ones first."""
        cap = self.settings.max_loaded_slots
        if cap <= 0:
            return
        while True:
            others = [s for s in self.slots.values() if s is not slot and s.state in ACTIVE]
            if len(others) < cap:
                return
            evictable = [s for s in others if s.evictable]
            if not evictable:
                raise BackendError(
                    f"slot {slot.name} cannot load: {len(others)} slot(s) are loaded or loading and busy or "
                    f"pinned, and max_loaded_slots is {cap}", code="no_room",
                    detail={"busy": sorted(s.name for s in others), "max_loaded_slots": cap},
                )
            victim = min(evictable, key=lambda s: s.last_activity)
            await self._evict(victim, slot.name, "max_loaded_slots",
                              f"unloaded to make room for slot {slot.name} (max_loaded_slots={cap})",
                              {"max_loaded_slots": cap})

    def holdings(self, exclude: Slot | None = None) -> list[Holding]:
        """What every slot with a backend holds per device (measured where known, else estimated)."""
        out = []
        for s in self.slots.values():
            if s is not exclude and s.state in HOLDING:
                h = self.memory.holding(s)
                if h is not None:
                    out.append(h)
        return out

    def budgets(self, inv: Inventory) -> dict[str, DeviceBudget]:
        return device_budgets(inv, self.budget_settings)

    def _gpu_build(self, slot: Slot) -> bool:
        provider = self.ctx.providers.get(slot.config.provider)
        build = getattr(provider, "build_kind", None)
        return callable(build) and build() != "cpu"

    def _place(self, slot: Slot, inv: Inventory, budgets: dict[str, DeviceBudget],
               holdings: list[Holding]) -> Placement:
        cfg = slot.config
        layers = cfg.gpu_layers if cfg.gpu_layers is not None else ALL_LAYERS
        indices = [g.index for g in inv.gpus]
        if cfg.device == "cpu":
            return Placement((), 0, explicit=True)
        if cfg.device == "auto":
            if not indices or not self._gpu_build(slot):
                return Placement()
            shares: dict[int, int] = {}
            host_need = 0
            for i in indices:
                need = self.memory.need(slot, Placement((i,), layers, explicit=True))
                if need is None:
                    return Placement((indices[0],), layers, explicit=True)
                shares[i] = need.get(gpu_device(i), 0)
                host_need = max(host_need, need.get(HOST, 0))
            gpu = choose_gpu(shares, budgets, holdings, host_need)
            return Placement((gpu,), layers, explicit=True) if gpu is not None else Placement((), 0, explicit=True)
        wanted = requested_gpus(cfg.device) or tuple(indices)
        missing = [i for i in wanted if i not in indices]
        if not wanted or missing:
            why = "; ".join(f"{k}: {v}" for k, v in inv.skipped.items())
            raise Conflict(
                f"slot {slot.name} asks for device {cfg.device!r}, but this machine has "
                f"{'GPUs ' + ', '.join(map(str, indices)) if indices else 'no GPU'}" + (f" ({why})" if why else ""),
                code="device_unavailable", detail={"device": cfg.device, "gpus": indices, "skipped": inv.skipped})
        return Placement(wanted, layers, explicit=True)

    def fit(self, slot: Slot, ref: str | None, inv: Inventory) -> dict[str, Any] | None:
        """Whether `ref` (the slot's own model by default) fits this machine in `slot`: `fits` with every other
        slot unloaded (pinned ones stay), `fits_now` beside what is loaded, and what admission would unload."""
        budgets = self.budgets(inv)
        holdings = self.holdings(exclude=slot)
        try:
            placement = self._place(slot, inv, budgets, holdings)
        except Hal0Error:
            placement = Placement()
        est = self.memory.estimate(slot, ref, placement)
        if est is None:
            return None
        need = split(est, placement)
        now = plan(need, budgets, holdings)
        alone = plan(need, budgets, [h for h in holdings if h.pinned])
        return {"estimate": est.to_dict(), "device": placement.device, "needed_bytes": need,
                "fits": alone.fits, "fits_now": now.fits and not now.evict, "would_unload": list(now.evict),
                "budgets": {d: b.to_dict() for d, b in budgets.items()}}

    async def _admit(self, slot: Slot) -> Placement:
        deadline = time.monotonic() + self.settings.cold_boot_grace_s
        fresh = False
        while True:
            # Fresh figures after an unload (the freed memory shows at once); the short cache otherwise.
            inv = await self._read_inventory(0.0 if fresh else 1.0)
            budgets = self.budgets(inv)
            holdings = self.holdings(exclude=slot)
            placement = self._place(slot, inv, budgets, holdings)
            need = self.memory.need(slot, placement)
            if need is None:
                # No estimate (a speech backend, a file that is not GGUF): admitted; its measured use counts later.
                return placement
            verdict = plan(need, budgets, holdings)
            if verdict.fits and not verdict.evict:
                return placement
            if verdict.fits:
                for name in verdict.evict:
                    victim = self.slots[name]
                    if not victim.evictable:
                        # A request took it between the plan and now (an unload before it just ended): plan again.
                        break
                    frees = next((h.bytes for h in holdings if h.slot == name), {})
                    await self._evict(
                        victim, slot.name, "memory",
                        f"unloaded to make room for slot {slot.name} (needs "
                        + ", ".join(f"{_mib(n)} on {d}" for d, n in need.items() if n) + "; frees "
                        + ", ".join(f"{_mib(n)} on {d}" for d, n in frees.items() if n) + ")",
                        {"needs_bytes": need, "frees_bytes": frees})
                fresh = True
                continue
            if verdict.wait and time.monotonic() < deadline:
                await asyncio.sleep(ADMISSION_POLL_S)
                continue
            raise self._insufficient(slot, placement, need, budgets, holdings, verdict.short)

    async def _read_inventory(self, max_age_s: float) -> Inventory:
        """The inventory at most `max_age_s` old: the cached reading as it is (the pressure watcher takes one every
        second), or a new one in a thread (NVML and sysfs can take milliseconds; the hop alone ~0.5 ms of a load)."""
        if self._inventory is not None:
            return await asyncio.to_thread(self._inventory, max_age_s)
        from hal0.hardware.inventory import cached_inventory, inventory

        cached = cached_inventory(max_age_s)
        return cached if cached is not None else await asyncio.to_thread(inventory, max_age_s)

    def _insufficient(self, slot: Slot, placement: Placement, need: dict[str, int],
                      budgets: dict[str, DeviceBudget], holdings: list[Holding],
                      short: dict[str, int]) -> InsufficientMemory:
        parts = []
        for device, missing in short.items():
            b = budgets.get(device)
            if b is None:
                parts.append(f"{device} is not on this machine")
                continue
            parts.append(f"{device} needs {_mib(need[device])}, budget {_mib(b.budget_bytes)}, "
                         f"{_mib(max(0, need[device] - missing))} can be made free")
        kept = sorted(h.slot for h in holdings if not h.evictable and not h.busy and h.state in
                      {s.value for s in LOADED})
        pinned = sorted(h.slot for h in holdings if h.pinned)
        hint = f"; pinned: {', '.join(pinned)}" if pinned else ""
        return InsufficientMemory(
            f"slot {slot.name} cannot load {slot.config.model} on {placement.device}: " + "; ".join(parts)
            + hint + ". Unload a slot, lower its context or offload fewer layers, or raise the budget "
            "(memory_budget_mb / memory_reserve_mb)",
            detail={
                "slot": slot.name, "model": slot.config.model, "device": placement.device,
                "needed_bytes": need, "short_bytes": short,
                "budgets": {d: b.to_dict() for d, b in budgets.items()},
                "free_bytes": {d: b.free_bytes for d, b in budgets.items()},
                "slots": [h.to_dict() for h in holdings], "not_evictable": kept + pinned,
            })

    async def _evict(self, victim: Slot, for_slot: str | None, reason: str, message: str,
                     detail: dict[str, Any]) -> None:
        model = victim.record.model or victim.config.model
        await victim.unload(message)
        log.info("slot %s: %s", victim.name, message)
        if self._evicted is not None:
            self._evicted(Eviction(victim.name, model, for_slot, reason, message, detail))

    # -- memory pressure --------------------------------------------------------------------------------------
    async def _watch_pressure(self) -> None:
        """Unload idle unpinned slots, least recently used first, while a device's free memory is below the floor
        because of something outside hal0 (hal0's own loads stay within the budgets, which keep the reserve)."""
        floor = self.settings.memory_pressure_floor_mb * MIB
        warned: set[str] = set()
        while True:
            await asyncio.sleep(PRESSURE_INTERVAL_S)
            try:
                inv = await self._read_inventory(PRESSURE_INTERVAL_S / 2)
            except OSError as exc:
                log.warning("memory pressure watcher cannot read the inventory: %s", exc)
                continue
            for device, b in self.budgets(inv).items():
                if b.free_bytes >= floor:
                    warned.discard(device)
                    continue
                async with self._room:
                    candidates = [h for h in self.holdings() if h.evictable and h.bytes.get(device, 0) > 0]
                    if not candidates:
                        if device not in warned:
                            warned.add(device)
                            log.warning("memory pressure on %s (%s free, floor %s): no idle unpinned slot to "
                                        "unload", device, _mib(b.free_bytes), _mib(floor))
                        continue
                    h = min(candidates, key=lambda h: h.last_activity)
                    if not self.slots[h.slot].evictable:
                        continue
                    await self._evict(
                        self.slots[h.slot], None, "pressure",
                        f"unloaded under memory pressure: {device} had {_mib(b.free_bytes)} free, below the "
                        f"floor of {_mib(floor)} (frees {_mib(h.bytes.get(device, 0))})",
                        {"device": device, "free_bytes": b.free_bytes, "floor_bytes": floor,
                         "frees_bytes": h.bytes})
                break

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

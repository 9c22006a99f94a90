"""Memory budgets per device and the admission plan of one load: what fits, what to unload first, or why not.

Pure functions of the inventory, the settings and what each slot holds, so every rule is tested without a backend;
the slot manager does the I/O (reading the inventory, unloading the victims) and holds the lock that keeps two
admissions from spending the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field
from typing import TYPE_CHECKING, Any

from hal0.datatypes import datatype
from hal0.settings import Settings

if TYPE_CHECKING:
    from hal0.hardware.inventory import Inventory

MIB = 1 << 20
GIB = 1 << 30
HOST = "host"


def gpu_device(index: int) -> str:
    return f"gpu:{index}"


def default_reserve(device: str, total_bytes: int) -> int:
    """What a device keeps free of hal0's slots when the settings do not say: on the host, the OS, the desktop
    and hal0 itself (10% of the memory, at least 1 GiB and at most 4 GiB); on a GPU, the display and driver
    (5%, at least 512 MiB and at most 2 GiB: above the default pressure floor, so a GPU that only hal0 fills
    never reads as under pressure)."""
    if device == HOST:
        return min(max(total_bytes // 10, GIB), 4 * GIB)
    return min(max(total_bytes // 20, 512 * MIB), 2 * GIB)


@datatype(frozen=True, slots=True)
class BudgetSettings:
    """The memory settings, in bytes (None: the default)."""

    reserve_bytes: int | None = None
    host_budget_bytes: int | None = None
    gpu_budget_bytes: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> BudgetSettings:
        return cls.from_mb(settings.memory_reserve_mb, settings.memory_budget_mb, settings.gpu_memory_budget_mb)

    @classmethod
    def from_mb(cls, reserve_mb: int | None, budget_mb: int | None,
                gpu_budget_mb: Iterable[tuple[int, int]] = ()) -> BudgetSettings:
        return cls(None if reserve_mb is None else reserve_mb * MIB,
                   None if budget_mb is None else budget_mb * MIB,
                   {index: mb * MIB for index, mb in gpu_budget_mb})


@datatype(frozen=True, slots=True)
class DeviceBudget:
    """One memory pool hal0 loads onto (the host, a GPU): its size, what is kept back, what loads may use."""
    device: str
    total_bytes: int
    reserve_bytes: int
    budget_bytes: int
    #: What the OS or the driver says is free right now (MemAvailable; a GPU's total minus used).
    free_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "total_bytes": self.total_bytes, "reserve_bytes": self.reserve_bytes,
                "budget_bytes": self.budget_bytes, "free_bytes": self.free_bytes}


def device_budgets(inv: Inventory, settings: BudgetSettings) -> dict[str, DeviceBudget]:
    """Host memory and every GPU: the total minus a reserve, unless a budget is set outright."""
    out: dict[str, DeviceBudget] = {}

    def add(device: str, total: int, free: int, budget: int | None) -> None:
        reserve = settings.reserve_bytes if settings.reserve_bytes is not None else default_reserve(device, total)
        if budget is None:
            budget = max(0, total - reserve)
        else:
            reserve = max(0, total - budget)
        out[device] = DeviceBudget(device, total, reserve, budget, free)

    add(HOST, inv.memory.total_bytes, inv.memory.available_bytes, settings.host_budget_bytes)
    for gpu in inv.gpus:
        free = gpu.memory_total_bytes - (gpu.memory_used_bytes or 0)
        add(gpu_device(gpu.index), gpu.memory_total_bytes, free, settings.gpu_budget_bytes.get(gpu.index))
    return out


@datatype(frozen=True, slots=True)
class Holding:
    """What one slot holds (or, while it loads, is about to hold) on each device."""

    slot: str
    bytes: dict[str, int]
    #: Measured figures (True) or the estimate of a backend not measured yet.
    measured: bool
    state: str
    #: May be unloaded now to make room: loaded, no request in flight, not pinned.
    evictable: bool
    #: Would be evictable once its requests end or its load finishes (not pinned).
    busy: bool
    pinned: bool
    last_activity: float

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "bytes": dict(self.bytes), "total_bytes": sum(self.bytes.values()),
                "measured": self.measured, "state": self.state, "pinned": self.pinned}


@datatype(frozen=True, slots=True)
class Plan:
    """An admission's outcome: `fits` after unloading `evict` (least recently used first); else `wait` (it fits
    once these serving slots finish) or neither (it cannot fit at all: `short` says by how much, per device)."""

    fits: bool
    evict: tuple[str, ...] = ()
    wait: tuple[str, ...] = ()
    short: dict[str, int] = field(default_factory=dict)
    room: dict[str, int] = field(default_factory=dict)


def room(budgets: dict[str, DeviceBudget], holdings: Iterable[Holding]) -> dict[str, int]:
    """Bytes each device can still give: the budget less what slots hold, and never more than is free now."""
    held: dict[str, int] = {d: 0 for d in budgets}
    for h in holdings:
        for device, n in h.bytes.items():
            held[device] = held.get(device, 0) + n
    return {d: min(b.budget_bytes - held[d], b.free_bytes) for d, b in budgets.items()}


def plan(need: dict[str, int], budgets: dict[str, DeviceBudget], holdings: list[Holding]) -> Plan:
    """Which slots to unload so `need` fits. A victim frees its bytes on every device it holds; only slots that
    hold something on a device still short are taken, the least recently used first."""
    free = room(budgets, holdings)
    unknown = [d for d in need if d not in budgets]
    if unknown:
        return Plan(False, short={d: need[d] for d in unknown}, room=free)

    def deficit(extra: dict[str, int]) -> dict[str, int]:
        return {d: n - free[d] - extra.get(d, 0) for d, n in need.items() if n - free[d] - extra.get(d, 0) > 0}

    def take(pool: list[Holding]) -> tuple[list[str], dict[str, int]]:
        freed: dict[str, int] = {}
        chosen: list[str] = []
        for h in sorted(pool, key=lambda h: h.last_activity):
            short = deficit(freed)
            if not short:
                break
            if any(h.bytes.get(d, 0) > 0 for d in short):
                chosen.append(h.slot)
                for d, n in h.bytes.items():
                    freed[d] = freed.get(d, 0) + n
        return chosen, deficit(freed)

    victims, short = take([h for h in holdings if h.evictable])
    if not short:
        return Plan(True, evict=tuple(victims), room=free)
    with_busy, short_busy = take([h for h in holdings if h.evictable or h.busy])
    if not short_busy:
        return Plan(False, wait=tuple(s for s in with_busy if s not in victims), short=short, room=free)
    return Plan(False, short=short_busy, room=free)


def choose_gpu(need_on_gpu: dict[int, int], budgets: dict[str, DeviceBudget], holdings: list[Holding],
               host_need: int) -> int | None:
    """`auto` placement: the GPU with the most room that fits its share of the load outright, else None (the
    CPU). `need_on_gpu` maps each GPU index to what the load would take there."""
    free = room(budgets, holdings)
    fitting = [(free[gpu_device(i)], i) for i, n in need_on_gpu.items()
               if gpu_device(i) in free and n <= free[gpu_device(i)] and host_need <= free.get(HOST, 0)]
    return max(fitting)[1] if fitting else None


__all__ = ["HOST", "BudgetSettings", "DeviceBudget", "Holding", "Plan", "choose_gpu", "default_reserve",
           "device_budgets", "gpu_device", "plan", "room"]

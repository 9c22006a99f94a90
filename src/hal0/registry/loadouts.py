"""Loadouts: recommended model-per-slot sets by hardware tier, checked against the machine's memory.

Applying one pulls what is missing and assigns each slot through a callable: the registry never imports slots.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import field
from typing import Any

from hal0.datatypes import datatype
from hal0.errors import InsufficientMemory, LoadoutNotFound
from hal0.hardware.budget import BudgetSettings, DeviceBudget, device_budgets
from hal0.hardware.inventory import inventory
from hal0.registry import catalog
from hal0.registry.pull import EventCallback, Registry

_MIB = 1024 * 1024
_GIB = 1024 * _MIB


@datatype(frozen=True, slots=True)
class LoadoutSlot:
    slot: str
    ref: str
    #: Memory beyond the files: KV cache for the context, activations, backend runtime.
    context_bytes: int


@datatype(frozen=True, slots=True)
class Loadout:
    name: str
    tier: str
    description: str
    slots: tuple[LoadoutSlot, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tier": self.tier, "description": self.description,
                "slots": [{"slot": s.slot, "ref": s.ref, "context_bytes": s.context_bytes}
                          for s in self.slots]}


def _slots(chat: str, chat_ctx: int, embed: str, stt: str, tts: str) -> tuple[LoadoutSlot, ...]:
    return (LoadoutSlot("primary", chat, chat_ctx), LoadoutSlot("embed", embed, 256 * _MIB),
            LoadoutSlot("stt", stt, 256 * _MIB), LoadoutSlot("tts", tts, 256 * _MIB))


LOADOUTS: tuple[Loadout, ...] = (
    Loadout("cpu-laptop", "CPU only, 8 GB RAM or more",
            "Small models that stay responsive on a laptop CPU",
            _slots("qwen2.5-1.5b-instruct-q4_k_m", 512 * _MIB, "nomic-embed-text-v1.5-q4_k_m",
                   "moonshine-tiny-en", "kokoro-82m-int8")),
    Loadout("cpu-tiny", "CPU only, 4 GB RAM",
            "The smallest useful set, for single-board computers and CI",
            _slots("qwen2.5-0.5b-instruct-q4_k_m", 256 * _MIB, "bge-small-en-v1.5-q8_0",
                   "moonshine-tiny-en", "kokoro-82m-int8")),
    Loadout("gpu-16gb", "a 16 GB GPU (or 16 GB of fast unified memory)",
            "A 14B chat model with room for an 8k-16k context",
            _slots("qwen2.5-14b-instruct-q4_k_m", 3 * _GIB, "nomic-embed-text-v1.5-q4_k_m",
                   "moonshine-base-en", "kokoro-82m")),
    Loadout("unified-128gb", "128 GB unified memory (Strix Halo, Apple M-series Max/Ultra)",
            "A 32B chat model with a long context, everything resident at once",
            _slots("qwen2.5-32b-instruct-q4_k_m", 16 * _GIB, "nomic-embed-text-v1.5-q4_k_m",
                   "moonshine-base-en", "kokoro-82m")),
)
_BY_NAME = {lo.name: lo for lo in LOADOUTS}
assert all(catalog.lookup(s.ref) is not None for lo in LOADOUTS for s in lo.slots)


def list_loadouts() -> list[Loadout]:
    return list(LOADOUTS)


def get_loadout(name: str) -> Loadout:
    loadout = _BY_NAME.get(name)
    if loadout is None:
        raise LoadoutNotFound(f"no loadout named {name!r}; known: {', '.join(_BY_NAME)}",
                              detail={"name": name, "known": list(_BY_NAME)})
    return loadout


@datatype(frozen=True, slots=True)
class MemInfo:
    """The memory a loadout is checked against: the budget of the machine's largest device (the host, or a GPU
    whose budget is larger) and what is free there now."""

    total: int
    available: int
    device: str = "host"

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "available": self.available, "device": self.device}


def machine_memory(budgets: dict[str, DeviceBudget] | None = None) -> MemInfo:
    """MemInfo from the budgets admission uses (the default ones where none are given)."""
    if budgets is None:
        budgets = device_budgets(inventory(), BudgetSettings())
    best = max(budgets.values(), key=lambda b: b.budget_bytes)
    return MemInfo(total=best.budget_bytes, available=min(best.free_bytes, best.budget_bytes), device=best.device)


@datatype(frozen=True, slots=True)
class SlotPlan:
    slot: str
    ref: str
    installed: bool
    file_bytes: int | None
    context_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "ref": self.ref, "installed": self.installed,
                "file_bytes": self.file_bytes, "context_bytes": self.context_bytes}


@datatype(frozen=True, slots=True)
class LoadoutPlan:
    loadout: Loadout
    slots: tuple[SlotPlan, ...]
    estimate_bytes: int
    memory: MemInfo
    #: False when the estimate exceeds MemTotal: it can never fit.
    fits: bool
    warnings: tuple[str, ...]

    @property
    def missing(self) -> list[str]:
        return sorted({s.ref for s in self.slots if not s.installed})

    def to_dict(self) -> dict[str, Any]:
        return {"loadout": self.loadout.to_dict(), "slots": [s.to_dict() for s in self.slots],
                "estimate_bytes": self.estimate_bytes, "memory": self.memory.to_dict(), "fits": self.fits,
                "missing": self.missing, "warnings": list(self.warnings)}


def plan_loadout(registry: Registry, name: str, memory: MemInfo | None = None) -> LoadoutPlan:
    """Estimate the memory of loadout `name` (file sizes + context allowance) against this machine."""
    loadout = get_loadout(name)
    memory = memory or machine_memory()
    slots: list[SlotPlan] = []
    warnings: list[str] = []
    for s in loadout.slots:
        installed = registry.exists(s.ref)
        if installed:
            size: int | None = registry.get(s.ref).size
        else:
            entry = catalog.lookup(s.ref)
            size = entry.size if entry is not None else None
            if size is None:
                warnings.append(f"size of {s.ref} is unknown until it is pulled; not counted")
        slots.append(SlotPlan(s.slot, s.ref, installed, size, s.context_bytes))
    estimate = sum((p.file_bytes or 0) + p.context_bytes for p in slots)
    fits = estimate <= memory.total
    if not fits:
        warnings.append(f"needs about {estimate / _GIB:.1f} GiB but the largest budget here ({memory.device}) is "
                        f"{memory.total / _GIB:.1f} GiB")
    elif estimate > memory.available:
        warnings.append(f"needs about {estimate / _GIB:.1f} GiB but only {memory.available / _GIB:.1f} GiB "
                        "is available now; slots being replaced will free some")
    return LoadoutPlan(loadout, tuple(slots), estimate, memory, fits, tuple(warnings))


@datatype
class ApplyReport:
    loadout: str
    plan: LoadoutPlan
    pulled: list[str] = field(default_factory=list)
    already_installed: list[str] = field(default_factory=list)
    assigned: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"loadout": self.loadout, "estimate_bytes": self.plan.estimate_bytes,
                "memory": self.plan.memory.to_dict(), "warnings": list(self.plan.warnings),
                "pulled": self.pulled, "already_installed": self.already_installed, "assigned": self.assigned}


async def apply_loadout(registry: Registry, name: str, assign: Callable[[str, str], Awaitable[None]], *,
                        force: bool = False, memory: MemInfo | None = None,
                        on_event: EventCallback | None = None) -> ApplyReport:
    """Check memory, pull each missing model, then assign every slot. InsufficientMemory (409) when the
    loadout cannot fit this machine, unless `force`."""
    plan = plan_loadout(registry, name, memory)
    if not plan.fits and not force:
        raise InsufficientMemory(
            f"loadout {name!r} needs about {plan.estimate_bytes / _GIB:.1f} GiB; the largest memory budget here "
            f"({plan.memory.device}) is {plan.memory.total / _GIB:.1f} GiB (use force to apply anyway)",
            detail={"estimate_bytes": plan.estimate_bytes, **plan.memory.to_dict()})
    report = ApplyReport(name, plan)
    for ref in dict.fromkeys(s.ref for s in plan.slots):
        if registry.exists(ref):
            report.already_installed.append(ref)
        else:
            await registry.pull(ref, on_event=on_event)
            report.pulled.append(ref)
    for s in plan.slots:
        await assign(s.slot, s.ref)
        report.assigned[s.slot] = s.ref
    return report

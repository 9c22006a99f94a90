"""What this machine has: CPU, host memory (the cgroup's limit where lower), GPUs and NPUs.

Every reader takes a root path so tests can point it at copies of real files; `inventory()` caches for a short TTL
so callers on the request path never touch sysfs or NVML.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, field
from pathlib import Path
from typing import Any

from hal0.datatypes import datatype

CACHE_TTL_S = 2.0


@datatype(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int
    # "meminfo" or "cgroup": which of the two limits is the lower one and so the one that counts.
    source: str
    meminfo_total_bytes: int
    cgroup_max_bytes: int | None


@datatype(frozen=True)
class Gpu:
    index: int
    vendor: str  # "nvidia" or "amd"
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    # amdgpu only: the GTT pool (system memory the GPU maps); on unified-memory APUs it is the pool that matters.
    gtt_total_bytes: int | None = None
    gtt_used_bytes: int | None = None
    source: str = ""  # "nvml" or the sysfs device path


@datatype(frozen=True)
class Inventory:
    cpu_model: str
    cpu_cores: int
    memory: HostMemory
    gpus: tuple[Gpu, ...]
    npus: tuple[str, ...]
    # Why a source of GPUs was not used (NVML absent, no driver, ...): the reason is part of the answer.
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": {"model": self.cpu_model, "cores": self.cpu_cores},
            "memory": asdict(self.memory),
            "gpus": [asdict(g) for g in self.gpus],
            "npus": list(self.npus),
            "skipped": dict(self.skipped),
        }


def _kib(rest: str) -> int:
    return int(rest.split()[0]) * 1024


def read_meminfo(path: Path) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from a /proc/meminfo-format file."""
    fields: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "MemFree"):
            fields[key] = _kib(rest)
    return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))


def _cgroup_dir(proc_root: Path, cgroup_root: Path) -> Path | None:
    """This process's cgroup v2 directory (the `0::/path` line of /proc/self/cgroup)."""
    try:
        for line in (proc_root / "self" / "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return cgroup_root / line[3:].lstrip("/")
    except OSError:
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" means no limit


def read_host_memory(proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> HostMemory:
    """Host memory, the lower of /proc/meminfo and the cgroup's memory.max (walking up to the root)."""
    total, available = read_meminfo(proc_root / "meminfo")
    limit: int | None = None
    used: int | None = None
    d = _cgroup_dir(proc_root, cgroup_root)
    while d is not None and (d == cgroup_root or cgroup_root in d.parents):
        m = _read_int(d / "memory.max")
        if m is not None and (limit is None or m < limit):
            limit, used = m, _read_int(d / "memory.current")
        d = d.parent if d != cgroup_root else None
    if limit is not None and limit < total:
        avail = min(available, max(0, limit - (used or 0)))
        return HostMemory(limit, avail, "cgroup", total, limit)
    return HostMemory(total, available, "meminfo", total, limit)


def read_cpu(proc_root: Path = Path("/proc")) -> tuple[str, int]:
    model = ""
    try:
        for line in (proc_root / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return model, cores


def read_amdgpu(drm_root: Path = Path("/sys/class/drm")) -> list[Gpu]:
    """AMD GPUs from amdgpu's sysfs: `card*/device/mem_info_{vram,gtt}_{total,used}` (bytes, one integer a file,
    as the kernel's amdgpu documentation describes them)."""
    gpus: list[Gpu] = []
    cards = sorted((p for p in drm_root.glob("card*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    for card in cards:
        dev = card / "device"
        vram_total = _read_int(dev / "mem_info_vram_total")
        if vram_total is None:
            continue
        name = ""
        for f in ("product_name", "product_number"):
            try:
                name = (dev / f).read_text().strip()
            except OSError:
                continue
            if name:
                break
        gpus.append(Gpu(
            index=len(gpus), vendor="amd", name=name or f"amdgpu {card.name}",
            memory_total_bytes=vram_total, memory_used_bytes=_read_int(dev / "mem_info_vram_used") or 0,
            gtt_total_bytes=_read_int(dev / "mem_info_gtt_total"), gtt_used_bytes=_read_int(dev / "mem_info_gtt_used"),
            source=str(dev)))
    return gpus


def read_nvml() -> tuple[list[Gpu], str | None]:
    """NVIDIA GPUs through NVML; ([], reason) when there is no NVIDIA driver or NVML does not answer."""
    from hal0.hardware.nvml import NvmlError, failed, nvml

    lib, reason = nvml()
    if lib is None:
        return [], reason
    try:
        gpus = []
        for i in range(lib.count()):
            h = lib.handle(i)
            total, _, used = lib.memory(h)
            gpus.append(Gpu(index=i, vendor="nvidia", name=lib.name(h), memory_total_bytes=total,
                            memory_used_bytes=used, source="nvml"))
        return gpus, None
    except NvmlError as exc:
        failed(exc)
        return [], f"NVML query failed: {exc}"


def read_npus(dev_root: Path = Path("/dev")) -> list[str]:
    """AMD XDNA (and other) accelerators by presence of /dev/accel/accel*."""
    return sorted(str(p) for p in (dev_root / "accel").glob("accel*"))


def read_inventory(proc_root: Path = Path("/proc"), sys_root: Path = Path("/sys"),
                   dev_root: Path = Path("/dev"), nvml: bool = True) -> Inventory:
    model, cores = read_cpu(proc_root)
    skipped: dict[str, str] = {}
    gpus: list[Gpu] = []
    if nvml:
        gpus, reason = read_nvml()
        if reason:
            skipped["nvml"] = reason
    else:
        skipped["nvml"] = "disabled"
    for amd in read_amdgpu(sys_root / "class" / "drm"):
        gpus.append(Gpu(**{**asdict(amd), "index": len(gpus)}))
    return Inventory(model, cores, read_host_memory(proc_root, sys_root / "fs" / "cgroup"), tuple(gpus),
                     tuple(read_npus(dev_root)), skipped)


_lock = threading.Lock()
_cached: tuple[float, Inventory] | None = None


def inventory(max_age_s: float = CACHE_TTL_S) -> Inventory:
    """The machine's inventory, at most `max_age_s` old (sysfs and NVML are read at most that often)."""
    global _cached
    with _lock:
        now = time.monotonic()
        if _cached is None or now - _cached[0] > max_age_s:
            _cached = (now, read_inventory())
        return _cached[1]


def cached_inventory(max_age_s: float) -> Inventory | None:
    """The last reading if it is at most `max_age_s` old, else None. Never reads, never waits for the lock (a
    reading in a thread holds it while NVML answers): for the event loop, before it hands `inventory` to a thread."""
    last = _cached
    if last is not None and time.monotonic() - last[0] <= max_age_s:
        return last[1]
    return None

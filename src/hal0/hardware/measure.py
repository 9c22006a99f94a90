"""What a running backend really holds: llama-server's own buffer report from its log, RSS/PSS from /proc and,
where NVML is there, its per-process GPU memory.
"""

from __future__ import annotations

import re
from dataclasses import field
from pathlib import Path
from typing import Any

from hal0.datatypes import datatype

MIB = 1 << 20
# e.g. `load_tensors:   CPU_Mapped model buffer size =     9.70 MiB`, `llama_kv_cache:  CUDA0 KV buffer size = ...`,
# `sched_reserve:   CUDA_Host compute buffer size = ...` (printed at log verbosity 4).
_BUFFER = re.compile(r"\b(\S+)\s+(model|KV|compute|output) buffer size =\s*([\d.]+) MiB")
# Where one load starts in a log that several runs appended to (the first marker found of these, newest load).
_LOAD_MARKERS = ("load_model: loading model", "llama_model_loader: loaded meta data")
_KIND = {"model": "weights", "KV": "kv", "compute": "compute", "output": "output"}
# Host-side buffer names: mapped weights, repacked weights, pinned host memory of a GPU backend.
_HOST = ("CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host", "ROCm_Host", "Vulkan_Host", "Metal_Mapped")


def device_of(buffer_name: str) -> str:
    """`CPU` for every host buffer, the backend's device name (`CUDA0`, `ROCm0`, `Vulkan0`) otherwise."""
    return "CPU" if buffer_name in _HOST or buffer_name.endswith("_Host") else buffer_name


@datatype(frozen=True)
class ProcessMemory:
    rss_bytes: int
    pss_bytes: int | None
    anon_bytes: int | None


@datatype(frozen=True)
class MeasuredMemory:
    """Buffers as llama-server reported them (per device and kind), plus the process as the kernel sees it."""

    buffers: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> kind -> bytes
    process: ProcessMemory | None = None
    gpu_process_bytes: dict[str, int] = field(default_factory=dict)  # "nvml:<index>" -> bytes

    @property
    def buffers_bytes(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.buffers.values())

    @property
    def total_bytes(self) -> int:
        """Host memory plus GPU memory (NVML's figure, or the reported device buffers). Host memory is the larger
        of RSS and the host buffers: KV and compute pages not touched yet are not resident, but they will be."""
        host_buffers = sum(self.buffers.get("CPU", {}).values())
        host = max(self.process.rss_bytes, host_buffers) if self.process else host_buffers
        gpu_buffers = self.buffers_bytes - host_buffers
        gpu = sum(self.gpu_process_bytes.values()) if self.gpu_process_bytes else gpu_buffers
        return host + gpu

    def part(self, kind: str) -> int:
        return sum(kinds.get(kind, 0) for kinds in self.buffers.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes, "buffers_bytes": self.buffers_bytes,
            "weights_bytes": self.part("weights"), "kv_bytes": self.part("kv"),
            "compute_bytes": self.part("compute"), "buffers": self.buffers,
            "rss_bytes": self.process.rss_bytes if self.process else None,
            "pss_bytes": self.process.pss_bytes if self.process else None,
            "gpu_process_bytes": dict(self.gpu_process_bytes),
        }


def parse_buffer_report(text: str) -> dict[str, dict[str, int]]:
    """Per-device buffer sizes of the last load in a llama-server log."""
    for marker in _LOAD_MARKERS:
        at = text.rfind(marker)
        if at >= 0:
            text = text[at:]
            break
    out: dict[str, dict[str, int]] = {}
    for m in _BUFFER.finditer(text):
        dev = device_of(m.group(1))
        kind = _KIND[m.group(2)]
        kinds = out.setdefault(dev, {})
        kinds[kind] = kinds.get(kind, 0) + round(float(m.group(3)) * MIB)
    return out


def read_log_tail(path: Path, max_bytes: int = 4 * MIB) -> str:
    """The end of a log (its last load's report is near the end's start, never megabytes before it)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def read_process_memory(pid: int, proc_root: Path = Path("/proc")) -> ProcessMemory | None:
    """RSS and PSS of a process from smaps_rollup (status as a fallback); None when it is gone."""
    fields: dict[str, int] = {}
    for name in ("smaps_rollup", "status"):
        try:
            text = (proc_root / str(pid) / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                fields.setdefault(key, int(parts[0]) * 1024)
    rss = fields.get("Rss", fields.get("VmRSS"))
    if rss is None:
        return None
    return ProcessMemory(rss, fields.get("Pss"), fields.get("Anonymous", fields.get("RssAnon")))


def read_nvml_process_memory(pid: int) -> dict[str, int]:
    """GPU memory NVML accounts to `pid`, per GPU index; {} without NVML or a GPU."""
    from hal0.hardware.nvml import NvmlError, failed, nvml

    lib, _ = nvml()
    if lib is None:
        return {}
    out: dict[str, int] = {}
    try:
        for i in range(lib.count()):
            for p in lib.processes(lib.handle(i)):
                if p.pid == pid and p.used_bytes is not None:
                    out[f"nvml:{i}"] = out.get(f"nvml:{i}", 0) + p.used_bytes
    except NvmlError as exc:
        failed(exc)
    return out


def measure(pid: int | None, log_path: Path | None, nvml: bool = True) -> MeasuredMemory:
    """Everything known about a backend's memory now: its log's buffer report, /proc, NVML."""
    buffers = parse_buffer_report(read_log_tail(log_path)) if log_path else {}
    process = read_process_memory(pid) if pid else None
    gpu = read_nvml_process_memory(pid) if (pid and nvml) else {}
    return MeasuredMemory(buffers, process, gpu)

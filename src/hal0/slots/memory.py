"""What each slot holds, or is about to hold, per device: its estimate before a load, measured figures after.

The one owner of a slot's memory figures: the API shows them and admission counts them, with the same numbers.
Devices are named as budgets name them: `host` and `gpu:N`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hal0.hardware.budget import HOST, Holding, gpu_device
from hal0.hardware.placement import ALL_LAYERS, Placement, has_flag
from hal0.slots.state import LOADED, SlotState

if TYPE_CHECKING:
    from hal0.hardware.estimate import MemoryEstimate
    from hal0.hardware.measure import MeasuredMemory
    from hal0.slots.slot import ModelSource, Slot

#: States in which a backend process exists or is being started: it holds (or is about to hold) memory.
HOLDING = frozenset({SlotState.STARTING, SlotState.WARMING, *LOADED, SlotState.UNLOADING})


def placement_of(device: str | None) -> Placement:
    """The placement a record's `device` describes (what admission chose at the last load)."""
    if not device or device == "cpu":
        return Placement((), 0, explicit=device == "cpu")
    return Placement(tuple(int(i) for i in device.removeprefix("gpu:").split(",")), ALL_LAYERS, explicit=True)


def split(est: MemoryEstimate, placement: Placement) -> dict[str, int]:
    """An estimate per device: host buffers and the process baseline on `host`; the GPU buffers and one GPU
    context per GPU, shared evenly over the GPUs of a split (llama.cpp's layer split; an approximation)."""
    from hal0.hardware.estimate import GPU_CONTEXT_BYTES  # the estimate's modules: imported by the first load

    gpu_bytes = sum(d.total_bytes for name, d in est.devices.items() if name != "CPU")
    context = GPU_CONTEXT_BYTES if gpu_bytes else 0
    host = est.devices["CPU"].total_bytes + est.baseline_bytes - context
    out = {HOST: host}
    if gpu_bytes and placement.gpus:
        share = gpu_bytes // len(placement.gpus)
        for i in placement.gpus:
            out[gpu_device(i)] = share + GPU_CONTEXT_BYTES
    elif gpu_bytes:
        out[HOST] += gpu_bytes + context
    return out


class SlotMemory:
    """Estimates (cached per model file) and measurements (the buffer report read once per backend)."""

    def __init__(self, models: ModelSource, log_path: Callable[[str], Path]) -> None:
        self._models = models
        self._log_path = log_path
        # A backend's buffer report never changes after its load: its log is read once per (slot, pid).
        self._reports: dict[tuple[str, int], dict[str, dict[str, int]]] = {}

    def estimate(self, slot: Slot, ref: str | None = None, placement: Placement | None = None,
                 ) -> MemoryEstimate | None:
        """What loading `ref` (the slot's own model by default) costs with this placement (the last one by
        default); None where it cannot be told (no model, not installed, not a GGUF, not a llama.cpp slot)."""
        ref = ref or slot.config.model
        if ref is None or slot.config.provider != "llama.cpp":
            return None
        path = self._models.path(ref)
        if path is None:
            return None
        placement = placement if placement is not None else placement_of(slot.record.device)
        from hal0.hardware.estimate import LoadSettings, estimate_file

        settings = LoadSettings.from_args(slot.config.ctx_size, slot.config.args)
        if placement.explicit and not has_flag(slot.config.args, "-ngl", "--gpu-layers", "--n-gpu-layers"):
            settings = replace(settings, gpu_layers=placement.gpu_layers if placement.gpus else 0)
        try:
            return estimate_file(path, settings)
        except (ValueError, OSError):
            return None

    def need(self, slot: Slot, placement: Placement) -> dict[str, int] | None:
        """What a load of the slot's model with `placement` takes on each device; None where unknown."""
        est = self.estimate(slot, placement=placement)
        return split(est, placement) if est is not None else None

    def measured(self, slot: Slot) -> MeasuredMemory | None:
        """What the slot's backend holds now; None while no backend is loaded."""
        pid = slot.record.pid
        if pid is None or slot.state not in LOADED:
            return None
        from hal0.hardware.measure import MeasuredMemory, measure, parse_buffer_report, read_log_tail

        key = (slot.name, pid)
        buffers = self._reports.get(key)
        if buffers is None:
            # Loaded means the report is already written (llama-server prints it before it listens), so an empty
            # answer (another provider, a lower -lv) is kept too: read once per backend, never per request.
            buffers = parse_buffer_report(read_log_tail(self._log_path(slot.name)))
            for old in [k for k in list(self._reports) if k[0] == slot.name]:  # list(): threads read it too
                del self._reports[old]
            self._reports[key] = buffers
        live = measure(pid, None)
        return MeasuredMemory(buffers, live.process, live.gpu_process_bytes)

    def view(self, slot: Slot, *, measure: bool = True) -> dict[str, Any]:
        """The `memory` field of a slot's JSON: its estimate and what its backend holds now (`measure=False`:
        not read yet, the estimate alone: a GGUF header already cached, no /proc)."""
        est = self.estimate(slot)
        got = self.measured(slot) if measure else None
        return {"estimate": est.to_dict() if est else None, "measured": got.to_dict() if got else None}

    def holding(self, slot: Slot) -> Holding | None:
        """What `slot` holds per device for admission: measured where known (host: the larger of RSS and the
        reported host buffers, or of RSS and the estimate where no report was printed, since KV pages not yet
        touched are not resident but will be), the estimate while it starts."""
        if slot.state not in HOLDING:
            return None
        placement = placement_of(slot.record.device)
        planned = self.need(slot, placement) or {}
        got = self.measured(slot)
        measured = got is not None and got.process is not None
        held = dict(planned)
        if got is not None and got.process is not None:
            host_buffers = sum(got.buffers.get("CPU", {}).values())
            floor = host_buffers if got.buffers else planned.get(HOST, 0)
            held[HOST] = max(got.process.rss_bytes, floor)
            for key, n in got.gpu_process_bytes.items():
                held[gpu_device(int(key.removeprefix("nvml:")))] = n
        # Serving, starting or unloading: not to be unloaded now, but room once it is idle (or gone).
        busy = not slot.config.pinned
        return Holding(slot.name, held, measured, slot.state.value, slot.evictable, busy, slot.config.pinned,
                       slot.last_activity)


__all__ = ["HOLDING", "SlotMemory", "placement_of", "split"]

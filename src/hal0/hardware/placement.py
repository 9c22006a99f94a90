"""Where a slot's backend runs: the `device` setting parsed, and what it means for one llama.cpp build.

`auto` is resolved by admission (the GPU with the most room that fits, else the CPU); everything else is the
user's word. A placement becomes a visibility variable for the build's runtime and an `-ngl` argument.
"""

from __future__ import annotations

import re

from hal0.datatypes import datatype
from hal0.errors import InvalidRequest

DEVICE_PATTERN = r"auto|cpu|gpu|gpu:\d{1,2}(,\d{1,2}){0,15}"
#: `-ngl` for "every layer, and the output": llama.cpp clamps it to the model's layers.
ALL_LAYERS = 999
#: The variable each GPU runtime reads to know which devices the process may see.
VISIBILITY_VARS = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES", "vulkan": "GGML_VK_VISIBLE_DEVICES"}


def validate_device(device: str) -> str:
    if not isinstance(device, str) or not re.fullmatch(DEVICE_PATTERN, device):
        raise InvalidRequest(f'device must be "auto", "cpu", "gpu", "gpu:N" or "gpu:N,M"; got {str(device)[:40]!r}',
                             code="invalid_device")
    return device


def requested_gpus(device: str) -> tuple[int, ...] | None:
    """The GPU indices a `gpu:N,M` device names; None for auto, cpu and plain gpu."""
    if not device.startswith("gpu:"):
        return None
    return tuple(dict.fromkeys(int(i) for i in device[4:].split(",")))


@datatype(frozen=True, slots=True)
class Placement:
    """A resolved device: which GPUs (none: the CPU) and how many layers go there. `explicit` is False for
    `auto` on a machine without a usable GPU: the backend's command stays as the user wrote it."""

    gpus: tuple[int, ...] = ()
    gpu_layers: int = 0
    explicit: bool = False

    @property
    def device(self) -> str:
        return "gpu:" + ",".join(str(i) for i in self.gpus) if self.gpus else "cpu"


def has_flag(args: tuple[str, ...], *flags: str) -> bool:
    return any(a in flags or any(a.startswith(f + "=") for f in flags if f.startswith("--")) for a in args)


def launch_env(build: str, placement: Placement) -> dict[str, str]:
    """The visibility variable of `build` (cuda, rocm, vulkan) for this placement; nothing for a CPU build."""
    var = VISIBILITY_VARS.get(build)
    if var is None or not placement.explicit:
        return {}
    # An empty list hides every GPU: a `cpu` slot of a GPU build then allocates nothing on any device.
    return {var: ",".join(str(i) for i in placement.gpus)}


def launch_args(placement: Placement, args: tuple[str, ...]) -> list[str]:
    """`-ngl` (and an even `--tensor-split` over several GPUs) for the placement, unless the slot's own
    arguments already say."""
    if not placement.explicit:
        return []
    out = [] if has_flag(args, "-ngl", "--gpu-layers", "--n-gpu-layers") else [
        "-ngl", str(placement.gpu_layers if placement.gpus else 0)]
    if len(placement.gpus) > 1 and not has_flag(args, "-ts", "--tensor-split"):
        # An even split, as the estimate counts it (llama.cpp would split by each device's free memory at start).
        out += ["--tensor-split", ",".join("1" for _ in placement.gpus)]
    return out


__all__ = ["ALL_LAYERS", "DEVICE_PATTERN", "Placement", "launch_args", "launch_env", "requested_gpus",
           "validate_device"]

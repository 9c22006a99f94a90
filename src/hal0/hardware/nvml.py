"""NVML for the whole process: started on first use and kept open, started again after a query fails.

The pressure watcher reads the GPUs every second and the sampler each loaded slot's GPU memory; an `nvmlInit` and
`nvmlShutdown` around every reading cost ~6 ms of CPU and ~11 ms on an H200 host, a reading alone ~0.1 ms.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_started: Any = None


def nvml() -> tuple[Any, str | None]:
    """(pynvml, None) with NVML started, or (None, why there is no NVML)."""
    global _started
    with _lock:
        if _started is not None:
            return _started, None
        try:
            import pynvml
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install 'hal0[gpu]')"
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return None, f"NVML did not start: {exc}"
        _started = pynvml
        return pynvml, None


#: Errors that say a question has no answer on this GPU or for this user, not that the session went bad (a GPU
#: that does not list its processes would otherwise start NVML again at every reading).
_UNANSWERED = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_NOT_FOUND")


def failed(exc: Exception) -> None:
    """A query failed with `exc`: stop NVML, so that the next use starts it again (a driver reloaded, a GPU
    reset), unless the error only says the question has no answer here."""
    global _started
    with _lock:
        if _started is None:
            return
        if getattr(exc, "value", None) in {getattr(_started, name, None) for name in _UNANSWERED}:
            return
        try:
            _started.nvmlShutdown()
        except _started.NVMLError:
            pass
        _started = None

"""NVML for the whole process, over ctypes: started on first use and kept open, started again after a query fails.

The pressure watcher reads the GPUs every second and the sampler each loaded slot's GPU memory; an `nvmlInit` and
`nvmlShutdown` around every reading cost ~6 ms of CPU and ~11 ms on an H200 host, a reading alone ~0.1 ms.

hal0 asks NVML seven things, so it calls the driver's own `libnvidia-ml.so.1` directly rather than through a
binding of all of NVML: nothing to install for an NVIDIA GPU, and ~3 MB less in the API (NVIDIA's `nvidia-ml-py` is
one 8,000-line module; docs/performance.md, ninth and tenth rounds). Signatures and structures are those of
`nvml.h`.
"""

from __future__ import annotations

import ctypes
import threading

from hal0.datatypes import datatype

#: The driver's library; a module attribute so that tests can point it at a stand-in.
LIBRARY = "libnvidia-ml.so.1"

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
_NAME_SIZE = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE
_NOT_AVAILABLE = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE for an unsigned long long


class NvmlError(Exception):
    """A call that did not return NVML_SUCCESS; `value` is its nvmlReturn_t."""

    def __init__(self, value: int, message: str) -> None:
        super().__init__(message)
        self.value = value


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _ProcessInfo(ctypes.Structure):  # nvmlProcessInfo_t (v2 and v3 alike)
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


@datatype(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None where the driver does not account it (NVML_VALUE_NOT_AVAILABLE)


class Nvml:
    """The calls hal0 makes, on a started NVML. Handles are opaque pointers, valid until `shutdown`."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.nvmlErrorString.restype = ctypes.c_char_p
        lib.nvmlErrorString.argtypes = [ctypes.c_int]
        # Drivers before the _v3 call (R470 and older) answer the same question, in the same structure, as _v2.
        self._processes = getattr(lib, "nvmlDeviceGetComputeRunningProcesses_v3", None) \
            or lib.nvmlDeviceGetComputeRunningProcesses_v2

    def _check(self, ret: int) -> None:
        if ret != NVML_SUCCESS:
            raise NvmlError(ret, self._lib.nvmlErrorString(ret).decode(errors="replace"))

    def init(self) -> None:
        self._check(self._lib.nvmlInit_v2())

    def shutdown(self) -> None:
        self._check(self._lib.nvmlShutdown())

    def count(self) -> int:
        n = ctypes.c_uint()
        self._check(self._lib.nvmlDeviceGetCount_v2(ctypes.byref(n)))
        return n.value

    def handle(self, index: int) -> ctypes.c_void_p:
        h = ctypes.c_void_p()
        self._check(self._lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(h)))
        return h

    def memory(self, h: ctypes.c_void_p) -> tuple[int, int, int]:
        """(total, free, used) bytes of the GPU's memory."""
        m = _Memory()
        self._check(self._lib.nvmlDeviceGetMemoryInfo(h, ctypes.byref(m)))
        return m.total, m.free, m.used

    def name(self, h: ctypes.c_void_p) -> str:
        buf = ctypes.create_string_buffer(_NAME_SIZE)
        self._check(self._lib.nvmlDeviceGetName(h, buf, ctypes.c_uint(_NAME_SIZE)))
        return buf.value.decode(errors="replace")

    def processes(self, h: ctypes.c_void_p) -> list[GpuProcess]:
        """The compute processes on the GPU. NVML says how many there are when the array is too small; room for a
        few more is given, since processes can start between the two calls."""
        n = ctypes.c_uint(0)
        ret = self._processes(h, ctypes.byref(n), None)
        if ret == NVML_SUCCESS:
            return []
        if ret != NVML_ERROR_INSUFFICIENT_SIZE:
            self._check(ret)
        n.value = n.value * 2 + 5
        infos = (_ProcessInfo * n.value)()
        self._check(self._processes(h, ctypes.byref(n), infos))
        return [GpuProcess(p.pid, None if p.usedGpuMemory == _NOT_AVAILABLE else p.usedGpuMemory)
                for p in infos[:n.value]]


_lock = threading.Lock()
_started: Nvml | None = None


def nvml() -> tuple[Nvml | None, str | None]:
    """(NVML, None) with NVML started, or (None, why there is no NVML)."""
    global _started
    with _lock:
        if _started is not None:
            return _started, None
        try:
            binding = Nvml(ctypes.CDLL(LIBRARY))
        except OSError as exc:
            return None, f"no NVIDIA driver here ({exc})"
        except AttributeError as exc:
            return None, f"{LIBRARY} lacks a call hal0 needs: {exc}"
        try:
            binding.init()
        except NvmlError as exc:
            return None, f"NVML did not start: {exc}"
        _started = binding
        return binding, None


#: Errors that say a question has no answer on this GPU or for this user, not that the session went bad (a GPU
#: that does not list its processes would otherwise start NVML again at every reading).
_UNANSWERED = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NO_PERMISSION, NVML_ERROR_NOT_FOUND})


def failed(exc: Exception) -> None:
    """A query failed with `exc`: stop NVML, so that the next use starts it again (a driver reloaded, a GPU
    reset), unless the error only says the question has no answer here."""
    global _started
    with _lock:
        if _started is None:
            return
        if getattr(exc, "value", None) in _UNANSWERED:
            return
        try:
            _started.shutdown()
        except NvmlError:
            pass
        _started = None

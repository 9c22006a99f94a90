"""Inventory readers against copies of real files: /proc/meminfo, cgroup v2 memory.max, amdgpu sysfs."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from hal0.hardware.inventory import read_amdgpu, read_host_memory, read_inventory, read_npus, read_nvml
from hal0.hardware.measure import read_nvml_process_memory

# A /proc/meminfo head as the kernel writes it (Documentation/filesystems/proc.rst, "meminfo").
MEMINFO = """MemTotal:       65536000 kB
MemFree:         1024000 kB
MemAvailable:   32768000 kB
Buffers:          102400 kB
Cached:         20480000 kB
"""


def _proc(root: Path, cgroup_line: str = "0::/\n") -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "self" / "cgroup").write_text(cgroup_line)
    return proc


def test_host_memory_comes_from_meminfo_without_a_cgroup_limit(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    cg = tmp_path / "cgroup"
    cg.mkdir()
    (cg / "memory.max").write_text("max\n")
    mem = read_host_memory(proc, cg)
    assert (mem.total_bytes, mem.available_bytes, mem.source) == (65536000 * 1024, 32768000 * 1024, "meminfo")


def test_a_lower_cgroup_memory_max_wins(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/system.slice/hal0.service\n")
    leaf = tmp_path / "cgroup" / "system.slice" / "hal0.service"
    leaf.mkdir(parents=True)
    (leaf.parent / "memory.max").write_text("max\n")
    (leaf / "memory.max").write_text(f"{8 << 30}\n")
    (leaf / "memory.current").write_text(f"{3 << 30}\n")
    mem = read_host_memory(proc, tmp_path / "cgroup")
    assert (mem.total_bytes, mem.available_bytes, mem.source) == (8 << 30, 5 << 30, "cgroup")
    assert mem.meminfo_total_bytes == 65536000 * 1024


# Copies of a Strix Halo APU's amdgpu files: each is one decimal byte count and a newline, as the kernel's amdgpu
# documentation describes them (Documentation/gpu/amdgpu/driver-misc.rst, "mem_info_vram_total",
# "mem_info_gtt_total", ...). Connector entries such as card0-eDP-1 sit beside the cards and are no GPU.
AMDGPU = {
    "mem_info_vram_total": "536870912\n",
    "mem_info_vram_used": "143822848\n",
    "mem_info_gtt_total": "103079215104\n",
    "mem_info_gtt_used": "52428800\n",
    "product_name": "\n",
}


def test_amdgpu_sysfs_gives_vram_and_the_gtt_pool(tmp_path: Path) -> None:
    drm = tmp_path / "class" / "drm"
    dev = drm / "card1" / "device"
    dev.mkdir(parents=True)
    for name, text in AMDGPU.items():
        (dev / name).write_text(text)
    (drm / "card1-eDP-1").mkdir()
    (drm / "card0" / "device").mkdir(parents=True)  # a non-amdgpu card: no mem_info files
    (gpu,) = read_amdgpu(drm)
    assert gpu.vendor == "amd" and gpu.index == 0 and gpu.name == "amdgpu card1"
    assert (gpu.memory_total_bytes, gpu.memory_used_bytes) == (536870912, 143822848)
    assert (gpu.gtt_total_bytes, gpu.gtt_used_bytes) == (103079215104, 52428800)


def test_npus_are_found_by_their_accel_device(tmp_path: Path) -> None:
    (tmp_path / "accel").mkdir()
    (tmp_path / "accel" / "accel0").touch()
    assert read_npus(tmp_path) == [str(tmp_path / "accel" / "accel0")]
    assert read_npus(tmp_path / "none") == []


def test_inventory_says_why_nvml_was_skipped(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    inv = read_inventory(proc_root=proc, sys_root=tmp_path / "sys", dev_root=tmp_path / "dev", nvml=True)
    _, reason = read_nvml()
    if reason is not None:
        assert inv.skipped["nvml"] == reason
        assert inv.gpus == ()
    body = inv.to_dict()
    assert body["memory"]["total_bytes"] == 65536000 * 1024 and body["memory"]["available_bytes"] > 0
    assert body["cpu"]["cores"] >= 1


def test_nvml_lists_the_gpus_where_there_are_some() -> None:
    gpus, reason = read_nvml()
    if reason is not None:
        pytest.skip(f"NVML path not exercised here: {reason}")
    assert gpus and all(g.vendor == "nvidia" and g.memory_total_bytes > 0 for g in gpus)


def test_nvml_is_started_once_and_again_after_a_failure() -> None:
    """One NVML session serves every reading (no init and shutdown each second); after a failed query the next
    reading starts it again."""
    from hal0.hardware import nvml

    first, reason = read_nvml()
    if reason is not None:
        pytest.skip(f"NVML path not exercised here: {reason}")
    started = nvml._started
    assert started is not None
    again, _ = read_nvml()
    assert nvml._started is started and [g.name for g in again] == [g.name for g in first]
    nvml.failed(RuntimeError("a driver that went away"))
    assert nvml._started is None
    after, reason = read_nvml()
    assert reason is None and nvml._started is not None and len(after) == len(first)


@pytest.fixture(scope="module")
def standin_source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The stand-in for libnvidia-ml.so.1 (nvml_standin.c), built with the machine's C compiler: as it is, and as a
    driver from before nvmlDeviceGetComputeRunningProcesses_v3."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the NVML stand-in")
    out = tmp_path_factory.mktemp("nvml")
    built = {}
    for name, flags in (("current", []), ("before_v3", ["-DNO_V3"])):
        built[name] = out / f"libnvidia-ml-{name}.so"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", *flags, "-o", str(built[name]),
                        str(Path(__file__).with_name("nvml_standin.c"))], check=True)
    return built


def _driver(standin_source: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            build: str = "current") -> ctypes.CDLL:
    """A fresh copy of the stand-in (its own counters: a copy is another library to the loader) as hal0's NVML,
    with no session started; the handle lets the test count inits and make calls fail."""
    from hal0.hardware import nvml

    lib = tmp_path / "libnvidia-ml.so.1"
    shutil.copy(standin_source[build], lib)
    monkeypatch.setattr(nvml, "LIBRARY", str(lib))
    monkeypatch.setattr(nvml, "_started", None)
    return ctypes.CDLL(str(lib))


def test_the_gpus_and_their_processes_come_from_the_drivers_library(
        standin_source: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = _driver(standin_source, tmp_path, monkeypatch)
    gpus, reason = read_nvml()
    assert reason is None
    assert [(g.index, g.vendor, g.name, g.memory_total_bytes, g.memory_used_bytes, g.source) for g in gpus] == [
        (0, "nvidia", "NVIDIA H200", 150754820096, 4294967296 + 12345, "nvml"),
        (1, "nvidia", "NVIDIA GeForce RTX 4090", 25757220864, 0, "nvml")]
    # Three processes when asked how many, four when listed (one started in between): all four come back.
    assert read_nvml_process_memory(4000) == {"nvml:0": 1 << 30}
    assert read_nvml_process_memory(4003) == {"nvml:0": 4 << 30}
    assert read_nvml_process_memory(4001) == {}  # the driver does not account it (NVML_VALUE_NOT_AVAILABLE)
    assert read_nvml_process_memory(99) == {}
    assert driver.standin_inits() == 1 and driver.standin_shutdowns() == 0


def test_a_driver_before_the_v3_process_call_is_asked_with_v2(
        standin_source: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _driver(standin_source, tmp_path, monkeypatch, build="before_v3")
    assert read_nvml_process_memory(4000) == {"nvml:0": 1 << 30}


def test_a_failed_query_starts_nvml_again_unless_it_has_no_answer_here(
        standin_source: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hal0.hardware import nvml

    driver = _driver(standin_source, tmp_path, monkeypatch)
    assert read_nvml()[1] is None
    for unanswered in (3, 4, 6):  # not supported, no permission, not found: the session stays
        driver.standin_fail_next(unanswered)
        assert read_nvml_process_memory(4000) == {}
        assert nvml._started is not None and driver.standin_shutdowns() == 0
    driver.standin_fail_next(15)
    gpus, reason = read_nvml()
    assert gpus == [] and reason == "NVML query failed: GPU is lost"
    assert nvml._started is None and driver.standin_shutdowns() == 1
    gpus, reason = read_nvml()
    assert reason is None and len(gpus) == 2 and driver.standin_inits() == 2


def test_without_a_driver_nvml_says_why(standin_source: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from hal0.hardware import nvml

    driver = _driver(standin_source, tmp_path, monkeypatch)
    driver.standin_fail_init(9)
    gpus, reason = read_nvml()
    assert gpus == [] and reason == "NVML did not start: stand-in error 9" and nvml._started is None
    assert read_nvml_process_memory(4000) == {}
    monkeypatch.setattr(nvml, "LIBRARY", str(tmp_path / "absent" / "libnvidia-ml.so.1"))
    gpus, reason = read_nvml()
    assert gpus == [] and reason is not None and reason.startswith("no NVIDIA driver here")
    inv = read_inventory(proc_root=_proc(tmp_path), sys_root=tmp_path / "sys", dev_root=tmp_path / "dev")
    assert inv.skipped["nvml"] == reason and inv.gpus == ()

"""hal0's own supervisor: the pidfile it writes at a spawn is what a later API checks a backend against."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from hal0.providers.base import Command
from hal0.supervisors.embedded import EmbeddedSupervisor, _proc_start_time, _start_time_between


def test_the_pidfile_carries_the_kernels_start_time_of_the_backend(tmp_path: Path) -> None:
    """The start time is taken from the clock around the fork where it can be (see `_start_time_between`):
    it must be exactly what /proc says, or adoption would take the backend for a stranger."""
    supervisor = EmbeddedSupervisor(tmp_path / "state", tmp_path / "logs")
    command = Command((sys.executable, "-c", "import time; time.sleep(30)"), {})

    async def spawn_and_stop() -> tuple[int, int | None, int | None]:
        handle = await supervisor.start("s", command)
        assert handle.pid is not None
        recorded = json.loads((tmp_path / "state" / "s" / "backend.pid").read_text())["start_time"]
        kernel = _proc_start_time(handle.pid)
        status = await supervisor.adopt("s", handle)
        assert status.alive, status
        await supervisor.stop("s", handle, 5)
        return handle.pid, recorded, kernel

    for _ in range(10):
        pid, recorded, kernel = asyncio.run(spawn_and_stop())
        assert recorded == kernel is not None, (pid, recorded, kernel)
    assert not (tmp_path / "state" / "s" / "backend.pid").exists()


def test_a_fork_across_a_clock_tick_is_read_from_proc() -> None:
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert _start_time_between(5 * tick + 1, 5 * tick + tick - 1) == 5
    assert _start_time_between(5 * tick + tick - 1, 6 * tick) is None

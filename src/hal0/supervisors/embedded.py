"""hal0's own supervisor for machines without systemd: backends run detached from the API.

Each backend gets its own session (so an API crash or Ctrl-C never reaches it), a pidfile and a log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from hal0.errors import BackendError, DiskFull, Hal0Error
from hal0.fsio import atomic_write_json
from hal0.providers.base import Command
from hal0.redact import redact_argv
from hal0.supervisors.base import Handle, ProcessStatus, log_due, rotate_log, tail_file
from hal0.supervisors.logwatch import LogWatch


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot): tells a reused pid from ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def _start_time_between(before_ns: int, after_ns: int) -> int | None:
    """The start time `_proc_start_time` reads, for a process forked between two CLOCK_BOOTTIME readings that
    fall in one clock tick: that tick (the kernel stamps a fork with the same clock and shows it floored to
    ticks). None otherwise. Spares reading /proc/PID/stat right after a spawn, which waits for the child's
    exec to finish (~3 ms for llama-server, on the event loop)."""
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return before_ns // tick if before_ns // tick == after_ns // tick else None


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


#: Set in every backend's environment: ties an orphaned backend to its slot when its pidfile is missing.
MARK_ENV = "HAL0_SLOT_STATE"


class EmbeddedSupervisor:
    kind = "embedded"
    spawns_at_once = True

    def __init__(self, state_root: Path, log_dir: Path) -> None:
        self._state_root = state_root
        self._log_dir = log_dir
        # Children of this API process, so their exit codes can be collected.
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, slot: str) -> Path:
        return self._log_dir / "slots" / f"{slot}.log"

    def log_watch(self, slot: str, handle: Handle) -> LogWatch:
        return LogWatch(self.log_path(slot))

    async def trim_log(self, slot: str) -> None:
        # A rotation copies up to LOG_MAX_BYTES: a thread's job, not the event loop's (the stat that tells is not).
        if log_due(self.log_path(slot)):
            await asyncio.to_thread(rotate_log, self.log_path(slot))

    def _pidfile(self, slot: str) -> Path:
        return self._state_root / slot / "backend.pid"

    async def start(self, slot: str, command: Command) -> Handle:
        log_path = self.log_path(slot)
        # A backend never needs hal0's own API keys: keep them out of its environment.
        env = {**{k: v for k, v in os.environ.items() if k != "HAL0_API_KEYS"}, **command.env,
               MARK_ENV: self._mark(slot)}
        if log_due(log_path):  # the copy goes to a thread; the stat that tells does not (a thread hop is ~1 ms)
            await asyncio.to_thread(rotate_log, log_path)
        pidfile = self._pidfile(slot)
        # An empty pidfile first: a start is under way. The slot writes its move to starting after this returns
        # (`spawns_at_once`), so an API that stops in between leaves the next one this to go by (`unrecorded`).
        # One open, not a state write.
        try:
            os.close(_open_in_folder(pidfile, os.O_TRUNC))
        except OSError as exc:
            raise _write_error(slot, "pidfile", pidfile, exc) from exc
        shown = redact_argv(command.argv)
        header = f"\n=== hal0: starting slot {slot} at {time.strftime('%Y-%m-%dT%H:%M:%S')}: {' '.join(shown)}\n"
        try:
            log = os.fdopen(_open_in_folder(log_path, os.O_APPEND), "ab")
        except OSError as exc:
            self._forget(slot)
            raise _write_error(slot, "log", log_path, exc) from exc
        with log:
            try:
                log.write(header.encode())
                log.flush()
            except OSError as exc:
                self._forget(slot)
                raise _write_error(slot, "log", log_path, exc) from exc
            try:
                clock_before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
                proc = subprocess.Popen(  # noqa: ASYNC220 - a detached child, spawned in microseconds
                    command.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True, close_fds=True,
                )
                clock_after = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            except OSError as exc:
                self._forget(slot)
                raise BackendError(
                    f"cannot start the backend of slot {slot}: {exc.strerror or exc}",
                    code="spawn_failed", detail={"argv": shown, "errno": exc.errno},
                ) from exc
        self._children[slot] = proc
        # No fsync: the pidfile only matters while the process lives, and a power cut ends both.
        start_time = _start_time_between(clock_before, clock_after)
        record = {"pid": proc.pid, "start_time": start_time if start_time is not None else _proc_start_time(proc.pid),
                  "argv": shown}
        try:
            atomic_write_json(pidfile, record, durable=False)
        except OSError as exc:
            # A backend without its pidfile could not be told from a stranger by the next API: not kept.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self._forget(slot)
            raise _write_error(slot, "pidfile", pidfile, exc) from exc
        return Handle(pid=proc.pid)

    async def unrecorded(self, slot: str) -> Handle | None:
        if not self._pidfile(slot).exists():  # no start under way, nothing left running: the usual case
            return None
        handle = await self.recorded_handle(slot)  # the pidfile, or (left empty) the backend's mark in /proc
        if handle is not None and self._adopt(slot, handle).alive:
            return handle
        self._forget(slot)
        return None

    async def status(self, slot: str, handle: Handle) -> ProcessStatus:
        return self._status(slot, handle)

    def _status(self, slot: str, handle: Handle) -> ProcessStatus:
        # A poll() and a few reads under /proc (a kernel-made file, answered from memory): no waiting.
        child = self._children.get(slot)
        if child is not None and child.pid == handle.pid:
            code = child.poll()
            if code is None:
                return ProcessStatus(True, child.pid)
            return ProcessStatus(False, child.pid, exit_code=code, detail=_describe_exit(code))
        if handle.pid is None:
            return ProcessStatus(False, None, detail="no process")
        return self._adopt(slot, handle)

    async def adopt(self, slot: str, handle: Handle) -> ProcessStatus:
        return self._adopt(slot, handle)

    def _adopt(self, slot: str, handle: Handle) -> ProcessStatus:
        pid = handle.pid
        if pid is None:
            return ProcessStatus(False, None, detail="no pid recorded")
        state = _proc_state(pid)
        if state is None or state in ("Z", "X"):
            return ProcessStatus(False, pid, detail=f"process {pid} is gone")
        try:
            recorded = json.loads(self._pidfile(slot).read_text())
        except (OSError, ValueError):
            return ProcessStatus(False, pid, detail="pidfile missing or unreadable")
        if recorded.get("pid") != pid or recorded.get("start_time") != _proc_start_time(pid):
            return ProcessStatus(False, pid, detail=f"pid {pid} now belongs to another process")
        return ProcessStatus(True, pid)

    async def recorded_handle(self, slot: str) -> Handle | None:
        # Without a pidfile it walks every process's environment: a thread's job.
        return await asyncio.to_thread(self._recorded_handle, slot)

    def _recorded_handle(self, slot: str) -> Handle | None:
        try:
            pid = json.loads(self._pidfile(slot).read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            pid = self._find_marked(slot)
        return Handle(pid=pid) if isinstance(pid, int) else None

    def _mark(self, slot: str) -> str:
        return str((self._state_root / slot).resolve())

    def _find_marked(self, slot: str) -> int | None:
        """A backend of `slot` whose pidfile was never written (the API died between spawn and pidfile):
        found by the marker in its environment, and given its pidfile back so it can be adopted."""
        wanted = f"{MARK_ENV}={self._mark(slot)}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                leader = os.getpgid(pid) == pid  # the backend itself, not a child it spawned
            except OSError:
                continue
            if wanted in environ and leader and _proc_state(pid) not in (None, "Z", "X"):
                atomic_write_json(self._pidfile(slot), {"pid": pid, "start_time": _proc_start_time(pid),
                                                        "argv": None})
                return pid
        return None

    async def stop(self, slot: str, handle: Handle, timeout: float) -> ProcessStatus:
        status = self._status(slot, handle)
        if not status.alive or handle.pid is None:
            self._forget(slot)
            return status
        pid = handle.pid
        try:
            os.killpg(pid, signal.SIGTERM)
            # A stopped (frozen) process acts on its SIGTERM only once it runs again: as systemd does, SIGCONT
            # follows, so a frozen backend ends now instead of at the SIGKILL after `timeout`.
            os.killpg(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        delay = 0.01
        while time.monotonic() < deadline:
            status = self._status(slot, handle)
            if not status.alive:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while self._status(slot, handle).alive:
                await asyncio.sleep(0.01)
            status = self._status(slot, handle)
            self._forget(slot)
            return ProcessStatus(False, pid, status.exit_code, f"killed (SIGKILL) after {timeout:g}s")
        self._forget(slot)
        if status.exit_code is None:
            # Not our child (adopted): its exit code belongs to init, only the clean stop is known.
            return ProcessStatus(False, pid, None, "stopped (SIGTERM)")
        return status

    def _forget(self, slot: str) -> None:
        self._children.pop(slot, None)
        try:
            self._pidfile(slot).unlink()
        except FileNotFoundError:
            pass

    async def log_tail(self, slot: str, lines: int = 40) -> list[str]:
        return await asyncio.to_thread(tail_file, self.log_path(slot), lines)


def _open_in_folder(path: Path, flags: int) -> int:
    """`path` opened for writing (created if missing, with `flags`); its folder is made only when missing (a
    slot's first start), not with a system call at every start."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | flags, 0o644)


def _write_error(slot: str, what: str, path: Path, exc: OSError) -> Hal0Error:
    """What a start says when the pidfile or the log cannot be written: nothing was left running."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"cannot write the {what} of slot {slot}: {exc.strerror}; free some disk space",
                        detail={"path": str(path)})
    return BackendError(f"cannot write the {what} of slot {slot}: {exc.strerror or exc}", code="spawn_failed",
                        detail={"path": str(path)})


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"

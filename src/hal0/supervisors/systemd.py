"""hal0's systemd supervisor: each slot's backend is an instance of the `hal0-slot@.service` template.

A per-slot drop-in carries the provider's argv and environment; `systemctl` starts, stops and reports the unit and
the journal holds its output. An active unit is alive, never ready: the slot's probe decides readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from hal0.datatypes import datatype
from hal0.errors import BackendError
from hal0.fsio import atomic_write_text
from hal0.providers.base import Command
from hal0.supervisors.base import Handle, LogNews, ProcessStatus
from hal0.supervisors.logwatch import JournalWatch, LogWatch

UNIT_DIR = Path("/etc/systemd/system")
DROPIN_NAME = "10-hal0.conf"
#: Bound on one systemctl/journalctl call; they talk to PID 1 over a local socket and answer in milliseconds.
SYSTEMCTL_TIMEOUT_S = 30.0
_SHOW_PROPERTIES = ("LoadState", "ActiveState", "SubState", "MainPID", "ExecMainCode", "ExecMainStatus",
                    "Result", "NRestarts", "NeedDaemonReload", "InvocationID")
#: States in which the unit's main process exists (with MainPID > 0): the process is alive, maybe not ready.
_LIVE_STATES = frozenset({"active", "activating", "reloading", "deactivating"})
# siginfo si_code values systemd reports as ExecMainCode.
_CLD_EXITED, _CLD_KILLED, _CLD_DUMPED = 1, 2, 3


def unit_name(slot: str) -> str:
    return f"hal0-slot@{slot}.service"


def dropin_path(unit_dir: Path, slot: str) -> Path:
    return unit_dir / f"{unit_name(slot)}.d" / DROPIN_NAME


def _escape(value: str, *, dollars: bool) -> str:
    """`value` as one double-quoted word of a unit file: C escapes, `%%` for specifiers, `$$` where expanded."""
    out = ['"']
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "%":
            out.append("%%")
        elif ch == "$" and dollars:
            out.append("$$")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def quote_exec_argv(argv: Sequence[str]) -> str:
    """An ExecStart= value that systemd splits back into exactly `argv`.

    Every word is double-quoted, which also keeps a lone `;` from being read as a command separator.
    """
    return " ".join(_escape(arg, dollars=True) for arg in argv)


def quote_environment(key: str, value: str) -> str:
    """One Environment= assignment (systemd does not expand `$` there, but does expand `%` specifiers)."""
    return _escape(f"{key}={value}", dollars=False)


def render_dropin(slot: str, command: Command, *, stop_timeout_s: float) -> str:
    """The drop-in that turns the template into slot `slot`'s backend."""
    lines = [
        f"# Written by hal0 for slot {slot}; rewritten when it loads with another command. Do not edit.",
        "[Service]",
        # An empty ExecStart= clears the template's placeholder command.
        "ExecStart=",
        f"ExecStart={quote_exec_argv(command.argv)}",
        f"TimeoutStopSec={max(1, round(stop_timeout_s))}s",
    ]
    lines += [f"Environment={quote_environment(k, v)}" for k, v in sorted(command.env.items())]
    return "\n".join(lines) + "\n"


@datatype(frozen=True, slots=True)
class UnitState:
    """What `systemctl show` says about one unit."""

    load_state: str
    active_state: str
    sub_state: str
    main_pid: int
    exec_main_code: int
    exec_main_status: int
    result: str
    restarts: int
    #: The unit's files on disk differ from what systemd loaded (a drop-in written since): a daemon-reload is due.
    need_daemon_reload: bool = False
    #: This run of the unit, as the journal tags its lines (`_SYSTEMD_INVOCATION_ID`); "" before any run.
    invocation: str = ""

    @classmethod
    def parse(cls, text: str) -> UnitState:
        props: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key] = value

        def num(key: str) -> int:
            try:
                return int(props.get(key, "0") or 0)
            except ValueError:
                return 0

        return cls(props.get("LoadState", ""), props.get("ActiveState", ""), props.get("SubState", ""),
                   num("MainPID"), num("ExecMainCode"), num("ExecMainStatus"), props.get("Result", ""),
                   num("NRestarts"), props.get("NeedDaemonReload") == "yes", props.get("InvocationID", ""))

    @property
    def alive(self) -> bool:
        return self.main_pid > 0 and self.active_state in _LIVE_STATES

    @property
    def exit_code(self) -> int | None:
        """Like Popen.returncode: the exit status, or minus the signal that ended the last main process."""
        if self.exec_main_code == _CLD_EXITED:
            return self.exec_main_status
        if self.exec_main_code in (_CLD_KILLED, _CLD_DUMPED):
            return -self.exec_main_status
        return None

    def describe(self) -> str:
        if self.load_state == "not-found":
            return "unit not found (is hal0-slot@.service installed? run `hal0 setup --systemd`)"
        code = self.exit_code
        if code is None:
            # No main process recorded: systemd has not run the unit since it (re)started, e.g. after a reboot.
            what = ("not run since systemd started (a reboot, or the slot was never loaded)"
                    if self.result in ("", "success") else f"failed ({self.result})")
        elif code >= 0:
            what = f"exited with code {code}"
        else:
            what = f"killed by {_signal_name(-code)}"
            if self.exec_main_code == _CLD_DUMPED:
                what += " (core dumped)"
        notes = {
            "oom-kill": "the kernel's OOM killer ended it",
            "timeout": "systemd timed out waiting for it",
            "start-limit-hit": "systemd stopped restarting it: start limit hit",
            "watchdog": "watchdog timeout",
        }
        if self.result in notes:
            what += f"; {notes[self.result]}"
        if self.sub_state == "auto-restart":
            what += "; systemd will restart it (Restart=on-failure)"
        return what


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


@datatype(frozen=True, slots=True)
class _Ran:
    """What one systemctl/journalctl call returned."""

    returncode: int
    stdout: str
    stderr: str


class SystemdSupervisor:
    """Drives units through `systemctl` and reads the journal through `journalctl`, each call a child process
    awaited on the event loop (never `subprocess.run`: a busy PID 1 would stall every request), bounded by
    `timeout_s` and killed past it."""

    kind = "systemd"
    spawns_at_once = False

    def __init__(
        self,
        unit_dir: Path = UNIT_DIR,
        *,
        stop_timeout_s: float = 10.0,
        systemctl: Sequence[str] = ("systemctl",),
        journalctl: Sequence[str] = ("journalctl",),
        timeout_s: float = SYSTEMCTL_TIMEOUT_S,
    ) -> None:
        """`systemctl`/`journalctl` are command prefixes, so a caller can aim them at another systemd
        (e.g. `nsenter -t PID -a systemctl` for a container); `unit_dir` is where that systemd reads units."""
        self._unit_dir = unit_dir
        self._stop_timeout_s = stop_timeout_s
        self._systemctl = tuple(systemctl)
        self._journalctl = tuple(journalctl)
        self._timeout_s = timeout_s
        #: The run of each slot's unit that `start` began (its InvocationID), for `log_watch`.
        self._invocations: dict[str, str] = {}

    def log_path(self, slot: str) -> Path:
        """Backends log to the journal (`journalctl -u hal0-slot@SLOT`); the nearest file is the drop-in that
        defines the unit's command."""
        return dropin_path(self._unit_dir, slot)

    def log_watch(self, slot: str, handle: Handle) -> LogNews:
        """The lines of the run `start` began, followed in the journal as they come. A run this API did not start
        (one it found loading after a restart) has no watch of its lines: the drop-in, which does not change,
        leaves the probing to its backoff."""
        invocation = self._invocations.get(slot)
        if not invocation:
            return LogWatch(self.log_path(slot))
        return JournalWatch([*self._journalctl, "--follow", "--lines=all", "--output=cat", "--no-pager",
                             f"_SYSTEMD_INVOCATION_ID={invocation}"])

    # -- starting ------------------------------------------------------------------------------------------
    async def start(self, slot: str, command: Command) -> Handle:
        unit = unit_name(slot)
        argv = _absolute_argv(slot, command.argv)
        changed = await asyncio.to_thread(self._write_dropin, slot, Command(argv, dict(command.env)))
        # A daemon-reload re-reads every unit on the machine (140-170 ms in a container with 156 units, more on a
        # full host): only when this slot's drop-in changed, or systemd says its files are newer than what it
        # loaded (a drop-in written by an API that stopped before its reload).
        if changed or (await self._show(unit)).need_daemon_reload:
            await self._systemctl_checked("daemon-reload", what="reload systemd's units")
        # A unit left failed (or at its start limit) by an earlier load must not block this one.
        await self._systemctl_run("reset-failed", unit, what=f"reset {unit}")
        await self._systemctl_checked("restart", unit, what=f"start {unit}", unit=unit)
        state = await self._show(unit)
        self._invocations[slot] = state.invocation
        return Handle(pid=state.main_pid or None, unit=unit)

    def _write_dropin(self, slot: str, command: Command) -> bool:
        """Write the slot's drop-in; whether its text changed (a drop-in that already says this is left alone)."""
        path = dropin_path(self._unit_dir, slot)
        text = render_dropin(slot, command, stop_timeout_s=self._stop_timeout_s)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if path.read_text() == text:
                return False
        try:
            atomic_write_text(path, text, mode=0o644)
        except OSError as exc:
            raise BackendError(
                f"cannot write the systemd drop-in of slot {slot}: {exc.strerror or exc}",
                code="systemd_unit_write_failed",
                detail={"path": str(path), "hint": "the API needs write access to the unit directory "
                        "(run it as the hal0-api.service unit, or choose supervisor = embedded)"},
            ) from exc
        return True

    # -- watching ------------------------------------------------------------------------------------------
    async def status(self, slot: str, handle: Handle) -> ProcessStatus:
        unit = handle.unit or unit_name(slot)
        try:
            state = await self._show(unit)
        except BackendError as exc:
            # Unknown is reported as not alive, with the reason, rather than raised into a watch loop.
            return ProcessStatus(False, handle.pid, detail=exc.message)
        return _process_status(state, handle)

    async def adopt(self, slot: str, handle: Handle) -> ProcessStatus:
        if handle.unit is None:
            return ProcessStatus(False, handle.pid,
                                 detail="recorded without a systemd unit (started by the embedded supervisor)")
        if handle.unit != unit_name(slot):
            return ProcessStatus(False, handle.pid, detail=f"recorded unit {handle.unit} is not this slot's")
        if not dropin_path(self._unit_dir, slot).is_file():
            return ProcessStatus(False, handle.pid, detail=f"{handle.unit} has no hal0 drop-in")
        return await self.status(slot, handle)

    async def unrecorded(self, slot: str) -> Handle | None:
        return None  # the move to starting is written before the unit is started, and names it

    async def recorded_handle(self, slot: str) -> Handle | None:
        if not dropin_path(self._unit_dir, slot).is_file():
            return None
        return Handle(pid=None, unit=unit_name(slot))

    # -- stopping ------------------------------------------------------------------------------------------
    async def stop(self, slot: str, handle: Handle, timeout: float) -> ProcessStatus:
        unit = handle.unit or unit_name(slot)
        state = await self._show(unit)
        if state.load_state == "not-found":
            return _process_status(state, handle)
        # --no-block: the caller's timeout, not the unit's TimeoutStopSec, decides when SIGKILL follows.
        await self._systemctl_checked("stop", "--no-block", unit, what=f"stop {unit}", unit=unit)
        deadline = time.monotonic() + timeout
        killed = False
        delay = 0.01
        while True:
            state = await self._show(unit)
            if state.active_state in ("inactive", "failed") or (
                    state.main_pid == 0 and state.sub_state == "auto-restart"):
                break
            if not killed and time.monotonic() >= deadline:
                await self._systemctl_run("kill", "--signal=SIGKILL", unit, what=f"kill {unit}")
                killed = True
                # After SIGKILL only the kernel's reaping is left; bound it anyway.
                deadline = time.monotonic() + self._timeout_s
            elif killed and time.monotonic() >= deadline:
                raise BackendError(f"{unit} did not stop even after SIGKILL", code="stop_failed",
                                   detail={"unit": unit, "state": state.active_state})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        status = _process_status(state, handle)
        if killed:
            return ProcessStatus(False, status.pid, status.exit_code,
                                 f"{status.detail} (SIGKILL after a {timeout:g}s grace)")
        return status

    # -- logs ----------------------------------------------------------------------------------------------
    async def trim_log(self, slot: str) -> None:
        """Nothing to do: backends log to the journal, which journald keeps within its own limits."""

    async def log_tail(self, slot: str, lines: int = 40) -> list[str]:
        argv = [*self._journalctl, "-u", unit_name(slot), "-n", str(lines), "--no-pager", "-o", "cat"]
        try:
            out = await self._exec(argv, what=f"read the journal of {unit_name(slot)}")
        except BackendError as exc:
            return [f"hal0: cannot read the journal of {unit_name(slot)}: {exc.message}"]
        if out.returncode != 0:
            return [f"hal0: journalctl failed: {out.stderr.strip()}"]
        return out.stdout.splitlines()[-lines:]

    # -- systemctl -----------------------------------------------------------------------------------------
    async def _show(self, unit: str) -> UnitState:
        out = await self._systemctl_checked("show", unit, "--property=" + ",".join(_SHOW_PROPERTIES),
                                            what=f"query {unit}")
        return UnitState.parse(out)

    async def _systemctl_run(self, *args: str, what: str) -> _Ran:
        return await self._exec([*self._systemctl, *args], what=what)

    async def _systemctl_checked(self, *args: str, what: str, unit: str | None = None) -> str:
        """Run `systemctl ARGS`; a non-zero exit raises, with the unit's journal tail when `unit` is given."""
        ran = await self._systemctl_run(*args, what=what)
        if ran.returncode != 0:
            detail: dict[str, object] = {"argv": [*self._systemctl, *args], "returncode": ran.returncode,
                                         "stderr": ran.stderr.strip()}
            if unit is not None:
                detail["log_tail"] = await self.log_tail(unit.split("@", 1)[1].removesuffix(".service"), 30)
            raise BackendError(f"systemctl could not {what}: {ran.stderr.strip()}", code="systemctl_failed",
                               detail=detail)
        return ran.stdout

    async def _exec(self, argv: Sequence[str], *, what: str) -> _Ran:
        """One child process, awaited: its output, or BackendError if it cannot run or outlives `timeout_s`
        (then it is killed and reaped, so no call leaves a process behind)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise BackendError(f"cannot run {argv[0]} to {what}: {exc.strerror or exc}",
                               code="systemctl_failed", detail={"argv": list(argv)}) from exc
        try:
            async with asyncio.timeout(self._timeout_s):
                out, err = await proc.communicate()
        except BaseException as exc:
            # A timeout, or the caller cancelled: either way the child must not outlive the call.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            if isinstance(exc, TimeoutError):
                raise BackendError(f"{argv[0]} did not answer within {self._timeout_s:g}s ({what}); killed it",
                                   code="systemctl_failed", detail={"argv": list(argv)}) from None
            raise
        assert proc.returncode is not None
        return _Ran(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _absolute_argv(slot: str, argv: Sequence[str]) -> tuple[str, ...]:
    """ExecStart= wants an absolute executable; resolve a bare name the way the embedded supervisor's exec would."""
    if not argv:
        raise BackendError(f"slot {slot} has an empty command", code="spawn_failed")
    exe = argv[0]
    if not os.path.isabs(exe):
        found = shutil.which(exe)
        if found is None:
            raise BackendError(f"cannot start the backend of slot {slot}: {exe} not found on PATH",
                               code="spawn_failed", detail={"argv": list(argv)})
        exe = os.path.abspath(found)
    return (exe, *argv[1:])


def _process_status(state: UnitState, handle: Handle) -> ProcessStatus:
    if state.alive:
        detail = ""
        if handle.pid is not None and state.main_pid != handle.pid:
            detail = f"restarted by systemd (pid {handle.pid} -> {state.main_pid}, {state.restarts} restarts)"
        return ProcessStatus(True, state.main_pid, detail=detail)
    # Not run since boot, or stopped by systemd itself (`systemctl stop`, a shutdown: SIGTERM, then exit 0 or by
    # that signal, with Result=success): no failure, the slot is only cold.
    clean = state.load_state != "not-found" and state.result in ("", "success") and (
        state.exit_code is None or state.exit_code in (0, -signal.SIGTERM))
    return ProcessStatus(False, handle.pid, exit_code=state.exit_code, detail=state.describe(), stopped_cleanly=clean)


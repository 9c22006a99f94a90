"""The Supervisor protocol: start, stop and watch one backend process per slot.

A supervisor says whether a process is alive; it never says whether it is ready (the provider's probe does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from hal0.datatypes import datatype
from hal0.providers.base import Command


@datatype(frozen=True, slots=True)
class Handle:
    """How to find a slot's backend again, also from a fresh API process (persisted in state.json)."""

    pid: int | None
    unit: str | None = None


@datatype(frozen=True, slots=True)
class ProcessStatus:
    """What the supervisor knows of a backend process: alive or not, and how it ended."""
    alive: bool
    pid: int | None = None
    #: Known when the process has ended and its status could be collected.
    exit_code: int | None = None
    detail: str = ""
    #: Ended by a clean stop, not a failure (e.g. a unit that systemd stopped at shutdown and has not run since).
    stopped_cleanly: bool = False


class LogNews(Protocol):
    """`async with` it while a backend warms up: `mark()` is where its log stands, `grown(mark, interval, lines)`
    returns once a line past the mark came (with `lines`, one holding one of them) or after `interval`."""

    async def __aenter__(self) -> LogNews: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def mark(self) -> int: ...

    async def grown(self, mark: int, interval: float, lines: tuple[bytes, ...] = ()) -> None: ...


class Supervisor(Protocol):
    """Every method that touches a process, a file or another program is a coroutine: the API's event loop
    never waits on `systemctl`, the journal or a log file. Only `log_path` (a name) is plain."""

    kind: str
    #: `start` returns once the process exists, waiting on no other program: a slot then writes its move to
    #: starting with the pid, after the spawn, and `unrecorded` finds what an API stopped in between left running.
    #: False: the move is written first (a `systemctl start` takes a while, and the unit is found by its name).
    spawns_at_once: bool

    async def start(self, slot: str, command: Command) -> Handle: ...

    async def stop(self, slot: str, handle: Handle, timeout: float) -> ProcessStatus:
        """Graceful stop (SIGTERM), forced after `timeout`; returns the final status."""
        ...

    async def status(self, slot: str, handle: Handle) -> ProcessStatus: ...

    async def adopt(self, slot: str, handle: Handle) -> ProcessStatus:
        """Check a process started by an earlier API process: alive and really the slot's backend."""
        ...

    async def recorded_handle(self, slot: str) -> Handle | None:
        """The supervisor's own record of a slot's backend (pidfile, unit), for a state.json written too
        early to hold it: an API that died right after a start still finds its backend."""
        ...

    async def unrecorded(self, slot: str) -> Handle | None:
        """A live backend of `slot` started by an API that stopped before the slot's record said so (where
        `spawns_at_once`); None, the usual answer, in one look."""
        ...

    def log_path(self, slot: str) -> Path: ...

    def log_watch(self, slot: str, handle: Handle) -> LogNews:
        """What wakes a warming slot's probe when its backend logs a line (see `hal0.supervisors.logwatch`)."""
        ...

    async def log_tail(self, slot: str, lines: int = 40) -> list[str]: ...

    async def trim_log(self, slot: str) -> None:
        """Keep the slot's backend log within its size cap (called now and then while the slot is loaded)."""
        ...


#: A backend log is rotated past this size (llama-server with --verbose writes ~45 KB per request); the
#: rotated files `<slot>.log.1` .. `.N` are kept.
LOG_MAX_BYTES = 16 << 20
LOG_KEEP = 2


def log_due(path: Path, max_bytes: int = LOG_MAX_BYTES) -> bool:
    """Whether `path` is past `max_bytes` and `rotate_log` has work to do (one stat: cheap on the event loop)."""
    try:
        return path.stat().st_size > max_bytes
    except FileNotFoundError:
        return False


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> bool:
    """Rotate `path` if it is past `max_bytes`: copy it to `.1` (older ones shift up to `.keep`), then cut it
    to nothing. Copy-then-truncate, because the backend keeps writing to its open descriptor: it opened the
    log for appending, so its next line lands at the new, empty end. True if it rotated."""
    if not log_due(path, max_bytes):
        return False
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    import shutil  # a rotation is rare; every start imports this module

    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with path.open("r+b") as fh:
        fh.truncate(0)
    return True


def tail_file(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a text file, reading only its end."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            block = min(size, max(4096, lines * 512))
            fh.seek(size - block)
            data = fh.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    return text[-lines:]

"""Waiting for a backend's log to grow: how a warming slot hears that its backend has news.

A backend announces readiness in its log ("model loaded", "all slots are idle"), so the probe that follows a
write finds it up at once instead of waiting out the probing backoff. While the backend already answers that it
is loading, only a write with one of its provider's `ready_lines` in it is news: each probe takes CPU from the
load. inotify wakes the event loop when the file is written; where there is none (another kernel, a log that is
not a file), a stat every millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

#: Without inotify: how often the log's size is looked at.
POLL_S = 0.001
_IN_MODIFY = 0x2
_libc: Any = None


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _inotify(path: Path) -> int | None:
    """An inotify descriptor watching `path` for writes, or None where the kernel or the file does not allow it."""
    global _libc
    try:
        if _libc is None:
            import ctypes  # imported by the first load only: ~2 ms

            _libc = ctypes.CDLL(None, use_errno=True)
        fd = int(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    if int(_libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY)) < 0:
        os.close(fd)
        return None
    return fd


class LogWatch:
    """`async with LogWatch(path) as watch`: `await watch.grown(watch.mark(), interval)` returns when the file's size
    is no longer what it was at the mark, or after `interval`. A supervisor makes one (`Supervisor.log_watch`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._news = asyncio.Event()

    async def __aenter__(self) -> LogWatch:
        self._fd = _inotify(self.path)
        if self._fd is not None:
            asyncio.get_running_loop().add_reader(self._fd, self._drain)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._fd is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fd)
            # Closing an inotify descriptor waits for the kernel's SRCU grace period (10-15 ms seen here), and a
            # load's waiters are released only once the warm-up returns: the close goes to a thread, unawaited.
            loop.run_in_executor(None, os.close, self._fd)
            self._fd = None

    @property
    def inotify(self) -> bool:
        return self._fd is not None

    def mark(self) -> int:
        """Where the log stands now: `grown` waits for news past it."""
        return size_of(self.path)

    def _drain(self) -> None:
        assert self._fd is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._fd, 4096):
                pass
        self._news.set()

    async def grown(self, size: int, interval: float, lines: tuple[bytes, ...] = ()) -> None:
        """Return once the file is no longer `size` bytes, or after `interval`; with `lines`, once what was written
        past `size` holds one of them (a file that shrank, rotated or truncated, counts as news too)."""
        if not lines:
            return await self._grown(size, interval)
        deadline = time.monotonic() + interval
        while (left := deadline - time.monotonic()) > 0:
            await self._grown(size, left)
            now = size_of(self.path)
            if now == size:
                continue  # the interval is up, or a wake for a write already looked at
            if now < size or self._written_since(size, lines):
                return
            size = now

    def _written_since(self, size: int, lines: tuple[bytes, ...]) -> bool:
        """Whether the bytes from `size` on hold one of `lines`, read a line's length back so that one written in
        two pieces is still found."""
        back = max(len(line) for line in lines) - 1
        try:
            with self.path.open("rb") as f:
                f.seek(max(size - back, 0))
                new = f.read()
        except OSError:
            return True
        return any(line in new for line in lines)

    async def _grown(self, size: int, interval: float) -> None:
        if size_of(self.path) != size:
            return
        if self._fd is None:
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(POLL_S, left))
                if size_of(self.path) != size:
                    return
            return
        self._news.clear()
        if size_of(self.path) != size:  # written between the first look and the clear: that wake is gone
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await self._news.wait()


class JournalWatch:
    """The same for a backend that logs to the journal (a systemd unit): `journalctl --follow` on the unit's
    invocation streams its lines, and a mark is the number of lines seen. Where journalctl cannot be run, there is
    no news: the caller's interval (the probing backoff) decides."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lines: list[bytes] = []
        self._news = asyncio.Event()

    async def __aenter__(self) -> JournalWatch:
        try:
            # Its own process group: the stop takes down whatever the command is (a prefix such as nsenter forks
            # journalctl off as a child of its own).
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError:
            return self
        self._reader = asyncio.create_task(self._read(self._proc), name="journal-watch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):  # the warm-up it served never waits on its end
                async with asyncio.timeout(5):
                    await self._proc.wait()

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            self._lines.append(line)
            self._news.set()

    def mark(self) -> int:
        return len(self._lines)

    async def grown(self, mark: int, interval: float, lines: tuple[bytes, ...] = ()) -> None:
        """Return once a line past `mark` came (with `lines`, one holding one of them), or after `interval`."""
        deadline = time.monotonic() + interval
        while True:
            new = self._lines[mark:]
            if new and (not lines or any(want in line for line in new for want in lines)):
                return
            mark += len(new)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._news.clear()
            if len(self._lines) > mark:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._news.wait()

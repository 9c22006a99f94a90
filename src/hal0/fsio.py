"""The one atomic file write: a temp file in the same folder, renamed over the target.

A reader sees the old file or the new one, never half of either; `durable` adds the fsyncs a power cut needs.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("hal0.fsio")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_temp_names = itertools.count()


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new private (0600) file in `path`'s folder, named for this process: what tempfile.mkstemp makes, without
    importing tempfile (and shutil, random, bz2 and lzma with it) into every API start."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_temp_names)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:  # left by a process of this pid before: the next name
            continue


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True, mode: int | None = None) -> None:
    """Replace `path` with `data` in one rename. `durable=False` skips the fsyncs: still never half-written,
    but a power cut may bring back the previous version. `mode` sets the permissions (the temp file starts
    private, 0600), before the rename, so the file is never seen with the wrong ones."""
    try:
        fd, tmp = _temp_beside(path)
    except FileNotFoundError:  # the folder is made by the first write only: a mkdir is a system call each time
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, durable: bool = True, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode(), durable=durable, mode=mode)


def atomic_write_json(path: Path, data: Any, *, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), durable=durable)


def quarantine(path: Path) -> Path:
    """Move a damaged file (or a directory where a file belongs) aside, next to where it was, and say where."""
    target = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{int(time.time())}-{n}")
    os.replace(path, target)
    return target


class WriteFailures:
    """Counts failed writes per channel (state, decisions) and logs each episode once: the first failure after
    a success is logged, the rest only counted, and the next success says the episode ended."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.failing: dict[str, str] = {}
        self._lock = threading.Lock()

    def failed(self, channel: str, message: str) -> None:
        with self._lock:
            self.counts[channel] = self.counts.get(channel, 0) + 1
            first = channel not in self.failing
            self.failing[channel] = message
        if first:
            log.error("%s (further failures are counted, not logged, until a write succeeds)", message)

    def succeeded(self, channel: str) -> None:
        if channel not in self.failing:
            return
        with self._lock:
            message = self.failing.pop(channel, None)
            failed = self.counts.get(channel, 0)
        if message is not None:
            log.warning("writes to %s work again (%d failed in all so far)", channel, failed)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {**{c: n for c, n in self.counts.items()}, "failing": dict(self.failing)}

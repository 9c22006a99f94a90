"""One API per state folder: an exclusive lock taken before adoption, naming the API that holds it.

Two APIs on one folder would both start backends and overwrite each other's pidfiles and state.json.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from hal0.errors import Conflict

LOCK_NAME = "api.lock"


class InstanceLock:
    """Held (flock) for the life of the API process; the file says whose it is. The kernel drops the lock
    when the process ends, however it ends, so a stale file never blocks a restart."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, host: str, port: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise Conflict(
                f"another hal0 API (pid {holder.get('pid', '?')}, serving {holder.get('host', '?')}:"
                f"{holder.get('port', '?')}) already uses the state folder {self.path.parent}; stop it first, "
                "or give this one its own HAL0_HOME", code="api_already_running", detail=holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host, "port": port,
                                  "started": time.time()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}

"""state.json: one slot's persisted lifecycle record, written atomically.

Temp file in the same folder, fsync, rename, fsync the folder: a reader sees the old or the new file, never half.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from hal0.datatypes import datatype
from hal0.errors import DiskFull
from hal0.fsio import WriteFailures, atomic_write_json, quarantine
from hal0.slots.state import SlotState

log = logging.getLogger("hal0.slots")

WriteMode = Literal["fsync", "sync", "behind"]

#: How long a written-behind record may wait for a newer one to replace it. At 0.02 s the writer thread rewrote
#: state.json ~50 times a second under one client's back-to-back requests, each write taking the GIL from the
#: event loop; at 0.1 s the added p50 at c=1 fell by ~0.1 ms (4 paired runs of bench.proxy).
WRITE_BEHIND_DELAY_S = 0.1
#: How soon a written-behind record that failed (a full disk) is tried again.
RETRY_BEHIND_S = 1.0


@datatype(slots=True)
class SlotError:
    """Why a slot is in error: a stable code, a message for people, the details."""
    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@datatype(slots=True)
class SlotRecord:
    """A slot's `state.json`: its state and what the backend in it is (pid, port, model)."""
    name: str
    state: SlotState = SlotState.OFFLINE
    seq: int = 0
    model: str | None = None
    provider: str | None = None
    port: int | None = None
    pid: int | None = None
    unit: str | None = None
    supervisor: str | None = None
    #: Where admission placed the backend ("cpu", "gpu:0", "gpu:0,1"); None before a load.
    device: str | None = None
    reason: str = ""
    since: float = field(default_factory=time.time)
    loaded_at: float | None = None
    error: SlotError | None = None

    def to_dict(self) -> dict[str, Any]:
        # Written by hand: dataclasses.asdict deep-copies recursively and shows up on the request path.
        err = self.error
        return {"name": self.name, "state": str(self.state), "seq": self.seq, "model": self.model,
                "provider": self.provider, "port": self.port, "pid": self.pid, "unit": self.unit,
                "supervisor": self.supervisor, "device": self.device, "reason": self.reason, "since": self.since,
                "loaded_at": self.loaded_at,
                "error": None if err is None else {"code": err.code, "message": err.message,
                                                   "detail": dict(err.detail)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlotRecord:
        err = data.get("error")
        return cls(
            name=str(data["name"]),
            state=SlotState(data["state"]),
            seq=int(data.get("seq", 0)),
            model=data.get("model"),
            provider=data.get("provider"),
            port=data.get("port"),
            pid=data.get("pid"),
            unit=data.get("unit"),
            supervisor=data.get("supervisor"),
            device=data.get("device"),
            reason=str(data.get("reason", "")),
            since=float(data.get("since", 0.0)),
            loaded_at=data.get("loaded_at"),
            error=SlotError(**err) if isinstance(err, dict) else None,
        )


class StateStore:
    """Reads and writes `<slots_state_dir>/<name>/state.json`.

    Every write replaces the file in one rename. Records that must survive a power cut (error, offline, ...)
    are also fsynced; records that describe live processes need not be (a power cut ends the processes too),
    and the moves that only count requests are written behind by one writer thread, so no request waits on
    the disk. The newest record always wins (a write never replaces a newer `seq`); `flush()` waits.
    """

    def __init__(self, root: Path, failures: WriteFailures | None = None) -> None:
        self.root = root
        self.failures = failures or WriteFailures()
        self._write_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}
        self._written: dict[str, int] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hal0-state")
        #: Set by `close`: a record waiting for a newer one to replace it is written at once.
        self._closing = threading.Event()

    def slot_dir(self, name: str) -> Path:
        return self.root / name

    def path(self, name: str) -> Path:
        return self.slot_dir(name) / "state.json"

    def write(self, record: SlotRecord, *, mode: WriteMode = "fsync") -> None:
        """`fsync`: on disk before returning, surviving a power cut. `sync`: replaced before returning (a crash of
        hal0 keeps it) without the fsync. `behind`: by the writer thread, shortly after."""
        data = record.to_dict()
        if mode == "behind":
            with self._pending_lock:
                queued = record.name in self._pending
                self._pending[record.name] = data
            if not queued:
                self._writer.submit(self._write_behind, record.name)
            return
        with self._write_lock:
            with self._pending_lock:
                self._pending.pop(record.name, None)
            self._write_now(record.name, data, durable=mode == "fsync")

    def _write_behind(self, name: str) -> None:
        # A moment's wait lets back-to-back request flips (ready -> serving -> ready) collapse into one write; an API
        # that stops writes at once (its stop waits for this thread).
        self._closing.wait(WRITE_BEHIND_DELAY_S)
        with self._write_lock:
            with self._pending_lock:
                data = self._pending.pop(name, None)
            if data is None or data["seq"] <= self._written.get(name, -1):
                return
            try:
                self._write_now(name, data, durable=False)
            except Exception as exc:  # a thread has no caller to raise to: counted, and retried below
                self.failures.failed("state", f"writing the state of slot {name} failed: {exc}")
                self._retry_later(name, data)

    def _retry_later(self, name: str, data: dict[str, Any]) -> None:
        # A written-behind record that could not be written stays pending and is tried again, so state.json
        # catches up once space returns instead of lagging the API until the next durable write.
        with self._pending_lock:
            if name in self._pending:
                return
            self._pending[name] = data
        timer = threading.Timer(RETRY_BEHIND_S, lambda: self._submit_retry(name))
        timer.daemon = True
        timer.start()

    def _submit_retry(self, name: str) -> None:
        with contextlib.suppress(RuntimeError):  # the writer was shut down: the API is stopping
            self._writer.submit(self._write_behind, name)

    def _write_now(self, name: str, data: dict[str, Any], *, durable: bool) -> None:
        path = self.path(name)
        try:
            try:
                atomic_write_json(path, data, durable=durable)
            except IsADirectoryError:
                # Something made a folder where the record belongs: moved aside like any other corruption.
                moved = quarantine(path)
                log.warning("state.json of slot %s was a directory; moved to %s", name, moved.name)
                atomic_write_json(path, data, durable=durable)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.failures.failed("state", f"cannot write the state of slot {name}: {exc.strerror}")
            raise DiskFull(f"cannot write the state of slot {name}: {exc.strerror}; free some disk space",
                           detail={"path": str(path)}) from exc
        self._written[name] = int(data["seq"])
        self.failures.succeeded("state")

    def flush(self) -> None:
        """Wait until every written-behind record is on disk."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._closing.set()
        self._writer.shutdown(wait=True)

    def read(self, name: str) -> SlotRecord | None:
        """The persisted record, or None. A corrupt file is quarantined, never trusted."""
        path = self.path(name)
        try:
            data = json.loads(path.read_text())
            return SlotRecord.from_dict(data)
        except FileNotFoundError:
            return None
        except IsADirectoryError as exc:
            raise CorruptState(name, quarantine(path), "a directory, not a file") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptState(name, quarantine(path), str(exc)) from exc


class CorruptState(Exception):
    def __init__(self, name: str, quarantined_to: Path, why: str) -> None:
        super().__init__(f"state.json of slot {name} was corrupt ({why}); moved to {quarantined_to.name}")
        self.name = name
        self.quarantined_to = quarantined_to

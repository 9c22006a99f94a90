"""state.json: one slot's persisted lifecycle record, written atomically.

Temp file in the same folder, fsync, rename, fsync the folder: a reader sees the old or the new file, never half.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hal0.errors import DiskFull
from hal0.slots.state import SlotState


@dataclass(slots=True)
class SlotError:
    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SlotRecord:
    name: str
    state: SlotState = SlotState.OFFLINE
    seq: int = 0
    model: str | None = None
    provider: str | None = None
    port: int | None = None
    pid: int | None = None
    unit: str | None = None
    supervisor: str | None = None
    reason: str = ""
    since: float = field(default_factory=time.time)
    loaded_at: float | None = None
    error: SlotError | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out

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
            reason=str(data.get("reason", "")),
            since=float(data.get("since", 0.0)),
            loaded_at=data.get("loaded_at"),
            error=SlotError(**err) if isinstance(err, dict) else None,
        )


def atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    """Reads and writes `<slots_state_dir>/<name>/state.json`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def slot_dir(self, name: str) -> Path:
        return self.root / name

    def path(self, name: str) -> Path:
        return self.slot_dir(name) / "state.json"

    def write(self, record: SlotRecord) -> None:
        try:
            atomic_write_json(self.path(record.name), record.to_dict())
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DiskFull(f"cannot write the state of slot {record.name}: {exc.strerror}; free some disk space",
                           detail={"path": str(self.path(record.name))}) from exc

    def read(self, name: str) -> SlotRecord | None:
        """The persisted record, or None. A corrupt file is quarantined, never trusted."""
        path = self.path(name)
        try:
            data = json.loads(path.read_text())
            return SlotRecord.from_dict(data)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            quarantine = path.with_name(f"state.json.corrupt-{int(time.time())}")
            os.replace(path, quarantine)
            raise CorruptState(name, quarantine, str(exc)) from exc


class CorruptState(Exception):
    def __init__(self, name: str, quarantined_to: Path, why: str) -> None:
        super().__init__(f"state.json of slot {name} was corrupt ({why}); moved to {quarantined_to.name}")
        self.name = name
        self.quarantined_to = quarantined_to

"""Decision records: one per routed request, appended to a rotating JSONL file and published on the bus.

The last records stay in memory for `/api/decisions`; the file keeps the history across restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import deque
from dataclasses import field, fields
from pathlib import Path
from typing import IO, Any

from hal0.datatypes import datatype
from hal0.events import EventBus
from hal0.fsio import WriteFailures
from hal0.slots.manager import Eviction


@datatype(slots=True, compiled_init=True)
class Decision:
    """One routing choice, as logged and streamed: the request, the candidates, the slot, the outcome."""
    request_id: str
    endpoint: str
    model: str | None
    time: float = field(default_factory=time.time)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    slot: str | None = None
    #: The peer (its URL) the request was forwarded to; None when a local slot answered.
    peer: str | None = None
    reason: str = ""
    wait_ms: float = 0.0
    status: int | None = None
    duration_ms: float = 0.0
    outcome: str = ""
    error: dict[str, Any] | None = None
    #: Streamed answers: from the request's arrival to the first event relayed to the client.
    ttft_ms: float | None = None
    #: As the backend's answer reported them (`usage`, else llama-server's `timings`); None where it did not.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: What a record that is not a request carries (an eviction: for which slot, the bytes it needed and freed).
    detail: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        # Field by field (2 us), not dataclasses.asdict (~28 us, a recursive deep copy), once per request. The
        # containers are copied one level: what a request's record holds is built for it and not changed after.
        out = {name: getattr(self, name) for name in _DECISION_FIELDS}
        out["candidates"] = [dict(c) for c in self.candidates]
        for name in ("error", "detail"):
            if out[name] is not None:
                out[name] = dict(out[name])
        return out


_DECISION_FIELDS = tuple(f.name for f in fields(Decision))


class DecisionLog:
    def __init__(self, path: Path, bus: EventBus, max_bytes: int, keep: int = 3, memory: int = 2000,
                 failures: WriteFailures | None = None) -> None:
        self.path = path
        self.failures = failures or WriteFailures()
        #: Lines the file could not take (a full disk), written first by the next write that works.
        self._unwritten: deque[str] = deque(maxlen=memory)
        self._torn = False
        self._bus = bus
        self._max_bytes = max_bytes
        self._keep = keep
        self.recent: deque[dict[str, Any]] = deque(maxlen=memory)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = path.open("a", encoding="utf-8")
        #: The file's size, counted as lines are written (they are ASCII: `json.dumps` escapes the rest), not asked
        #: of the file: `tell` is a flush and a seek on every request.
        self._size = self._fh.tell()
        self._load_tail()

    def _load_tail(self) -> None:
        try:
            with self.path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        self.recent.append(json.loads(line))
                    except ValueError:
                        continue
        except FileNotFoundError:
            pass

    def record(self, decision: Decision) -> None:
        """Keep, publish and append one record. Memory and the bus come first: a file that cannot be written
        (a full disk) never loses a decision for `/api/decisions` or SSE; its lines wait, in order, for space."""
        data = decision.to_dict()
        self.recent.append(data)
        self._bus.publish("decision", data)
        line = json.dumps(data, separators=(",", ":")) + "\n"
        with self._lock:
            self._unwritten.append(line)
            try:
                if self._torn:
                    self._fh.write("\n")
                    self._fh.flush()
                    self._torn = False
                    self._size = self._fh.tell()
                while self._unwritten:
                    self._fh.write(self._unwritten[0])
                    self._fh.flush()
                    self._size += len(self._unwritten.popleft())
                if self._size >= self._max_bytes:
                    self._rotate()
            except OSError as exc:
                self._reopen()
                self.failures.failed("decisions", f"cannot write the decision log {self.path}: "
                                                  f"{exc.strerror or exc}; records are kept in memory")
                return
        self.failures.succeeded("decisions")

    def record_eviction(self, eviction: Eviction) -> None:
        """An unload to make room (or under memory pressure) is a decision too: which slot, for which, why."""
        self.record(Decision(
            request_id=f"evict-{os.urandom(8).hex()}", endpoint="evict", model=eviction.model,
            slot=eviction.slot, reason=eviction.reason, outcome="evicted",
            detail={"for_slot": eviction.for_slot, "message": eviction.message, **eviction.detail}))

    def _reopen(self) -> None:
        # A failed flush leaves the text buffer holding a partial line; a fresh handle starts clean, and a
        # torn line already in the file is skipped by readers (see _load_tail).
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            self._fh = self.path.open("a", encoding="utf-8")
        self._torn = True

    def _rotate(self) -> None:
        self._fh.close()
        for i in range(self._keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fh = self.path.open("a", encoding="utf-8")
        self._size = self._fh.tell()

    def query(self, *, slot: str | None = None, endpoint: str | None = None, outcome: str | None = None,
              limit: int = 100) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for rec in reversed(self.recent):
            if slot and rec.get("slot") != slot:
                continue
            if endpoint and rec.get("endpoint") != endpoint:
                continue
            if outcome and rec.get("outcome") != outcome:
                continue
            out.append(rec)
            if len(out) >= limit:
                break
        return out

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._fh.close()

"""`hal0 top`: a live view of the slots in the terminal (state, model, req/s, TTFT, tokens/s, memory), redrawn from
/api/slots and /api/stats every interval; `q` or Ctrl-C quits, `--once` prints one frame.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from hal0.cli_models import human_bytes
from hal0.datatypes import datatype

if TYPE_CHECKING:
    from hal0.cli_http import ApiClient

#: Rates and quantiles are over this many of the newest complete seconds.
WINDOW_S = 10
COLUMNS = ("SLOT", "STATE", "MODEL", "REQ/S", "TTFT P50", "TOK/S", "IN FLIGHT", "MEMORY")
# Alternate screen, cursor home and clear, hidden cursor: the terminal is left as it was on exit.
_ENTER, _LEAVE, _HOME = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l", "\x1b[H\x1b[2J"


@datatype(frozen=True, slots=True)
class Row:
    slot: str
    state: str
    model: str
    req_per_s: float
    ttft_p50_ms: float | None
    tokens_per_s: float
    in_flight: int
    memory: str

    def cells(self) -> tuple[str, ...]:
        ttft = "—" if self.ttft_p50_ms is None else f"{self.ttft_p50_ms:.1f} ms"
        return (self.slot, self.state, self.model, f"{self.req_per_s:.1f}", ttft, f"{self.tokens_per_s:.1f}",
                str(self.in_flight), self.memory)


def _median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _memory(slot: dict[str, Any]) -> str:
    memory = slot.get("memory") or {}
    measured, estimate = memory.get("measured"), memory.get("estimate")
    if measured:
        return human_bytes(measured.get("total_bytes"))
    if estimate:
        return "~" + human_bytes(estimate.get("total_bytes"))  # not loaded: what it would take
    return "—"


def rows(slots: list[dict[str, Any]], stats: dict[str, Any]) -> list[Row]:
    """One row per slot; rates over the seconds `stats` covers."""
    seconds = max(1, len(stats.get("t") or ()))
    out = []
    for slot in slots:
        series = stats.get("slots", {}).get(slot["name"]) or {}
        p50s = [v for v in series.get("ttft_p50_ms", ()) if v is not None]
        out.append(Row(slot["name"], slot["state"], slot.get("model") or slot.get("config", {}).get("model") or "—",
                       sum(series.get("requests", ())) / seconds, _median(p50s),
                       sum(series.get("completion_tokens", ())) / seconds, int(slot.get("in_flight") or 0),
                       _memory(slot)))
    return out


def current_rows(client: ApiClient) -> list[Row]:
    return rows(client.get("/api/slots")["data"], client.get("/api/stats", params={"seconds": WINDOW_S}))


def frame(client: ApiClient, now: float | None = None) -> str:
    table = [COLUMNS, *(r.cells() for r in current_rows(client))]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [f"hal0 top  {client.base_url}  {stamp}  rates over the last {WINDOW_S} s  (q quits)", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _keys(stream: TextIO) -> Iterator[int | None]:
    """The terminal in cbreak mode (keys arrive one at a time, Ctrl-C still interrupts); restored on exit."""
    if not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    """Wait up to `timeout` for a key; True when it is `q`."""
    if fd is None:
        time.sleep(timeout)
        return False
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return False
        key = os.read(fd, 32)
        if not key or b"q" in key.lower():
            return True
    return False


def cmd_top(args: argparse.Namespace) -> int:
    client: ApiClient = args.client
    out = sys.stdout
    if args.once and getattr(args, "json", False):
        out.write(json.dumps([dataclasses.asdict(r) for r in current_rows(client)], indent=2) + "\n")
        return 0
    if args.once:
        out.write(frame(client))
        return 0
    interval = max(0.2, args.interval)
    with _keys(sys.stdin) as fd:
        out.write(_ENTER)
        try:
            while True:
                text = frame(client)
                out.write(_HOME + text)
                out.flush()
                if _quit_pressed(fd, interval):
                    return 0
        except KeyboardInterrupt:
            return 0
        finally:
            out.write(_LEAVE)
            out.flush()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("top", help="a live view of the slots: state, req/s, TTFT, tokens/s, memory")
    p.add_argument("--once", action="store_true", help="print one frame and exit (with --json: the rows as JSON)")
    p.add_argument("-n", "--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    p.set_defaults(func=cmd_top)

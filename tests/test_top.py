"""`hal0 top` in a real pseudo-terminal against a real API and llama-server: frames show every slot's row with
the numbers /api/stats holds, `q` quits with 0; `--once` prints one frame.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import Hal0, free_port, wait_until

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_FRAME = "\x1b[H\x1b[2J"


def top_rows(frame: str) -> dict[str, list[str]]:
    """Rows of one frame by slot name, cells split on runs of two or more spaces."""
    out = {}
    for line in _ANSI.sub("", frame).splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 8 and cells[0] != "SLOT":
            out[cells[0]] = cells
    return out


class Terminal:
    """A child process with a pty as its controlling terminal (so Ctrl-C there is SIGINT to it), read from the
    master side."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        # faulthandler in the child: a `wait` that times out has it print where every thread is (SIGABRT).
        env = {**env, "PYTHONFAULTHANDLER": "1"}
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: nothing but exec (and never back into pytest)
            try:
                # A terminal's Ctrl-C, whatever pytest was started from: a background job of a shell without job
                # control inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.output = ""
        self.code: int | None = None

    def read_for(self, predicate: Any, timeout: float) -> Any:
        """Read until predicate(frames) is truthy (frames: complete ones, newest last)."""
        deadline = time.monotonic() + timeout
        while True:
            frames = self.output.split(_FRAME)[1:-1]  # the last one may still be arriving
            found = predicate(frames)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such frame within {timeout}s; output: {self.output[-3000:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.output += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    pass

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float) -> int:
        """The child's exit code, reading (and so draining) its output meanwhile. A child still running at the
        deadline is made to show where it is stuck (faulthandler's traceback of every thread, on SIGABRT), and that
        goes into the failure with the state the kernel reports for it."""
        def ended() -> bool:
            with contextlib.suppress(OSError):
                if select.select([self.master], [], [], 0)[0]:
                    self.output += os.read(self.master, 65536).decode(errors="replace")
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
            return pid != 0

        try:
            wait_until(ended, timeout, "hal0 top to exit")
        except AssertionError:
            kernel = {}
            for name in ("stat", "wchan", "stack"):
                with contextlib.suppress(OSError):
                    kernel[name] = Path(f"/proc/{self.pid}/{name}").read_text().strip()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGABRT)
            with contextlib.suppress(AssertionError):
                wait_until(ended, 5, "the child to dump its threads")
            raise AssertionError(f"hal0 top still running {timeout}s after it was asked to exit; kernel: {kernel}; "
                                 f"its output, with the threads' tracebacks: {self.output[-4000:]!r}") from None
        assert self.code is not None
        return self.code

    def close(self) -> None:
        if self.code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.master)


def test_top_shows_each_slots_state_and_rates_live_and_q_quits(hal0: Hal0, model_files: dict[str, Path]) -> None:
    hal0.add_model("tiny", model_files["tiny"])
    hal0.start()
    assert hal0.client.put("/api/slots/primary/model", json={"model": "tiny"}).status_code == 200
    assert hal0.client.post("/api/slots/primary/load").status_code == 200
    completion_tokens = 0
    for i in range(3):
        resp = hal0.client.post("/v1/chat/completions", json={
            "model": "primary", "max_tokens": 8, "messages": [{"role": "user", "content": f"hi {i}"}]})
        assert resp.status_code == 200
        completion_tokens += resp.json()["usage"]["completion_tokens"]
    with hal0.client.stream("POST", "/v1/chat/completions", json={
            "model": "primary", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "stream"}]}) as resp:
        assert resp.status_code == 200
        body = resp.read()
    assert b"[DONE]" in body

    term = Terminal([sys.executable, "-m", "hal0.cli", "top", "--url", hal0.url, "--interval", "0.5"],
                    {**hal0.env, "TERM": "xterm"})
    try:
        def counted(frames: list[str]) -> list[str] | None:
            # Rates cover the newest 10 complete seconds: wait for the frame that has all 4 requests in them.
            for frame in reversed(frames):
                row = top_rows(frame).get("primary")
                if row and row[3] == "0.4":
                    return row
            return None

        row = term.read_for(counted, 30)
        assert row[1] in ("ready", "serving") and row[2] == "tiny"
        stats = hal0.client.get("/api/stats", params={"slot": "primary"}).json()["slots"]["primary"]
        streamed = sum(stats["completion_tokens"]) - completion_tokens
        assert streamed > 0  # the stream's tokens, counted from llama-server's timings
        assert float(row[5]) == round((completion_tokens + streamed) / 10, 1)
        assert row[4].endswith(" ms") and float(row[4].split()[0]) > 0  # the streamed request's first token
        assert row[7].endswith("B")  # measured memory of the loaded backend
        rows = top_rows(term.output.split(_FRAME)[-2])
        assert {"primary", "embed", "stt", "tts"} <= rows.keys()
        assert rows["embed"][1] == "offline" and rows["embed"][3] == "0.0"

        term.send(b"q")
        assert term.wait(10) == 0
        assert term.output.rstrip().endswith("\x1b[?1049l")  # the screen it found is back
    finally:
        term.close()


def test_ctrl_c_quits_top_cleanly(hal0_factory: Any) -> None:
    hal0: Hal0 = hal0_factory(None).start()
    term = Terminal([sys.executable, "-m", "hal0.cli", "top", "--url", hal0.url], {**hal0.env, "TERM": "xterm"})
    try:
        term.read_for(lambda frames: frames and "tts" in top_rows(frames[-1]), 30)
        term.send(b"\x03")  # the terminal turns it into SIGINT for its foreground process
        assert term.wait(10) == 0
        assert "Traceback" not in term.output
    finally:
        term.close()


def test_top_once_prints_one_frame_and_exits(hal0_factory: Any) -> None:
    hal0: Hal0 = hal0_factory(None).start()
    done = subprocess.run([sys.executable, "-m", "hal0.cli", "top", "--once", "--url", hal0.url], env=hal0.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert _FRAME not in done.stdout
    rows = top_rows(done.stdout)
    assert list(rows) == ["primary", "embed", "stt", "tts"]
    assert all(r[1] == "offline" and r[3] == "0.0" and r[4] == "—" for r in rows.values())
    assert "REQ/S" in done.stdout and "TTFT P50" in done.stdout
    done = subprocess.run([sys.executable, "-m", "hal0.cli", "top", "--once", "--json", "--url", hal0.url],
                          env=hal0.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    machine = json.loads(done.stdout)
    assert [r["slot"] for r in machine] == ["primary", "embed", "stt", "tts"]
    assert machine[0] == {"slot": "primary", "state": "offline", "model": "—", "req_per_s": 0.0, "ttft_p50_ms": None,
                          "tokens_per_s": 0.0, "in_flight": 0, "memory": "—"}


def test_top_says_plainly_when_the_api_is_not_there(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "hal0.cli", "top", "--once", "--url",
                           f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HAL0_HOME": str(tmp_path)})
    assert done.returncode == 1
    assert "cannot reach the hal0 API" in done.stderr and "api_unreachable" in done.stderr

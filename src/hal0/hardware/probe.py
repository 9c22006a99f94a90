"""Start a llama-server once to read what it really allocates: its buffer report and its idle RSS.

For the benches and tests that check the estimate, and for measuring a build's baseline; never on the request path.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from hal0.datatypes import datatype
from hal0.hardware.measure import ProcessMemory, parse_buffer_report, read_nvml_process_memory, read_process_memory


@datatype(frozen=True)
class ProbeReport:
    buffers: dict[str, dict[str, int]]  # device -> kind -> bytes, as llama-server printed them
    process: ProcessMemory | None  # once it listens
    gpu_process_bytes: dict[str, int]
    log: str


def probe_llama_server(binary: str | Path, model: Path, args: list[str], port: int, log_path: Path,
                       timeout_s: float = 120.0) -> ProbeReport:
    """Run `binary -m model args` on 127.0.0.1:port until it listens, read its report, stop it."""
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--no-webui", "-lv", "4",
            *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            text = log_path.read_text(errors="replace")
            if "listening on" in text or "server is listening" in text:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}: {text[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server did not listen within {timeout_s}s")
            time.sleep(delay)  # polling a child's log with a deadline; no event to wait on
            delay = min(delay * 1.5, 0.2)
        process = read_process_memory(proc.pid)
        gpu = read_nvml_process_memory(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return ProbeReport(parse_buffer_report(text), process, gpu, text)

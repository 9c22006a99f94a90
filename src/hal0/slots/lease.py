"""A slot's backend, handed out for one request: `async with slot.lease(...) as backend`.

The lease loads a cold slot (single-flight) and waits through warm-up, takes a place in the backend's
concurrency gate, opens the upstream request (with one retry on a stale keep-alive connection), counts the
request as in flight, and reports a backend that stopped answering. The dispatcher resolves, leases and relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType
from typing import TYPE_CHECKING

from hal0.client import HttpClient, HttpError, Response, Timeout
from hal0.datatypes import datatype
from hal0.errors import UpstreamError

if TYPE_CHECKING:
    from hal0.slots.slot import Slot


class HeldAnswers:
    """The requests that run the model a cold load released to its backend as soon as it took requests, standing in
    for the readiness sentinel: `answered` is True once one was answered 200, False once each of them reported that it
    will not be (the probe then sends its own sentinel). Reports of requests released later are not counted."""

    def __init__(self, members: set[object]) -> None:
        self._members = set(members)
        self.answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def report(self, member: object, ok: bool) -> None:
        if member not in self._members or self.answered.done():
            return
        self._members.discard(member)
        if ok or not self._members:
            self.answered.set_result(ok)


@datatype(slots=True)
class ColdStart:
    """A request's wait on a cold slot: when it began, its grace, and the load it waits for."""

    started: float
    grace_s: float
    load: asyncio.Task[None] | None = None

    def left_s(self) -> float:
        return max(0.0, self.grace_s - (time.perf_counter() - self.started))

    def waited_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)


class Lease:
    """One request's hold on a slot's backend. `early=True` lets a request held by a cold load go to the
    backend as soon as it takes requests (with only the readiness sentinel outstanding): it shares the
    backend's first decode, and `open` returns its answer only once the probe passed (the connection is
    closed, which cancels the generation, if the load fails). One that runs the model (`stand_in=True`: a
    completion, a synthesis, streamed or not) may stand in for the sentinel: a 200 for it is as real a run of the
    loaded model as the sentinel's. A stream's head comes with its first token, a plain answer's with its last;
    the probe sends its own sentinel when none was answered in time (`sentinel_or_held`)."""

    def __init__(self, slot: Slot, client: HttpClient, timeout: Timeout, *,
                 grace_s: float, early: bool = False, stand_in: bool = False) -> None:
        self.slot = slot
        self._client = client
        self._timeout = timeout
        self._grace_s = grace_s
        self._early = early
        self._stand_in = early and stand_in
        self.cold: ColdStart | None = None
        #: True when the request went to the backend before its probe passed (see the class docstring).
        self.sent_early = False
        self._stack = contextlib.AsyncExitStack()
        #: The gate taken by the direct path (a settled slot), which needs no exit stack; None on the others.
        self._direct: asyncio.Semaphore | None = None

    @property
    def base_url(self) -> str:
        return self.slot.base_url

    @property
    def label(self) -> str:
        """Who answers, in error messages."""
        return f"backend of slot {self.slot.name}"

    async def __aenter__(self) -> Lease:
        slot = self.slot
        if slot.settled:
            # The common case, taken without the exit stack's bookkeeping: the lease, the request counted in
            # flight, a place in the gate; undone in the reverse order.
            slot.leases += 1
            try:
                slot.begin_request()
            except BaseException:
                slot.release_lease()
                raise
            gate = slot.gate()
            try:
                await gate.acquire()
            except BaseException:
                slot.end_request()
                slot.release_lease()
                raise
            self._direct = gate
            return self
        # Counted from the first moment: a slot whose load just finished is not evictable while its waiters are
        # on their way to the backend (admission looks at `leases`, not only at requests in flight).
        slot.leases += 1
        self._stack.callback(slot.release_lease)
        try:
            if not slot.settled:  # cold, loading, or being adopted after an API restart
                self.cold = cold = ColdStart(time.perf_counter(), self._grace_s)
                if self._early:
                    if self._stand_in:
                        # Said once, whichever way this lease ends; `open` says it first when it was answered.
                        self._stack.callback(slot.held_answer, self, False)
                    cold.load = await slot.until_answering(cold.grace_s, self if self._stand_in else None)
                else:
                    await slot.ensure_loaded(cold.grace_s)
            gate = slot.gate()
            if self.cold is not None and self.cold.load is not None:
                early = slot.early_gate()
                if early.locked():
                    # Only as many go early as the backend decodes at once, so none is queued ahead of the
                    # sentinel; the rest wait for `ready` (and then go at once).
                    slot.held_answer(self, False)
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
        gate = self._direct
        if gate is None:
            await self._stack.__aexit__(exc_type, exc, tb)
            return
        self._direct = None
        gate.release()
        try:
            self.slot.end_request()
        finally:
            self.slot.release_lease()

    async def open(self, method: str, target: str, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> Response:
        """Send the request to the backend (`target` is its path and query) and return the response head."""
        resp = await self._send(method, self.base_url + target, body, headers)
        cold = self.cold
        if cold is not None and cold.load is not None:
            if self._stand_in:
                self.slot.held_answer(self, resp.status == 200)
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

    async def _send(self, method: str, url: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Response:
        try:
            # A stale keep-alive connection (llama-server closes one after a streamed answer without announcing
            # it) is retried by the client on a fresh one; any other failure is a backend that did not answer.
            return await self._client.request(method, url, body=body, headers=headers, timeout=self._timeout)
        except (HttpError, OSError) as exc:
            self.slot.backend_failed()
            raise UpstreamError(
                f"backend of slot {self.slot.name} did not answer: {type(exc).__name__}: {exc}",
                code="backend_unreachable", detail={"slot": self.slot.name, "state": self.slot.state.value},
            ) from exc

"""Prefetch coalescing: identical in-flight idempotent requests share one upstream call.

The shared call runs as its own task, so a waiter that disconnects never cancels it for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Hashable

from hal0.datatypes import datatype


@datatype(frozen=True, slots=True, compiled_init=True)
class BufferedResponse:
    """A whole upstream answer, kept to hand to every waiter of a coalesced request."""
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class Coalescer:
    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Task[BufferedResponse]] = {}

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def run(self, key: Hashable,
                  call: Callable[[], Awaitable[BufferedResponse]]) -> tuple[BufferedResponse, bool]:
        """The response of the one upstream call for `key`, and whether this caller joined an existing one."""
        task = self._inflight.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.ensure_future(call())
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(task), joined

    def _done(self, key: Hashable, task: asyncio.Task[BufferedResponse]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters got it

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

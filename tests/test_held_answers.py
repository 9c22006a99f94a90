"""The probe's last step, `sentinel_or_held`: a held stream answered 200 stands in for the sentinel request, and
the sentinel goes whenever none can (each refused or gone, or none answered in time). Pure asyncio, no backend."""

from __future__ import annotations

import asyncio

from hal0.providers.base import ProbeResult, sentinel_or_held
from hal0.slots.lease import HeldAnswers


class Sentinel:
    def __init__(self, delay: float = 0.0) -> None:
        self.sent = 0
        self.delay = delay

    async def __call__(self) -> ProbeResult:
        self.sent += 1
        await asyncio.sleep(self.delay)
        return ProbeResult(True, "sentinel", 200, "ok")


async def test_a_stream_answered_200_is_the_sentinel() -> None:
    a, b = object(), object()
    held = HeldAnswers({a, b})
    sentinel = Sentinel()
    probe = asyncio.ensure_future(sentinel_or_held(held.answered, sentinel))
    await asyncio.sleep(0)
    held.report(a, False)
    assert not probe.done()  # b may still be answered
    held.report(b, True)
    result = await probe
    assert result.ok and result.message == "a held request was answered"
    assert sentinel.sent == 0


async def test_when_every_held_one_fails_the_sentinel_goes() -> None:
    a, b = object(), object()
    held = HeldAnswers({a, b})
    sentinel = Sentinel()
    probe = asyncio.ensure_future(sentinel_or_held(held.answered, sentinel))
    held.report(a, False)
    held.report(a, False)  # said twice (open, then the lease's exit): counted once
    assert not held.answered.done()
    held.report(b, False)
    result = await probe
    assert result.message == "ok" and sentinel.sent == 1


async def test_reports_of_requests_released_later_are_not_counted() -> None:
    a, late = object(), object()
    held = HeldAnswers({a})
    held.report(late, True)
    held.report(late, False)
    assert not held.answered.done()
    held.report(a, True)
    assert held.answered.result() is True
    held.report(a, False)  # after the verdict: nothing changes
    assert held.answered.result() is True


async def test_a_held_stream_slow_to_answer_is_raced_by_the_sentinel() -> None:
    a = object()
    held = HeldAnswers({a})
    sentinel = Sentinel()
    result = await sentinel_or_held(held.answered, sentinel, wait_s=0.01)
    assert result.message == "ok" and sentinel.sent == 1
    held.report(a, True)  # its answer comes after the verdict: harmless


async def test_the_first_of_the_race_decides() -> None:
    a = object()
    held = HeldAnswers({a})
    sentinel = Sentinel(delay=10)
    probe = asyncio.ensure_future(sentinel_or_held(held.answered, sentinel, wait_s=0.01))
    await asyncio.sleep(0.05)
    assert sentinel.sent == 1
    held.report(a, True)
    result = await asyncio.wait_for(probe, 1)
    assert result.message == "a held request was answered"  # the slow sentinel was cancelled


async def test_nothing_held_sends_the_sentinel() -> None:
    sentinel = Sentinel()
    assert (await sentinel_or_held(None, sentinel)).message == "ok"
    assert sentinel.sent == 1

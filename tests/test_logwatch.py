"""A warming slot's wait for its backend's log to grow: woken by the write itself, not by the end of the wait."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hal0.supervisors.logwatch import LogWatch, size_of

#: Far longer than any test may take: a wait that returns did so because of the write.
FOREVER_S = 3600.0


async def _write_later(path: Path, text: str) -> None:
    await asyncio.sleep(0.05)
    with path.open("a") as fh:
        fh.write(text)


def test_a_write_to_the_log_ends_the_wait_through_inotify(tmp_path: Path) -> None:
    log = tmp_path / "slot.log"
    log.write_text("loading\n")

    async def main() -> None:
        async with LogWatch(log) as watch:
            assert watch.inotify
            size = size_of(log)
            writer = asyncio.create_task(_write_later(log, "model loaded\n"))
            await asyncio.wait_for(watch.grown(size, FOREVER_S), 30)
            await writer
            # Already grown past what the caller saw: no wait at all, and a wait after it sees the next write.
            await asyncio.wait_for(watch.grown(size, FOREVER_S), 1)
            writer = asyncio.create_task(_write_later(log, "all slots are idle\n"))
            await asyncio.wait_for(watch.grown(size_of(log), FOREVER_S), 30)
            await writer

    asyncio.run(main())


def test_without_inotify_the_size_is_polled(tmp_path: Path) -> None:
    log = tmp_path / "later" / "slot.log"  # not there yet: nothing to watch, so polled

    async def main() -> None:
        async with LogWatch(log) as watch:
            assert not watch.inotify
            await watch.grown(size_of(log), 0.01)  # nothing written: returns after the interval
            log.parent.mkdir()
            writer = asyncio.create_task(_write_later(log, "model loaded\n"))
            await asyncio.wait_for(watch.grown(-1, FOREVER_S), 30)
            await writer

    asyncio.run(main())


def test_with_ready_lines_only_a_write_that_holds_one_ends_the_wait(tmp_path: Path) -> None:
    """A loading backend's other lines wake nothing; the one that says it may be up does, also when it comes in two
    writes, and so does a log that was truncated. Without such a line the wait ends with its interval."""
    log = tmp_path / "slot.log"
    log.write_text("loading\n")
    lines = (b"model loaded", b"listening")

    async def main() -> None:
        async with LogWatch(log) as watch:
            size = size_of(log)
            chatter = asyncio.create_task(_write_later(log, "load_tensors: 12 layers\ninit: threadpool\n"))
            waited = asyncio.create_task(watch.grown(size, FOREVER_S, lines))
            await chatter
            await asyncio.sleep(0.2)
            assert not waited.done()  # the loading backend's other lines are not news
            with log.open("a") as fh:
                fh.write("llama_server: model lo")
                fh.flush()
                await asyncio.sleep(0.05)
                assert not waited.done()
                fh.write("aded\n")
            await asyncio.wait_for(waited, 30)
            loop = asyncio.get_running_loop()
            started = loop.time()
            size = size_of(log)
            await asyncio.create_task(_write_later(log, "more chatter\n"))
            await watch.grown(size, 0.3, lines)  # nothing it waits for: over when the interval is
            assert loop.time() - started >= 0.29
            log.write_text("")  # rotated or truncated under it
            await asyncio.wait_for(watch.grown(size, FOREVER_S, lines), 30)

    asyncio.run(main())

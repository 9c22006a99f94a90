"""hal0.eventloop: asyncio and uvloop imported without `ssl`, as `hal0 serve` does, each case in a fresh
interpreter (what a process has imported cannot be undone)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(script: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_event_loop_is_imported_without_ssl_and_ssl_is_still_there_for_whoever_imports_it() -> None:
    assert run("""
        import sys
        from hal0.eventloop import import_without_ssl
        print(import_without_ssl(), "ssl" in sys.modules, "uvloop" in sys.modules)
        import asyncio, uvloop
        loop = uvloop.new_event_loop()
        print(loop.run_until_complete(asyncio.sleep(0, "ran")))
        import http.client, ssl  # what a pull's httpx imports: the real module, TLS and all
        print(ssl.SSLContext.__module__, hasattr(http.client, "HTTPSConnection"))
    """) == ["True", "False", "True", "ran", "ssl", "True"]


def test_a_uvloop_that_reads_more_of_ssl_than_the_stand_in_has_is_imported_with_ssl() -> None:
    assert run("""
        import sys
        import hal0.eventloop
        del hal0.eventloop._UVLOOP_INTS["SSL_ERROR_SYSCALL"]  # the stand-in lacks a name uvloop reads
        print(hal0.eventloop.import_without_ssl(), sys.modules["ssl"].SSLContext.__module__)
        import asyncio, uvloop
        print(uvloop.new_event_loop().run_until_complete(asyncio.sleep(0, "ran")))
    """) == ["False", "ssl", "ran"]


def test_nothing_is_done_where_asyncio_is_imported_already() -> None:
    assert run("""
        import sys
        import asyncio
        from hal0.eventloop import import_without_ssl
        print(import_without_ssl(), "ssl" in sys.modules, asyncio.base_events.ssl is sys.modules["ssl"])
    """) == ["False", "True", "True"]

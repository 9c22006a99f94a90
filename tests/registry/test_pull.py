"""Pulls over real loopback HTTP: resume, verification, coalescing, errors that leave no garbage."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
from pathlib import Path

import pytest

from hal0.errors import (
    ChecksumMismatch,
    InsufficientDisk,
    InvalidRequest,
    ModelNotFound,
    PullInterrupted,
    SourceNotFound,
    SourceUnauthorized,
)
from hal0.registry.pull import PullEvent, Registry, parse_source
from hal0.settings import Settings

from .conftest import FileServer, sha256

SIZE = 256 * 1024


def _leftovers(registry: Registry, ref: str) -> list[str]:
    d = registry.store.model_dir(ref)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


async def test_pull_from_url_verifies_and_installs(registry: Registry, file_server: FileServer) -> None:
    data = file_server.add("m.gguf", SIZE)
    events: list[PullEvent] = []
    manifest = await registry.pull("m", f"{file_server.url}/files/m.gguf", sha256=sha256(data),
                                   on_event=events.append)
    assert manifest.files[0].sha256 == sha256(data) and manifest.size == SIZE
    assert registry.model_path("m").read_bytes() == data
    assert _leftovers(registry, "m") == ["m.gguf", "manifest.json"]
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "progress" in kinds
    last_progress = [e for e in events if e.kind == "progress"][-1]
    assert (last_progress.bytes_done, last_progress.total) == (SIZE, SIZE)
    assert events[-1].manifest is not None and events[-1].manifest["ref"] == "m"


async def test_interrupted_pull_resumes_with_range_and_right_sha(
        registry: Registry, file_server: FileServer) -> None:
    data = file_server.add("big.bin", SIZE)
    file_server.drops_left = 1
    url = f"{file_server.url}/drop/big.bin"
    with pytest.raises(PullInterrupted) as exc:
        await registry.pull("big", url)
    assert exc.value.code == "pull_interrupted"
    # The partial stays for resume; nothing sits under the final name; no manifest.
    assert _leftovers(registry, "big") == ["big.bin.partial"]
    kept = (registry.store.model_dir("big") / "big.bin.partial").stat().st_size
    assert 0 < kept < SIZE

    manifest = await registry.pull("big", url)
    assert file_server.ranges[-1] == f"bytes={kept}-"
    assert manifest.files[0].sha256 == sha256(data)
    assert registry.model_path("big").read_bytes() == data
    assert _leftovers(registry, "big") == ["big.bin", "manifest.json"]


async def test_dropped_connection_is_retried_automatically(
        settings: Settings, file_server: FileServer) -> None:
    data = file_server.add("r.bin", SIZE)
    file_server.drops_left = 1
    reg = Registry(settings, retries=2, retry_delay=0.0)
    try:
        manifest = await reg.pull("r", f"{file_server.url}/drop/r.bin")
    finally:
        await reg.aclose()
    assert manifest.files[0].sha256 == sha256(data)
    assert file_server.requests["/drop/r.bin"] == 2


async def test_concurrent_pulls_of_one_ref_download_once(registry: Registry, file_server: FileServer) -> None:
    data = file_server.add("shared.gguf", SIZE)
    url = f"{file_server.url}/files/shared.gguf"
    results = await asyncio.gather(*(registry.pull("shared", url) for _ in range(5)))
    assert all(r == results[0] for r in results)
    assert file_server.requests["/files/shared.gguf"] == 1
    assert results[0].files[0].sha256 == sha256(data)
    # Pulling again once installed does not touch the network either.
    await registry.pull("shared")
    assert file_server.requests["/files/shared.gguf"] == 1


async def test_a_cancelled_waiter_does_not_cancel_the_shared_download(
        registry: Registry, file_server: FileServer) -> None:
    file_server.add("c.bin", SIZE)
    url = f"{file_server.url}/files/c.bin"
    first = asyncio.create_task(registry.pull("c", url))
    second = asyncio.create_task(registry.pull("c", url))
    await asyncio.sleep(0)
    first.cancel()
    manifest = await second
    assert manifest.size == SIZE and registry.exists("c")


async def test_checksum_mismatch_deletes_the_download(registry: Registry, file_server: FileServer) -> None:
    file_server.add("bad.gguf", SIZE)
    with pytest.raises(ChecksumMismatch) as exc:
        await registry.pull("bad", f"{file_server.url}/lie/bad.gguf")
    assert exc.value.code == "checksum_mismatch" and exc.value.detail["expected"] == "0" * 64
    assert _leftovers(registry, "bad") == []


async def test_explicit_sha256_mismatch_is_caught(registry: Registry, file_server: FileServer) -> None:
    file_server.add("x.gguf", 1000)
    with pytest.raises(ChecksumMismatch):
        await registry.pull("x", f"{file_server.url}/files/x.gguf", sha256="ab" * 32)
    assert _leftovers(registry, "x") == []


@pytest.mark.parametrize("given", ["ab" * 31, "ab" * 32 + "\n", "zz" * 32, "ab" * 33])
def test_a_sha256_that_is_not_64_hex_digits_is_refused_before_anything_starts(registry: Registry,
                                                                               given: str) -> None:
    with pytest.raises(InvalidRequest) as refused:  # not a pull that downloads, then reports a mismatch
        registry.plan("x", "https://example.invalid/x.gguf", sha256=given)
    assert refused.value.code == "invalid_sha256"


async def test_401_and_404_are_clear_and_leave_nothing(registry: Registry, file_server: FileServer) -> None:
    file_server.add("gated.gguf", 1000)
    with pytest.raises(SourceUnauthorized) as unauthorized:
        await registry.pull("gated", f"{file_server.url}/auth/gated.gguf")
    assert unauthorized.value.code == "source_unauthorized"
    with pytest.raises(SourceNotFound) as missing:
        await registry.pull("missing", f"{file_server.url}/files/nope.gguf")
    assert missing.value.code == "source_not_found"
    assert _leftovers(registry, "gated") == [] and _leftovers(registry, "missing") == []
    assert not registry.store.model_dir("gated").exists()


async def test_hf_source_uses_token_and_linked_etag(registry: Registry, file_server: FileServer) -> None:
    data = file_server.add("model-q4.gguf", SIZE)
    manifest = await registry.pull("hfm", "hf:owner/repo/sub/model-q4.gguf")
    assert manifest.files[0].sha256 == sha256(data)
    assert manifest.source == "hf:owner/repo/sub/model-q4.gguf"
    assert file_server.requests["/hf/owner/repo/resolve/main/sub/model-q4.gguf"] == 1
    # The token goes to the hub; the redirect target (another origin in real life) gets whatever httpx sends.
    assert file_server.auth_headers[0] == "Bearer hf_secret"


async def test_failed_pull_reports_error_event_to_watchers(
        registry: Registry, file_server: FileServer) -> None:
    task = registry.start_pull("w", f"{file_server.url}/files/absent.gguf")
    seen = [e async for e in registry.watch("w")]
    with pytest.raises(SourceNotFound):
        await task
    assert seen[-1].kind == "error" and seen[-1].error is not None
    assert seen[-1].error["code"] == "source_not_found"
    # A late watcher still learns how it ended.
    late = [e async for e in registry.watch("w")]
    assert [e.kind for e in late] == ["error"]


async def test_not_enough_disk_is_refused_before_writing(
        registry: Registry, file_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    file_server.add("huge.gguf", SIZE)

    class Usage:
        free = 1024

    # Only disk_usage is consulted before a download: report a nearly full disk.
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: Usage())
    with pytest.raises(InsufficientDisk) as exc:
        await registry.pull("huge", f"{file_server.url}/files/huge.gguf")
    assert exc.value.code == "insufficient_disk"
    assert _leftovers(registry, "huge") == []


async def test_pull_from_local_file_source(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "local.bin"
    src.write_bytes(b"weights" * 100)
    manifest = await registry.pull("local", f"file:{src}")
    assert manifest.files[0].sha256 == sha256(src.read_bytes())


async def test_unknown_ref_without_source_is_not_found(registry: Registry) -> None:
    with pytest.raises(ModelNotFound):
        await registry.pull("not-in-catalog")


def test_source_parsing() -> None:
    src = parse_source("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf")
    assert src.url == ("https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/"
                       "qwen2.5-0.5b-instruct-q4_k_m.gguf")
    assert parse_source("hf:o/r@v1/a/b.gguf", "http://mirror:8000").url == "http://mirror:8000/o/r/resolve/v1/a/b.gguf"
    for bad in ("hf:o/r", "hf:o/../x/y", "http://example.com/x.gguf", "ftp://x/y", "relative/path.gguf",
                "https://example.com/", "https://example.com/..%2f"):
        with pytest.raises(InvalidRequest):
            parse_source(bad)


_OPENED: list[tuple[str, int]] = []
_WATCHED: list[Path] = []


def _record_opens(event: str, args: tuple[object, ...]) -> None:
    # An audit hook stays for the life of the process: it records only while a test names a folder to watch.
    if event == "open" and _WATCHED and isinstance(args[0], str | Path) and str(args[0]).startswith(
            str(_WATCHED[0])):
        _OPENED.append((str(args[0]), threading.get_ident()))


async def test_a_pull_does_its_file_io_off_the_event_loop(registry: Registry, file_server: FileServer) -> None:
    """Writes, hashing and fsyncs of the download, the model's header read and the manifest all happen in worker
    threads: the loop's thread opens no file of the model (a large file's fsync alone takes seconds on a slow
    disk, and every request of the API would wait for it)."""
    data = file_server.add("io.gguf", 9 * (1 << 20) + 123)  # several write batches and a remainder
    if not _WATCHED:
        sys.addaudithook(_record_opens)
    _WATCHED[:] = [registry.store.model_dir("io")]
    _OPENED.clear()
    try:
        manifest = await registry.pull("io", f"{file_server.url}/files/io.gguf", sha256=sha256(data))
    finally:
        _WATCHED.clear()
    assert manifest.files[0].sha256 == sha256(data) and registry.model_path("io").read_bytes() == data
    names = {Path(path).name for path, _ in _OPENED}
    assert "io.gguf.partial" in names and any("manifest.json" in n for n in names), names
    loop_thread = threading.get_ident()
    on_loop = sorted({path for path, thread in _OPENED if thread == loop_thread})
    assert on_loop == [], on_loop


async def test_a_pull_right_after_a_cancelled_one_starts_again_instead_of_sharing_its_cancel(
        registry: Registry, file_server: FileServer) -> None:
    """An unload stops a slot's pull and the next load pulls at once: it must not join the stopped download
    (still writing what it received) and fail with its cancellation, but resume after it."""
    data = file_server.add("c.bin", 32 << 20)
    url = f"{file_server.url}/files/c.bin"
    flowing = asyncio.Event()
    registry.start_pull("c", url, on_event=lambda e: e.bytes_done > 0 and flowing.set())
    await asyncio.wait_for(flowing.wait(), 30)
    assert registry.cancel("c")
    manifest = await asyncio.wait_for(registry.pull("c", url), 60)
    assert manifest.files[0].sha256 == sha256(data)
    assert registry.model_path("c").read_bytes() == data
    assert _leftovers(registry, "c") == ["c.bin", "manifest.json"]

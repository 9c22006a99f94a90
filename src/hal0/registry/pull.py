"""Pulls: fetch model files from Hugging Face, an HTTPS URL or a local file into the store.

A pull downloads to `<file>.partial`, resumes it with HTTP Range, verifies the sha256, then renames;
concurrent pulls of one ref share one download. `Registry` owns the store and the pulls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    # Imported where a pull runs: `hal0 serve` starts (and restarts) without paying for httpx.
    import httpx

from hal0.datatypes import datatype
from hal0.errors import (
    ChecksumMismatch,
    Conflict,
    Hal0Error,
    InvalidRequest,
    ModelNotFound,
    PullError,
    PullInterrupted,
    SourceNotFound,
    SourceUnauthorized,
)
from hal0.registry import catalog
from hal0.registry.store import (
    PARTIAL_SUFFIX,
    Manifest,
    ModelFile,
    ModelStore,
    ensure_free_space,
    sha256_file,
    validate_filename,
    validate_ref,
)
from hal0.settings import Settings, is_loopback

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_CHUNK = 1024 * 1024
#: Downloaded bytes are handed to a worker thread in batches of this size, which appends and hashes them: the
#: event loop only collects chunks. Hashing a batch takes a few ms; the socket's buffers cover the pause.
WRITE_BATCH = 4 * _CHUNK
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

SourceKind = Literal["hf", "url", "file"]
EventKind = Literal["start", "progress", "done", "error"]


@datatype(frozen=True, slots=True)
class Source:
    """Where one file comes from. `url` for hf/url sources, `path` for local files."""

    kind: SourceKind
    spec: str
    filename: str
    url: str | None = None
    path: Path | None = None


def parse_source(spec: str, hf_endpoint: str = DEFAULT_HF_ENDPOINT) -> Source:
    """Parse `hf:owner/repo[@rev]/path/file`, `https://...`, `file:/path` or an absolute path."""
    if spec.startswith("hf:"):
        parts = spec[3:].split("/")
        if len(parts) < 3 or not all(parts) or any(p in (".", "..") for p in parts):
            raise InvalidRequest(f"bad Hugging Face source {spec!r}: want hf:owner/repo/path/to/file",
                                 code="invalid_source")
        owner, repo, rest = parts[0], parts[1], parts[2:]
        repo, _, revision = repo.partition("@")
        url = (f"{hf_endpoint.rstrip('/')}/{quote(owner)}/{quote(repo)}/resolve/"
               f"{quote(revision or 'main', safe='')}/{'/'.join(quote(p) for p in rest)}")
        return Source("hf", spec, validate_filename(rest[-1]), url=url)
    if spec.startswith(("https://", "http://")):
        parsed = urlsplit(spec)
        host = parsed.hostname or ""
        trusted_http = urlsplit(hf_endpoint).hostname == host and hf_endpoint.startswith("http://")
        if parsed.scheme == "http" and not (is_loopback(host) or trusted_http):
            raise InvalidRequest(f"refusing plain-http source {spec!r}: use https", code="invalid_source")
        name = parsed.path.rstrip("/").rsplit("/", 1)[-1]
        if not host or not name:
            raise InvalidRequest(f"source URL {spec!r} names no file", code="invalid_source")
        return Source("url", spec, validate_filename(name), url=spec)
    if spec.startswith("file:") or spec.startswith("/"):
        path = Path(spec.removeprefix("file:")).expanduser()
        if not path.is_absolute():
            raise InvalidRequest(f"local source must be an absolute path: {spec!r}", code="invalid_source")
        return Source("file", spec, validate_filename(path.name), path=path)
    raise InvalidRequest(f"unknown source {spec!r}: use hf:owner/repo/file, an https URL or a file path",
                         code="invalid_source")


@datatype(frozen=True, slots=True)
class PullEvent:
    """One step of a pull, as published on the bus ("pull" topic) and streamed to the CLI."""

    ref: str
    kind: EventKind
    file: str | None = None
    file_index: int = 0
    file_count: int = 0
    bytes_done: int = 0
    total: int | None = None
    rate_bps: float = 0.0
    error: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.kind in ("done", "error")

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "kind": self.kind, "file": self.file, "file_index": self.file_index,
                "file_count": self.file_count, "bytes_done": self.bytes_done, "total": self.total,
                "rate_bps": round(self.rate_bps, 1), "error": self.error, "manifest": self.manifest}


EventCallback = Callable[[PullEvent], None]


@datatype(frozen=True, slots=True)
class PullFile:
    source: Source
    sha256: str | None = None
    size: int | None = None


@datatype(frozen=True, slots=True)
class PullPlan:
    ref: str
    source: str
    files: tuple[PullFile, ...]
    slot_type: str | None = None
    provider: str | None = None


def _linked_sha256(resp: httpx.Response) -> str | None:
    """The sha256 Hugging Face publishes for LFS files, on the resolve response or a redirect before it."""
    for r in (*resp.history, resp):
        raw = str(r.headers.get("x-linked-etag", "")).strip().removeprefix("W/")
        value = raw.strip('"').lower()
        if _SHA256_RE.fullmatch(value):
            return value
    return None


class _Restart(Exception):
    """The partial file cannot be resumed; start over from byte 0."""


class Downloader:
    """Fetches one URL into a `.partial` file with resume and verification; knows nothing of refs."""

    def __init__(self, client: httpx.AsyncClient, *, retries: int = 2, retry_delay: float = 1.0,
                 progress_interval: float = 0.25) -> None:
        self._client = client
        self._retries = retries
        self._retry_delay = retry_delay
        self._interval = progress_interval

    async def fetch(self, url: str, final: Path, *, headers: dict[str, str], expected_sha256: str | None,
                    on_progress: Callable[[int, int | None, float], None]) -> ModelFile:
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        attempt = 0
        while True:
            try:
                size, digest = await self._fetch_once(url, partial, headers, expected_sha256, on_progress)
                break
            except _Restart:
                partial.unlink(missing_ok=True)
            except PullInterrupted:
                if attempt >= self._retries:
                    raise
                attempt += 1
                await asyncio.sleep(self._retry_delay * attempt)
        await asyncio.to_thread(os.replace, partial, final)
        return ModelFile(name=final.name, size=size, sha256=digest)

    async def _fetch_once(self, url: str, partial: Path, headers: dict[str, str], expected: str | None,
                          on_progress: Callable[[int, int | None, float], None]) -> tuple[int, str]:
        import httpx

        offset = _size(partial)
        # Identity encoding: the bytes on disk must be the file itself, and Range offsets count those bytes.
        request_headers = {**headers, "Accept-Encoding": "identity"}
        if offset:
            request_headers["Range"] = f"bytes={offset}-"
        sink = _PartialFile(partial)
        try:
            async with self._client.stream("GET", url, headers=request_headers) as resp:
                total = self._check_response(resp, url, offset)
                if resp.status_code == 200:
                    offset = 0
                expected = expected or _linked_sha256(resp)
                if total is not None:
                    ensure_free_space(partial.parent, total - offset)
                await _in_thread(sink.begin, offset)
                done = offset
                started = time.monotonic()
                last_report = 0.0
                on_progress(done, total, 0.0)
                try:
                    async for chunk in resp.aiter_raw():
                        if sink.add(chunk) >= WRITE_BATCH:
                            await _in_thread(sink.write, False)
                        done += len(chunk)
                        now = time.monotonic()
                        if now - last_report >= self._interval:
                            last_report = now
                            on_progress(done, total, (done - offset) / max(now - started, 1e-6))
                except BaseException:
                    # What arrived stays on the partial for the next attempt (a dropped connection, a cancelled
                    # pull) to resume from.
                    with contextlib.suppress(OSError):
                        await _in_thread(sink.write, False)
                    raise
                # The fsync of a file of gigabytes waits for all of it to reach the disk: seconds, in the thread.
                await _in_thread(sink.write, True)
                elapsed = max(time.monotonic() - started, 1e-6)
                on_progress(done, total, (done - offset) / elapsed)
        except httpx.TransportError as exc:
            # The partial stays: the next attempt resumes from it.
            kept = _size(partial)
            raise PullInterrupted(f"download of {url} failed ({type(exc).__name__}: {exc}); "
                                  f"{kept} bytes kept for resume",
                                  detail={"url": url, "bytes_done": kept}) from exc
        if total is not None and done != total:
            raise PullInterrupted(f"download of {url} ended at {done} of {total} bytes",
                                  detail={"url": url, "bytes_done": done, "total": total})
        actual = sink.digest.hexdigest()
        if expected and actual != expected.lower():
            _discard(partial)
            raise ChecksumMismatch(f"sha256 of {url} is {actual}, expected {expected}; download discarded",
                                   detail={"url": url, "expected": expected, "actual": actual})
        return done, actual

    @staticmethod
    def _check_response(resp: httpx.Response, url: str, offset: int) -> int | None:
        """Raise for error statuses; return the full size of the file when the server says it."""
        status = resp.status_code
        if status in (401, 403):
            raise SourceUnauthorized(
                f"{url} answered {status}: the source needs credentials (set HF_TOKEN for gated repos)",
                detail={"url": url, "status": status})
        if status == 404:
            raise SourceNotFound(f"{url} answered 404: no such file at the source",
                                 detail={"url": url, "status": status})
        if status == 416 and offset:
            raise _Restart()
        if status >= 400 or status not in (200, 206):
            raise PullError(f"{url} answered HTTP {status}", detail={"url": url, "status": status})
        length = resp.headers.get("content-length")
        if status == 206:
            match = _CONTENT_RANGE_RE.match(resp.headers.get("content-range", ""))
            if not match or int(match.group(1)) != offset:
                raise _Restart()
            return None if match.group(3) == "*" else int(match.group(3))
        return int(length) if length and length.isdigit() else None


class _PartialFile:
    """A download's `.partial` file and the sha256 of what it holds. The event loop only `add`s chunks; the
    other methods do file I/O and hashing and run in a worker thread (`_in_thread`), one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self._chunks: list[bytes] = []
        self._held = 0

    def add(self, chunk: bytes) -> int:
        """Hold `chunk` for the next write; returns how many bytes are held."""
        self._chunks.append(chunk)
        self._held += len(chunk)
        return self._held

    def begin(self, offset: int) -> None:
        """Start at `offset`: hash the bytes already on disk before it (so the digest covers the whole file at
        the end), or empty the file when starting over from 0."""
        if not offset:
            with self.path.open("wb"):
                return
        with self.path.open("rb") as fh:
            remaining = offset
            while remaining > 0:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                self.digest.update(chunk)
                remaining -= len(chunk)

    def write(self, durable: bool) -> None:
        """Append and hash the held chunks; with `durable`, fsync the file too."""
        if not self._chunks and not durable:
            return
        chunks, self._chunks, self._held = self._chunks, [], 0
        with self.path.open("ab") as fh:
            for chunk in chunks:
                fh.write(chunk)
                self.digest.update(chunk)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a worker thread, awaited to its end even if the caller is cancelled meanwhile (the
    cancellation is delivered after): a write is never left running under a pull that was stopped."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait([fut])
        raise


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@datatype
class _Flight:
    ref: str
    task: asyncio.Task[Manifest] | None = None
    listeners: set[asyncio.Queue[PullEvent]] = field(default_factory=set)
    on_event: EventCallback | None = None
    last: PullEvent | None = None


class Registry:
    """Installed models, the catalog, and the pulls in flight (single-flight per ref).

    The Registry owns its pull tasks: `aclose()` cancels and awaits them (partials stay for resume).
    """

    def __init__(self, settings: Settings, *, hf_endpoint: str | None = None, hf_token: str | None = None,
                 retries: int = 2, retry_delay: float = 1.0, progress_interval: float = 0.25,
                 timeout: float = 30.0, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else ModelStore(settings.models_dir)
        self.hf_endpoint = (hf_endpoint or DEFAULT_HF_ENDPOINT).rstrip("/")
        self._hf_token = hf_token
        self._retries = retries
        self._retry_delay = retry_delay
        self._interval = progress_interval
        self._timeout = timeout
        self._flights: dict[str, _Flight] = {}
        self._finished: dict[str, PullEvent] = {}

    # -- installed models -------------------------------------------------------------------------------

    def list_models(self) -> list[Manifest]:
        return self.store.list_models()

    def get(self, ref: str) -> Manifest:
        return self.store.get(ref)

    def exists(self, ref: str) -> bool:
        return self.store.exists(ref)

    def model_path(self, ref: str) -> Path:
        """The file a backend loads for `ref` (its first file)."""
        return self.store.primary_path(ref)

    def import_file(self, ref: str, path: Path, *, link: bool = False, slot_type: str | None = None,
                    provider: str | None = None) -> Manifest:
        if validate_ref(ref) in self._flights:
            raise Conflict(f"model {ref!r} is being pulled", code="pull_in_progress", detail={"ref": ref})
        return self.store.import_file(ref, path, link=link, slot_type=slot_type, provider=provider)

    def remove(self, ref: str, in_use: Callable[[str], list[str]]) -> Manifest:
        if validate_ref(ref) in self._flights:
            raise Conflict(f"model {ref!r} is being pulled", code="pull_in_progress", detail={"ref": ref})
        manifest = self.store.remove(ref, in_use)
        self._finished.pop(ref, None)
        return manifest

    # -- pulls ------------------------------------------------------------------------------------------

    def pulling(self) -> list[str]:
        return sorted(self._flights)

    def plan(self, ref: str, source: str | None = None, sha256: str | None = None,
             slot_type: str | None = None, provider: str | None = None) -> PullPlan:
        """What a pull of `ref` would fetch: the given source, else the catalog entry."""
        validate_ref(ref)
        if sha256 is not None and not _SHA256_RE.fullmatch(sha256.lower()):
            raise InvalidRequest(f"sha256 must be 64 hex digits, got {sha256!r}", code="invalid_sha256")
        if source:
            src = parse_source(source, self.hf_endpoint)
            return PullPlan(ref, source, (PullFile(src, sha256.lower() if sha256 else None),),
                            slot_type, provider)
        entry = catalog.lookup(ref)
        if entry is None:
            raise ModelNotFound(f"{ref!r} is not in the catalog; give a source (hf:owner/repo/file or a URL)",
                                detail={"ref": ref})
        files = tuple(PullFile(parse_source(f.source, self.hf_endpoint), f.sha256, f.size)
                      for f in entry.files)
        names = [f.source.filename for f in files]
        if len(set(names)) != len(names):
            raise InvalidRequest(f"catalog entry {ref!r} has two files named alike", code="invalid_source")
        return PullPlan(ref, source=entry.files[0].source if len(files) == 1 else f"catalog:{ref}",
                        files=files, slot_type=slot_type or entry.slot_type,
                        provider=provider or entry.provider)

    def start_pull(self, ref: str, source: str | None = None, *, sha256: str | None = None,
                   slot_type: str | None = None, provider: str | None = None,
                   on_event: EventCallback | None = None) -> asyncio.Task[Manifest]:
        """Start pulling `ref`, or join the pull already in flight. `on_event` is called for every event of
        a pull this call starts (used to publish on the bus once, not once per waiter)."""
        flight = self._flights.get(validate_ref(ref))
        if flight is not None and flight.task is not None:
            return flight.task
        if self.store.exists(ref):
            manifest = self.store.get(ref)
            if source and manifest.source != source:
                raise Conflict(f"model {ref!r} already exists from {manifest.source}; remove it first",
                               code="model_exists", detail={"ref": ref, "source": manifest.source})
            plan = PullPlan(ref, manifest.source, ())
        else:
            plan = self.plan(ref, source, sha256, slot_type, provider)
        flight = _Flight(ref, on_event=on_event)
        self._flights[ref] = flight
        self._finished.pop(ref, None)
        task = asyncio.get_running_loop().create_task(self._run(flight, plan), name=f"pull:{ref}")
        # The outcome also reaches watchers as an event; retrieving it here keeps a pull nobody awaits
        # from being reported as an unretrieved task exception.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        flight.task = task
        return task

    async def pull(self, ref: str, source: str | None = None, *, sha256: str | None = None,
                   slot_type: str | None = None, provider: str | None = None,
                   on_event: EventCallback | None = None) -> Manifest:
        """Pull `ref` (or return it if installed). A cancelled caller does not cancel a shared download."""
        task = self.start_pull(ref, source, sha256=sha256, slot_type=slot_type, provider=provider,
                               on_event=on_event)
        while task.cancelling() and not task.done():
            # A download that was just stopped (an unload) is still writing what it received: let it end, then
            # start again from there, instead of joining it and sharing its cancellation.
            await asyncio.wait([task])
            task = self.start_pull(ref, source, sha256=sha256, slot_type=slot_type, provider=provider,
                                   on_event=on_event)
        return await asyncio.shield(task)

    async def watch(self, ref: str) -> AsyncGenerator[PullEvent, None]:
        """Events of the pull of `ref` in flight, ending with its `done`/`error` event. With no pull in
        flight: the last pull's final event, or `done` when installed; ModelNotFound otherwise."""
        flight = self._flights.get(validate_ref(ref))
        if flight is None:
            final = self._finished.get(ref)
            if final is None:
                final = PullEvent(ref, "done", manifest=self.store.get(ref).to_dict())
            yield final
            return
        queue: asyncio.Queue[PullEvent] = asyncio.Queue()
        flight.listeners.add(queue)
        try:
            if flight.last is not None:
                yield flight.last
                if flight.last.terminal:
                    return
            while True:
                event = await queue.get()
                yield event
                if event.terminal:
                    return
        finally:
            flight.listeners.discard(queue)

    def cancel(self, ref: str) -> bool:
        """Stop the pull of `ref` in flight, if any; its partial files stay for a resume. True if one was."""
        flight = self._flights.get(ref)
        if flight is None or flight.task is None or flight.task.done():
            return False
        flight.task.cancel()
        return True

    async def aclose(self) -> None:
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # -- internals --------------------------------------------------------------------------------------

    def _emit(self, flight: _Flight, event: PullEvent) -> None:
        flight.last = event
        if flight.on_event is not None:
            flight.on_event(event)
        for queue in flight.listeners:
            queue.put_nowait(event)

    async def _run(self, flight: _Flight, plan: PullPlan) -> Manifest:
        ref = plan.ref
        try:
            if self.store.exists(ref):
                manifest = self.store.get(ref)
            else:
                manifest = await self._fetch_all(flight, plan)
        except Hal0Error as exc:
            event = PullEvent(ref, "error", error=exc.to_dict())
            self._finish(flight, event)
            self._tidy(ref)
            raise
        except asyncio.CancelledError:
            self._finish(flight, PullEvent(ref, "error", error={"code": "pull_cancelled",
                                                                "message": f"pull of {ref!r} was cancelled"}))
            raise
        except Exception as exc:
            err = PullError(f"pull of {ref!r} failed: {type(exc).__name__}: {exc}")
            self._finish(flight, PullEvent(ref, "error", error=err.to_dict()))
            self._tidy(ref)
            raise err from exc
        self._finish(flight, PullEvent(ref, "done", file_count=len(manifest.files),
                                       bytes_done=manifest.size, total=manifest.size,
                                       manifest=manifest.to_dict()))
        return manifest

    def _finish(self, flight: _Flight, event: PullEvent) -> None:
        self._emit(flight, event)
        self._finished[flight.ref] = event
        self._flights.pop(flight.ref, None)

    def _tidy(self, ref: str) -> None:
        """After a failed pull leave nothing but resumable partials: drop an empty model folder."""
        directory = self.store.model_dir(ref)
        with contextlib.suppress(OSError):
            directory.rmdir()

    async def _fetch_all(self, flight: _Flight, plan: PullPlan) -> Manifest:
        ref = plan.ref
        directory = self.store.model_dir(ref)
        directory.mkdir(parents=True, exist_ok=True)
        count = len(plan.files)
        known = [f.size for f in plan.files]
        if all(s is not None for s in known):
            remaining = sum(max((s or 0) - _size(directory / (f.source.filename + PARTIAL_SUFFIX)), 0)
                            for s, f in zip(known, plan.files, strict=True)
                            if not (directory / f.source.filename).exists())
            ensure_free_space(directory, remaining)
        self._emit(flight, PullEvent(ref, "start", file_count=count))
        files: list[ModelFile] = []
        import httpx

        timeout = httpx.Timeout(self._timeout, read=max(self._timeout, 60.0))
        async with httpx.AsyncClient(follow_redirects=True, timeout=timeout) as client:
            downloader = Downloader(client, retries=self._retries, retry_delay=self._retry_delay,
                                    progress_interval=self._interval)
            for index, item in enumerate(plan.files):
                files.append(await self._fetch_one(flight, downloader, item, index, count, directory))
        # Reads the GGUF header (a tenth of a second for a large vocabulary) and fsyncs the manifest.
        return await asyncio.to_thread(self.store.finish, ref, plan.source, files, slot_type=plan.slot_type,
                                       provider=plan.provider)

    async def _fetch_one(self, flight: _Flight, downloader: Downloader, item: PullFile, index: int,
                         count: int, directory: Path) -> ModelFile:
        src = item.source
        final = directory / src.filename

        def progress(done: int, total: int | None, rate: float) -> None:
            self._emit(flight, PullEvent(flight.ref, "progress", file=src.filename, file_index=index,
                                         file_count=count, bytes_done=done, total=total, rate_bps=rate))

        if final.exists():
            # Complete and verified before (files are renamed only then); a crash came before the manifest.
            digest = await asyncio.to_thread(sha256_file, final)
            if item.sha256 is None or digest == item.sha256:
                size = final.stat().st_size
                progress(size, size, 0.0)
                return ModelFile(src.filename, size, digest, src.spec)
            await asyncio.to_thread(final.unlink)
        if src.kind == "file":
            assert src.path is not None
            return await asyncio.to_thread(self._copy_local, src, final, item.sha256)
        assert src.url is not None
        headers: dict[str, str] = {}
        if src.kind == "hf" and self._hf_token:
            headers["Authorization"] = f"Bearer {self._hf_token}"
        got = await downloader.fetch(src.url, final, headers=headers, expected_sha256=item.sha256,
                                     on_progress=progress)
        return ModelFile(got.name, got.size, got.sha256, src.spec)

    @staticmethod
    def _copy_local(src: Source, final: Path, expected: str | None) -> ModelFile:
        import shutil

        assert src.path is not None
        if not src.path.is_file():
            raise SourceNotFound(f"no such file: {src.path}", detail={"path": str(src.path)})
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        ensure_free_space(final.parent, src.path.stat().st_size)
        shutil.copyfile(src.path, partial)
        digest = sha256_file(partial)
        if expected and digest != expected:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(f"sha256 of {src.path} is {digest}, expected {expected}",
                                   detail={"expected": expected, "actual": digest})
        os.replace(partial, final)
        return ModelFile(final.name, final.stat().st_size, digest, src.spec)

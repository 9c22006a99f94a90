"""One slot's lifecycle driver: load (single-flight), readiness probing, request accounting, unload.

Every state change goes through `_transition`, which checks the table, writes state.json and publishes an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from hal0.client import HttpClient, HttpError, Timeout
from hal0.datatypes import datatype
from hal0.errors import BackendError, Conflict, DiskFull, Hal0Error, ModelNotFound
from hal0.events import EventBus
from hal0.hardware.placement import Placement
from hal0.kinds import MODEL_LESS_TYPES
from hal0.providers.base import LaunchSpec, Liveness, ProbeResult, Provider, in_flight_limit, parallel
from hal0.redact import redact_argv, redact_env
from hal0.settings import Settings, is_unspecified
from hal0.slots.config import SlotConfig
from hal0.slots.lease import HeldAnswers, Lease
from hal0.slots.memory import SlotMemory
from hal0.slots.state import ACTIVE, LOADED, LOADING, SlotState, check_transition
from hal0.slots.store import SlotError, SlotRecord, StateStore, WriteMode
from hal0.supervisors.base import Handle, ProcessStatus, Supervisor

S = SlotState
log = logging.getLogger("hal0.slots")

#: First probe interval; probing backs off from here while the backend warms up.
PROBE_FIRST_S = 0.005
PROBE_MAX_S = 0.25
PROBE_BACKOFF = 1.5
WATCH_INTERVAL_S = 0.25
#: How often a loaded backend's supervisor is asked about it while a pidfd watches the process (its exit wakes the
#: watch at once): a net under the pidfd, not the way a death is found. Under systemd each ask is a `systemctl
#: show` process (~20 ms), four a second per loaded slot at WATCH_INTERVAL_S.
STATUS_WITH_PIDFD_S = 5.0
#: How soon the supervisor is asked again when the pidfd says the process exited and the supervisor does not yet
#: (systemd reaps it a moment later); doubled each time, up to WATCH_INTERVAL_S.
STATUS_AFTER_EXIT_S = 0.02
#: Liveness of a loaded backend: probed this often, each probe given this long, this many misses in a row
#: mean it hung (so a frozen backend is found within about 4-7 s, with no request needed).
LIVENESS_INTERVAL_S = 1.0
LIVENESS_TIMEOUT_S = 1.5
LIVENESS_FAILURES = 3
_LIVENESS_TIMEOUT = Timeout(total=LIVENESS_TIMEOUT_S)
#: How long the probe of a backend found again after an API restart may take: as long as the liveness watch
#: lets a loaded backend stay silent before it is called unresponsive.
ADOPTION_PROBE_S = LIVENESS_TIMEOUT_S * LIVENESS_FAILURES
#: How often a loaded slot's memory figures (its snapshot's `memory`) are read again.
MEMORY_REFRESH_S = 5.0
#: How long after the move to ready the watch first reads what the backend holds.
FIRST_MEMORY_READ_S = 0.05
LOG_TAIL_LINES = 30


def _write_mode(dst: SlotState) -> WriteMode:
    """How durably a move into `dst` is written. Loaded states are written behind, off the path of the requests
    they release (adoption re-probes the backend anyway). Starting and warming describe a live process: a
    crash of hal0 must find them, a power cut ends the process as well, so no fsync. The rest (error with its
    reason, offline, unloading, pulling) is fsynced."""
    if dst in LOADED:
        return "behind"
    if dst in (SlotState.STARTING, SlotState.WARMING):
        return "sync"
    return "fsync"


def _watch_exit(pid: int | None, *exited: asyncio.Event) -> int | None:
    """Set the `exited` events when process `pid` ends, through a pidfd on the event loop; None where that is not
    to be had (no pid, an old kernel, a process already gone): the watch loop's status check covers those."""
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    loop = asyncio.get_running_loop()

    def on_exit() -> None:
        # Readable stays readable: one wake-up is the news, the status check does the rest.
        for event in exited:
            event.set()
        loop.remove_reader(fd)

    loop.add_reader(fd, on_exit)
    return fd


def _unwatch_exit(pidfd: int | None) -> None:
    """Undo `_watch_exit` (a pidfd that fired has already left the loop)."""
    if pidfd is not None:
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)


class ModelSource(Protocol):
    """Where slots get model files: the registry, seen through the three questions a load asks."""

    def path(self, ref: str) -> Path | None:
        """The file a backend loads for `ref`, or None when it is not installed."""
        ...

    def pullable(self, ref: str) -> bool: ...

    async def pull(self, ref: str) -> Path: ...

    def check(self, ref: str) -> None:
        """Raise ModelChanged if the installed files of `ref` are not what its manifest describes (cheap)."""
        ...

    def cancel_pull(self, ref: str) -> None:
        """Stop the pull of `ref` in flight (its partial files stay for a resume)."""
        ...


@datatype(slots=True)
class SlotContext:
    """What every slot shares: built once by the manager."""

    settings: Settings
    store: StateStore
    bus: EventBus
    supervisor: Supervisor
    providers: Mapping[str, Provider]
    client: HttpClient
    models: ModelSource
    allocate_port: Callable[[Slot], int]
    #: Admission: make room for this slot's load (groups, `max_loaded_slots`, memory) and place it.
    make_room: Callable[[Slot], Awaitable[Placement]]
    #: Estimates and measurements of what each slot's backend holds.
    memory: SlotMemory | None = None


class Slot:
    def __init__(self, config: SlotConfig, record: SlotRecord, ctx: SlotContext) -> None:
        self.config = config
        self.record = record
        self._ctx = ctx
        self._op_lock = asyncio.Lock()
        self._load_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.in_flight = 0
        #: Requests holding a lease on this slot: in flight, or on their way (waiting for a load or a gate).
        self.leases = 0
        self.requests_total = 0
        self._last_activity = time.monotonic()
        self.history: list[dict[str, Any]] = []
        self.last_probe: ProbeResult | None = None
        #: Set while warming once the backend takes requests and only the probe's sentinel is outstanding.
        self._answering = asyncio.Event()
        #: Streamed requests waiting for that, each of which may stand in for the sentinel (`HeldAnswers`), and
        #: those the probe released last.
        self._stand_ins: set[object] = set()
        self._held: HeldAnswers | None = None
        #: The probe of a loaded backend found again after an API restart (`adopt`), while it runs: the API serves
        #: meanwhile, and requests for this slot join it as they join a load (`settled`).
        self._adoption: asyncio.Task[None] | None = None
        #: Wakes the watch for an immediate status check (the backend's pidfd turned readable, or a request
        #: found it refusing connections).
        self._wake = asyncio.Event()
        self._gate: tuple[int, asyncio.Semaphore, asyncio.Semaphore] | None = None
        #: The `memory` figures of the snapshot: the estimate at the move to ready, then what the backend holds,
        #: read by the watch FIRST_MEMORY_READ_S later and every MEMORY_REFRESH_S while loaded (off the request
        #: path, where reading /proc on every serving/ready move would cost), so SSE carries them.
        self.memory: dict[str, Any] | None = None
        #: The record as state.json last has it, while a move made in memory waits for its write (the move to
        #: starting, written with the pid right after the spawn: see `_start_and_warm`).
        self._persisted: SlotRecord | None = None
        #: The config as snapshots show it (secrets masked), made once per config: a config is frozen, and every
        #: request's two moves (ready -> serving -> ready) put it in the events they publish.
        self._config_view: tuple[SlotConfig, dict[str, Any]] | None = None

    # -- views ---------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> SlotState:
        return self.record.state

    @property
    def settled(self) -> bool:
        """Loaded, with no adoption probe outstanding: a request goes straight to the backend. Otherwise it joins
        the load or the adoption (`until_answering`, `ensure_loaded`)."""
        return self.record.state in LOADED and self._adoption is None

    @property
    def last_activity(self) -> float:
        return self._last_activity

    @property
    def base_url(self) -> str:
        host = self.config.host or "127.0.0.1"
        if is_unspecified(host):
            host = "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{self.record.port}"

    def snapshot(self) -> dict[str, Any]:
        record = self.record
        state = record.state
        rec = record.to_dict()
        view = self._config_view
        if view is None or view[0] is not self.config:
            config = self.config.to_dict()
            config["args"], config["env"] = redact_argv(config["args"]), redact_env(config["env"])
            self._config_view = view = (self.config, config)
        rec["config"] = dict(view[1])
        rec["type"] = self.config.type
        rec["in_flight"] = self.in_flight
        rec["requests_total"] = self.requests_total
        rec["memory"] = self.memory
        # True while the probe of a backend adopted after an API restart runs (its requests wait for it).
        rec["adopting"] = self._adoption is not None
        rec["uptime_s"] = (time.time() - record.loaded_at) if (record.loaded_at and state in LOADED) else None
        if state is S.OFFLINE and not self.config.model and self.config.type not in MODEL_LESS_TYPES:
            rec["reason"] = rec["reason"] or "no model assigned"
        return rec

    # -- transitions ---------------------------------------------------------------------------------
    # The record has one owner: every change of it, a move of state (`_transition`) or of a field alone
    # (`_update`), goes through `_commit`, which writes state.json and publishes the event, so neither misses one.
    def _transition(self, dst: SlotState, reason: str = "", *, write: bool = True, **changes: Any) -> None:
        """Move to `dst`. `write=False` makes the move in memory and publishes it, and the next commit writes it
        (until then `_persisted` keeps what state.json holds): for the move to starting, whose write would
        otherwise stand between a cold request and the spawn of its backend."""
        check_transition(self.record.state, dst)
        self._commit(dst, reason, changes, write=write)

    def _update(self, reason: str, **changes: Any) -> None:
        """Fields of the record change, its state does not (a port allocated, the pid of a spawned or adopted
        backend): written and published like a transition, as a `changed` event that names the fields."""
        rec = self.record
        changes = {k: v for k, v in changes.items() if getattr(rec, k) != v}
        if changes or self._persisted is not None:
            self._commit(None, reason, changes)

    def _commit(self, dst: SlotState | None, reason: str, changes: dict[str, Any], *, write: bool = True) -> None:
        rec = self.record
        src = rec.state
        mode = _write_mode(dst if dst is not None else src)
        # A record written behind cannot fail here (the writer thread retries it): no copy to roll back to.
        before = None if write and mode == "behind" and self._persisted is None else dataclasses.replace(rec)
        if not write and self._persisted is None:
            self._persisted = before
        rec.seq += 1
        if dst is not None:
            rec.state = dst
            rec.since = time.time()
            rec.reason = reason
            if dst is not S.ERROR:
                rec.error = None
            if dst in (S.OFFLINE, S.ERROR):
                self.memory = None
        for key, value in changes.items():
            setattr(rec, key, value)
        if write:
            try:
                # See _write_mode: only what a power cut should not erase waits for an fsync.
                self._ctx.store.write(rec, mode=mode)
            except DiskFull:
                # Not persisted means not happened: memory keeps agreeing with state.json, also about a move
                # already published but not yet written, which is published again as what it is now.
                persisted, self._persisted = self._persisted, None
                assert before is not None
                seq = rec.seq
                for f in dataclasses.fields(rec):
                    setattr(rec, f.name, getattr(persisted or before, f.name))
                if persisted is not None:
                    rec.seq = seq  # the events' numbers never go back
                    self._ctx.bus.publish("slot", {"slot": self.name, "event": "changed", "changed": ["state"],
                                                   "seq": rec.seq, "time": time.time(),
                                                   "reason": f"not written: {reason}", "record": self.snapshot()})
                raise
            self._persisted = None
        entry: dict[str, Any]
        if dst is None:
            entry = {"slot": self.name, "event": "changed", "changed": sorted(changes), "seq": rec.seq,
                     "time": time.time(), "reason": reason}
        else:
            # str(), not .value: a StrEnum's value is itself, and `.value` is two Python calls through enum's property.
            entry = {"slot": self.config.name, "from": str(src), "to": str(dst), "seq": rec.seq, "time": rec.since,
                     "reason": reason}
            self.history.append(entry)
            del self.history[:-100]
        event = dict(entry)
        event["record"] = self.snapshot()
        self._ctx.bus.publish("slot", event)

    async def _fail(self, code: str, message: str, *, exit_code: int | None = None,
                    probe: ProbeResult | None = None, extra: dict[str, Any] | None = None) -> None:
        last = probe or self.last_probe
        detail: dict[str, Any] = {
            "exit_code": exit_code,
            "log_tail": await self._ctx.supervisor.log_tail(self.name, LOG_TAIL_LINES),
            "probe": last.to_dict() if last else None,
        }
        if extra:
            detail.update(extra)
        self._transition(S.ERROR, message, error=SlotError(code, message, detail))

    # -- loading ---------------------------------------------------------------------------------------
    def start_load(self) -> asyncio.Task[None]:
        """Start a load, or join the one under way: N callers, one backend process."""
        if self._load_task is None or self._load_task.done():
            ref = self.config.model
            if not ref and self.config.type not in MODEL_LESS_TYPES:
                raise Conflict(
                    f"slot {self.name} has no model assigned; assign one with "
                    f"`hal0 slot assign {self.name} REF`", code="no_model",
                )
            if ref and self._ctx.models.path(ref) is None and not self._ctx.models.pullable(ref):
                raise ModelNotFound(
                    f"model {ref!r} of slot {self.name} is not installed and not in the catalog; "
                    f"`hal0 model pull {ref} --source ...` or `hal0 model import {ref} FILE`",
                    detail={"ref": ref, "slot": self.name},
                )
            self._answering.clear()
            self._load_task = asyncio.create_task(self._load(), name=f"load:{self.name}")
        return self._load_task

    async def ensure_loaded(self, timeout: float) -> bool:
        """Wait until the slot serves; load it if cold. True when this call had to wait for a load."""
        if self.settled:
            return False
        await self.join_load(self.start_load(), timeout)
        return True

    async def until_answering(self, timeout: float, stand_in: object = None) -> asyncio.Task[None] | None:
        """Load the slot if cold, and return as soon as its backend takes requests: once the readiness probe
        found it up, before its sentinel request. Returns the load task then (None if the slot is already
        loaded): a request sent to the backend now shares its first decode instead of queueing behind the
        sentinel, but its sender must `join_load` the task, and release nothing of the answer, until the probe
        passed and the slot is ready. A `stand_in` (a token of a request that runs the model) may replace the
        sentinel: its sender then reports with `held_answer`, once, whether the backend answered it 200. A slot
        being adopted is waited for the same way: its probe is the load."""
        if self.settled:
            return None
        task = self.start_load()
        answering = asyncio.ensure_future(self._answering.wait())
        if stand_in is not None:
            self._stand_ins.add(stand_in)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait((task, answering), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise self._cold_boot_timeout(timeout) from None
        finally:
            answering.cancel()
            self._stand_ins.discard(stand_in)
        if task.done():
            await self.join_load(task, timeout)
            return None
        return task

    def _release_held(self) -> asyncio.Future[bool] | None:
        """The probe's `answering`: wake the held requests; the answer of one of the stand-ins among them will do
        for the sentinel (see `sentinel_or_held`)."""
        self._held = HeldAnswers(self._stand_ins) if self._stand_ins else None
        self._answering.set()
        return None if self._held is None else self._held.answered

    def held_answer(self, stand_in: object, ok: bool) -> None:
        """A stand-in's report: answered 200 (`ok`), or it will not be (refused, failed, gone)."""
        if self._held is not None:
            self._held.report(stand_in, ok)

    def _cold_boot_timeout(self, timeout: float) -> BackendError:
        return BackendError(
            f"slot {self.name} is still {self.state.value} after the cold-boot grace of {timeout:g}s",
            code="cold_boot_timeout", detail={"state": self.state.value},
        )

    async def join_load(self, task: asyncio.Task[None], timeout: float) -> None:
        """Wait for a load under way; raise the slot's error if it did not end ready."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)
        except TimeoutError:
            raise self._cold_boot_timeout(timeout) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise
            # The load itself was cancelled (an unload or a config change came in): say so, do not crash.
            raise Conflict(f"the load of slot {self.name} was cancelled by a later unload or change",
                           code="load_cancelled", detail={"state": self.state.value}) from None
        if self.state not in LOADED:
            raise self.error_exception()

    def error_exception(self) -> BackendError:
        err = self.record.error
        if err is None:
            return BackendError(f"slot {self.name} is {self.state.value}", code="slot_not_ready")
        return BackendError(f"slot {self.name} failed to load: {err.message}", code=err.code,
                            detail={"slot": self.name, **err.detail})

    async def _load(self) -> None:
        async with self._op_lock:
            if self.state in LOADED:
                return
            if self.state in (S.STARTING, S.WARMING) and self.record.pid:
                # Adopted mid-load from an earlier API process: keep probing the same backend.
                await self._warm(Handle(self.record.pid, self.record.unit), time.monotonic())
                return
            await self._start_and_warm()

    async def _start_and_warm(self) -> None:
        cfg = self.config
        # A slot without a model is an rpc worker (MODEL_LESS_TYPES): the main llama-server sends it the tensors.
        model_path = self._ctx.models.path(cfg.model) if cfg.model else Path(os.devnull)
        if model_path is None:
            assert cfg.model is not None
            self._transition(S.PULLING, f"pulling model {cfg.model}", model=cfg.model, provider=cfg.provider,
                             pid=None)
            try:
                model_path = await self._ctx.models.pull(cfg.model)
            except asyncio.CancelledError:
                # An unload or a new model cancelled this load: the download stops with it (the registry's
                # pull is shielded from its waiters, so it is cancelled by name), and the slot is offline.
                self._ctx.models.cancel_pull(cfg.model)
                self._transition(S.OFFLINE, f"pull of {cfg.model} cancelled; the partial download is kept "
                                 "and resumes on the next load")
                raise
            except Hal0Error as exc:
                await self._fail(exc.code, f"pull of {cfg.model} failed: {exc.message}", extra=exc.detail)
                return
        try:
            if cfg.model:
                self._ctx.models.check(cfg.model)
        except Hal0Error as exc:
            self._transition(S.STARTING, "load requested", model=cfg.model, provider=cfg.provider, pid=None,
                             supervisor=self._ctx.supervisor.kind)
            await self._fail(exc.code, exc.message, extra=exc.detail)
            return
        try:
            placement = await self._ctx.make_room(self)
        except Hal0Error as exc:
            if self.state is S.PULLING:
                await self._fail(exc.code, exc.message, extra=exc.detail)
                return
            raise
        provider = self._ctx.providers.get(cfg.provider)
        # The port is taken just before the move to starting and recorded with it: no write of its own (a state
        # write costs ~2 ms on ext4), and the next slot to load sees it taken. A refusal is reported from starting.
        port: int | None = None
        refused: Hal0Error | None = None
        if provider is not None and cfg.type in provider.slot_types:
            try:
                port = self._ctx.allocate_port(self)
            except Hal0Error as exc:
                refused = exc
        # Where the supervisor spawns at once, the move to starting is written with the backend's pid, right
        # after the spawn: a state write before it is ~0.8 ms of a cold request's first token (a write after a
        # quiet spell, on ext4). The supervisor's own mark covers an API that stops in between (`unrecorded`).
        self._transition(S.STARTING, f"load requested (on {placement.device})", model=cfg.model,
                         provider=cfg.provider, pid=None, supervisor=self._ctx.supervisor.kind,
                         device=placement.device, write=not self._ctx.supervisor.spawns_at_once,
                         **({} if port is None else {"port": port}))
        if provider is None:
            await self._fail("provider_unavailable",
                             f"provider {cfg.provider!r} is not available in this hal0 installation")
            return
        if cfg.type not in provider.slot_types:
            await self._fail("provider_mismatch", f"provider {provider.name} cannot serve {cfg.type} slots")
            return
        if port is None:
            assert refused is not None
            await self._fail(refused.code, refused.message, extra=refused.detail)
            return
        try:
            command = provider.command(LaunchSpec(
                slot=self.name, slot_type=cfg.type, model_path=model_path, port=port,
                host=cfg.host or "127.0.0.1", ctx_size=cfg.ctx_size, extra_args=cfg.args, env=dict(cfg.env),
                rpc=cfg.rpc, placement=placement,
            ))
            if cfg.rpc:
                await self._check_workers()
            handle = await self._ctx.supervisor.start(self.name, command)
        except Hal0Error as exc:
            await self._fail(exc.code, exc.message, extra=exc.detail)
            return
        started = time.monotonic()
        try:
            self._update(f"backend started (pid {handle.pid}{f', unit {handle.unit}' if handle.unit else ''})",
                         pid=handle.pid, unit=handle.unit)
        except DiskFull:
            # A backend its record does not know would outlive every unload: stop it (the slot is back to what
            # state.json says, see `_commit`).
            await self._ctx.supervisor.stop(self.name, handle, self._ctx.settings.stop_timeout_s)
            raise
        await self._warm(handle, started)

    async def _warm(self, handle: Handle, started: float) -> None:
        """Probe adaptively until ready, dead, or out of warm-up budget."""
        provider = self._ctx.providers[self.config.provider]
        budget = self.config.warmup_budget_s or self._ctx.settings.warmup_budget_s
        self.last_probe = None
        # A backend announces readiness in its log: the next probe follows a write to it at once, instead of
        # waiting out the backoff (see `LogWatch`). A process a pidfd watches is alive until the pidfd fires: the
        # supervisor is asked about it only then (under systemd each ask is a `systemctl show`, ~20 ms, before
        # every probe and again before the move to ready).
        exited = asyncio.Event()
        pidfd = _watch_exit(handle.pid, exited)
        try:
            await self._probe_until_ready(handle, provider, budget, started, exited, pidfd is None)
        finally:
            _unwatch_exit(pidfd)

    async def _probe_until_ready(self, handle: Handle, provider: Provider, budget: float, started: float,
                                 exited: asyncio.Event, unwatched: bool) -> None:
        interval = PROBE_FIRST_S
        async with self._ctx.supervisor.log_watch(self.name, handle) as news:
            while True:
                if unwatched or exited.is_set():
                    status = await self._ctx.supervisor.status(self.name, handle)
                    if not status.alive:
                        await self._died(status, provider)
                        return
                # Taken before the probe: a line the backend logs while the probe is in flight is news too.
                log_mark = news.mark()
                probe = await provider.probe(self._ctx.client, self.base_url, self.config.type,
                                             answering=self._release_held)
                self.last_probe = probe
                if self.state is S.STARTING and (probe.ok or probe.stage != "connect"):
                    self._transition(S.WARMING, "backend process is up; waiting for its probe")
                if probe.ok:
                    if unwatched or exited.is_set():
                        status = await self._ctx.supervisor.status(self.name, handle)
                        if not status.alive:
                            await self._died(status, provider)
                            return
                    self._last_activity = time.monotonic()
                    if self._ctx.memory is not None:
                        # What it holds is read by the watch, once the requests this load releases are on their way.
                        self.memory = self._ctx.memory.view(self, measure=False)
                    self._transition(S.READY, f"probe passed after {time.monotonic() - started:.3f}s",
                                     loaded_at=time.time())
                    self._ensure_watch()
                    return
                if time.monotonic() - started > budget:
                    await self._ctx.supervisor.stop(self.name, handle, self._ctx.settings.stop_timeout_s)
                    await self._fail("warmup_timeout",
                                     f"backend did not pass its readiness probe within {budget:g}s "
                                     f"(last probe: {probe.stage} {probe.status or ''} {probe.message})".strip(),
                                     probe=probe)
                    return
                # A backend that answers "loading" is probed again when its log says it may be up (or the
                # backoff is over), not after every line it logs.
                await news.grown(log_mark, interval, provider.ready_lines if probe.loading else ())
                interval = min(interval * PROBE_BACKOFF, PROBE_MAX_S)

    async def _died(self, status: ProcessStatus, provider: Provider) -> None:
        if status.stopped_cleanly and self.state in LOADED:
            # Stopped by its supervisor on purpose (`systemctl stop`, a shutdown): cold, not failed.
            self._transition(S.UNLOADING, f"backend stopped by its supervisor ({status.detail})")
            self._transition(S.OFFLINE, f"backend stopped by its supervisor ({status.detail})", pid=None,
                             loaded_at=None)
            return
        tail = await self._ctx.supervisor.log_tail(self.name, LOG_TAIL_LINES)
        why = provider.explain_failure(status.exit_code, tail)
        await self._fail("backend_exited", f"backend {status.detail or 'exited'}: {why}", exit_code=status.exit_code)

    # -- unloading -------------------------------------------------------------------------------------
    async def unload(self, reason: str = "unload requested") -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        async with self._op_lock:
            if self.state not in ACTIVE:
                if self.state is S.ERROR:
                    await self._stop_process()
                    self._transition(S.OFFLINE, "error acknowledged", pid=None)
                return
            # Under the lock, UNLOADING is an unload left unfinished (e.g. its last write failed): finish it.
            if self.state is not S.UNLOADING:
                self._transition(S.UNLOADING, reason)
            status = await self._stop_process()
            self._transition(S.OFFLINE, f"{reason}; backend {status.detail or 'stopped'}".rstrip("; "),
                             pid=None, loaded_at=None)

    async def _stop_process(self) -> ProcessStatus:
        handle = Handle(self.record.pid, self.record.unit)
        if handle.pid is None and handle.unit is None:
            return ProcessStatus(False)
        return await self._ctx.supervisor.stop(self.name, handle, self._ctx.settings.stop_timeout_s)

    async def restart(self) -> None:
        await self.unload("restart requested")
        await self.start_load()

    # -- adoption ----------------------------------------------------------------------------------------
    async def adopt(self) -> None:
        """Take over whatever an earlier API process left: a live backend is kept, a dead one explained. A loaded
        backend's probe is started here and runs on while the API serves (`_reprobe`)."""
        rec = self.record
        if rec.state is S.PULLING:
            self._transition(S.OFFLINE, "pull interrupted by an API restart")
            return
        if rec.state not in ACTIVE:
            await self._stop_unrecorded()
            return
        handle = Handle(rec.pid, rec.unit)
        if handle.pid is None and handle.unit is None:
            recorded = await self._ctx.supervisor.recorded_handle(self.name)
            if recorded is not None:
                handle = recorded
        status = await self._ctx.supervisor.adopt(self.name, handle)
        if status.alive and status.pid and handle.pid is None:
            handle = Handle(status.pid, handle.unit)
        self._update("backend found again after an API restart", pid=handle.pid, unit=handle.unit)
        if rec.state is S.UNLOADING:
            if status.alive:
                await self._ctx.supervisor.stop(self.name, handle, self._ctx.settings.stop_timeout_s)
            self._transition(S.OFFLINE, "unload finished after an API restart", pid=None)
            return
        if not status.alive and status.stopped_cleanly:
            # Stopped, not crashed (a reboot stopped the unit cleanly): nothing failed, the slot is cold.
            self._transition(S.UNLOADING, f"backend stopped while the API was down ({status.detail})")
            self._transition(S.OFFLINE, f"backend stopped while the API was down ({status.detail})", pid=None,
                             loaded_at=None)
            return
        if not status.alive:
            await self._fail("backend_gone", f"backend of slot {self.name} ended while the API was down "
                             f"({status.detail})")
            return
        if rec.state in LOADING:
            self.start_load()
            return
        # A loaded backend: the API serves from here on, while its probe runs as the slot's load. Requests join it
        # (`settled`) and may go to the backend alongside its sentinel, their answers held until it passed, as in a
        # cold load's warm-up; an unload cancels it.
        self._answering.clear()
        self._adoption = self._load_task = asyncio.create_task(self._reprobe(handle, rec.state),
                                                              name=f"adopt:{self.name}")

    async def _reprobe(self, handle: Handle, recorded: SlotState) -> None:
        """The adoption's probe of a loaded backend. It gets the time the liveness watch would give it, not a load's
        probe timeout: a backend frozen while the API was down must not hold its requests for half a minute."""
        try:
            async with self._op_lock:
                provider = self._ctx.providers.get(self.config.provider)
                probe = None
                if provider is not None:
                    try:
                        async with asyncio.timeout(ADOPTION_PROBE_S):
                            probe = await provider.probe(self._ctx.client, self.base_url, self.config.type,
                                                         answering=self._release_held)
                    except TimeoutError:
                        probe = ProbeResult(False, "timeout", None, f"no answer within {ADOPTION_PROBE_S:g}s")
                self.last_probe = probe
                if probe is None or not probe.ok:
                    await self._ctx.supervisor.stop(self.name, handle, self._ctx.settings.stop_timeout_s)
                    why = f": {probe.stage} {probe.message}".rstrip() if probe is not None else ""
                    await self._fail("adoption_probe_failed", f"backend pid {handle.pid} is alive but does not "
                                     f"answer its probe{why}", probe=probe)
                    return
                if recorded is S.SERVING:
                    self._transition(S.READY, "adopted after an API restart (requests in flight were lost)")
                else:
                    # No transition: same backend, same state; the record is only re-published.
                    self._ctx.bus.publish("slot", {"slot": self.name, "from": recorded.value, "to": recorded.value,
                                                   "seq": self.record.seq, "time": time.time(),
                                                   "reason": "adopted", "record": self.snapshot()})
                self._last_activity = time.monotonic()
                self._ensure_watch()
        finally:
            self._adoption = None

    async def _stop_unrecorded(self) -> None:
        """A backend the earlier API spawned and stopped before writing the move to starting (see
        `_start_and_warm`): nothing knows its port or its load, so it is stopped; the next request loads the
        slot again."""
        handle = await self._ctx.supervisor.unrecorded(self.name)
        if handle is None:
            return
        status = await self._ctx.supervisor.stop(self.name, handle, self._ctx.settings.stop_timeout_s)
        log.warning("slot %s: stopped backend pid %s, started by an API that stopped before recording it (%s)",
                    self.name, handle.pid, status.detail or "stopped")

    # -- requests ----------------------------------------------------------------------------------------
    def lease(self, timeout: Timeout, *, grace_s: float, early: bool = False, stand_in: bool = False) -> Lease:
        """The backend for one request: `async with slot.lease(...) as backend` (see `hal0.slots.lease`)."""
        return Lease(self, self._ctx.client, timeout, grace_s=grace_s, early=early, stand_in=stand_in)

    def release_lease(self) -> None:
        self.leases -= 1

    @property
    def evictable(self) -> bool:
        """May be unloaded now to make room: loaded, no request in flight or on its way, not pinned."""
        return self.state in LOADED and self.in_flight == 0 and self.leases == 0 and not self.config.pinned

    def gate(self) -> asyncio.Semaphore:
        """Bounds the requests in flight to this slot's backend; the rest wait here for a warm connection.

        How many is `in_flight_limit`'s: for llama-server, as many as its HTTP threads take (it
        queues them itself) — it parks a thread on every idle keep-alive connection for 5 s, so opening more
        connections than it has threads (a burst released by a cold boot) left them queued in 5-second steps.
        """
        port = self.record.port or 0
        if self._gate is None or self._gate[0] != port:
            args = self.config.args
            limit = in_flight_limit(self._ctx.providers.get(self.config.provider), args)
            self._gate = (port, asyncio.Semaphore(limit), asyncio.Semaphore(parallel(args)))
        return self._gate[1]

    def early_gate(self) -> asyncio.Semaphore:
        """Requests sent to a backend still running its readiness sentinel: at most its parallel slots."""
        self.gate()
        assert self._gate is not None
        return self._gate[2]

    def begin_request(self) -> None:
        """Count one request in flight: the slot is `serving` while any is, `ready` after (`end_request`)."""
        state = self.record.state
        if state not in LOADED:
            raise self.error_exception()
        self.in_flight += 1
        self.requests_total += 1
        if self.in_flight == 1 and state in (S.READY, S.IDLE):
            self._transition(S.SERVING, "request in flight")

    def end_request(self) -> None:
        self.in_flight -= 1
        self._last_activity = time.monotonic()
        if self.in_flight == 0 and self.record.state is S.SERVING:
            self._transition(S.READY, "requests done")

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """One request in flight for the block (`begin_request`, `end_request`)."""
        self.begin_request()
        try:
            yield
        finally:
            self.end_request()

    def backend_failed(self) -> None:
        """Called by the dispatcher when the backend refused a connection: the watch checks it at once."""
        if self.state in LOADED:
            self._wake.set()

    # -- watching ----------------------------------------------------------------------------------------
    def _ensure_watch(self) -> None:
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.create_task(self._watch(), name=f"watch:{self.name}")

    async def _watch(self) -> None:
        """While loaded: notice a dead or hung backend, move to idle after the idle timeout, unload after the TTL.

        A death is seen the moment it happens where the kernel can tell (a pidfd turns readable when its
        process exits) or the dispatcher reports a refused connection: the supervisor is asked then, and every
        STATUS_WITH_PIDFD_S besides; without a pidfd (or once it fired, until the supervisor agrees), every
        WATCH_INTERVAL_S. A backend that is alive but stops answering (frozen, deadlocked) fails
        LIVENESS_FAILURES liveness probes in a row and is stopped and marked `backend_unresponsive`, so the next
        request reloads it instead of waiting out its timeout. The status check awaits the supervisor (a
        `systemctl show`), so the watch holds the slot's lock while it acts on one: an unload that comes in
        meanwhile waits, instead of finding the slot moved under it."""
        settings = self._ctx.settings
        idle_timeout = self.config.idle_timeout_s or settings.idle_timeout_s
        self._wake.clear()
        exited = asyncio.Event()
        watched = self.record.pid
        pidfd = _watch_exit(watched, self._wake, exited)
        next_status = time.monotonic() + WATCH_INTERVAL_S
        after_exit = STATUS_AFTER_EXIT_S  # doubling up to WATCH_INTERVAL_S while the supervisor disagrees
        next_liveness = time.monotonic() + LIVENESS_INTERVAL_S
        next_memory = 0.0
        misses = 0
        try:
            if self._ctx.memory is not None and self.state in LOADED:
                # The first reading, in a thread, a moment after the move to ready: the requests held by the
                # load go to the backend first (the watch starts before they wake).
                await asyncio.sleep(FIRST_MEMORY_READ_S)
                self.memory = await asyncio.to_thread(self._ctx.memory.view, self)
                next_memory = time.monotonic() + MEMORY_REFRESH_S
            while self.state in LOADED:
                left = next_status - time.monotonic()  # a check due soon is waited for; an overdue one, a tick
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left if 0 < left < WATCH_INTERVAL_S else WATCH_INTERVAL_S):
                        await self._wake.wait()
                woken = self._wake.is_set()
                self._wake.clear()
                if self.state not in LOADED or self._op_lock.locked():
                    continue
                if woken or time.monotonic() >= next_status:
                    async with self._op_lock:
                        if self.state not in LOADED:
                            continue
                        handle = Handle(self.record.pid, self.record.unit)
                        status = await self._ctx.supervisor.status(self.name, handle)
                        if not status.alive:
                            if not await self._lost_worker(held=True):
                                await self._died(status, self._ctx.providers[self.config.provider])
                            return
                        if status.pid and status.pid != handle.pid:
                            # systemd restarted the unit (Restart=on-failure): the record follows its process.
                            self._update(f"backend restarted by its supervisor ({status.detail})", pid=status.pid)
                    if self.record.pid != watched:  # a new process: the pidfd follows it
                        _unwatch_exit(pidfd)
                        watched = self.record.pid
                        exited.clear()
                        after_exit = STATUS_AFTER_EXIT_S
                        pidfd = _watch_exit(watched, self._wake, exited)
                    # A pidfd that fired with the supervisor still calling the process alive (systemd has not
                    # reaped it yet) is asked again soon; a process no pidfd watches at the watch's pace.
                    if exited.is_set():
                        pace, after_exit = after_exit, min(after_exit * 2, WATCH_INTERVAL_S)
                    else:
                        pace = WATCH_INTERVAL_S if pidfd is None else STATUS_WITH_PIDFD_S
                    next_status = time.monotonic() + pace
                if time.monotonic() >= next_liveness:
                    await self._ctx.supervisor.trim_log(self.name)
                    if self._ctx.memory is not None and time.monotonic() >= next_memory:
                        # /proc and NVML in a thread (smaps_rollup alone is ~2-3 ms), every MEMORY_REFRESH_S.
                        self.memory = await asyncio.to_thread(self._ctx.memory.view, self)
                        next_memory = time.monotonic() + MEMORY_REFRESH_S
                    if await self._lost_worker():
                        return
                    answered = await self._alive()
                    next_liveness = time.monotonic() + LIVENESS_INTERVAL_S
                    misses = 0 if answered else misses + 1
                    if misses >= LIVENESS_FAILURES and self.state in LOADED and not self._op_lock.locked():
                        async with self._op_lock:
                            await self._unresponsive(misses)
                        return
                quiet = time.monotonic() - self._last_activity
                if self.state is S.READY and self.in_flight == 0 and quiet >= idle_timeout:
                    self._transition(S.IDLE, f"no requests for {idle_timeout:g}s")
                elif (self.state is S.IDLE and self.config.ttl_s is not None
                      and quiet >= idle_timeout + self.config.ttl_s):
                    await self.unload(f"ttl of {self.config.ttl_s:g}s expired")
                    return
        finally:
            _unwatch_exit(pidfd)

    async def _alive(self) -> bool:
        """A cheap liveness probe off the request path: any HTTP answer from the backend counts (llama-server
        answers /health from its HTTP threads even while every slot decodes); silence past the timeout does not."""
        provider = self._ctx.providers.get(self.config.provider)
        if isinstance(provider, Liveness):
            return await provider.alive(self._ctx.client, self.base_url)
        try:
            async with self._ctx.client.get(f"{self.base_url}/health", timeout=_LIVENESS_TIMEOUT) as resp:
                await resp.read()
                return True
        except (HttpError, OSError):
            return False

    async def _check_workers(self) -> None:
        """Before a llama-server with `rpc` workers starts: every worker answers the RPC HELLO, else the load fails
        naming the ones that do not. A worker busy with a client is one too: it serves one llama-server at a time,
        and ours would hang on it until the other one lets go."""
        from hal0.providers.rpc import check_workers  # only slots with rpc workers come here

        bad = [c for c in await check_workers(self.config.rpc, busy_ok=False) if not c.ok]
        if bad:
            raise BackendError(
                f"rpc worker(s) of slot {self.name} do not answer: "
                + "; ".join(f"{c.endpoint}: {c.message}" for c in bad)
                + " (load the rpc slot on the worker's node first; a worker serves one llama-server at a time)",
                code="rpc_worker_unreachable",
                detail={"workers": [{"endpoint": c.endpoint, "message": c.message} for c in bad]})

    async def _lost_worker(self, *, held: bool = False) -> bool:
        """A loaded slot whose rpc worker went away: llama-server would abort on its next request (or already
        did). Stop it and say which worker it was. True when that happened."""
        if not self.config.rpc:
            return False
        from hal0.providers.rpc import worker_gone

        gone = await asyncio.gather(*(worker_gone(endpoint) for endpoint in self.config.rpc))
        for endpoint, why in zip(self.config.rpc, gone, strict=True):
            if why is None:
                continue
            # `held`: the caller (the watch's status check) holds the slot's lock; anyone else holding it is busy
            # with the slot (an unload, a load), which settles it.
            if self.state not in LOADED or (self._op_lock.locked() and not held):
                return False
            await self._stop_process()
            await self._fail("rpc_worker_gone", f"rpc worker {endpoint} of slot {self.name} is gone ({why}); the "
                       "backend was stopped, and the next request loads it again once the worker is back",
                       extra={"worker": endpoint})
            return True
        return False

    async def _unresponsive(self, misses: int) -> None:
        handle = Handle(self.record.pid, self.record.unit)
        waited = misses * LIVENESS_TIMEOUT_S
        # A frozen process never acts on SIGTERM (a stopped one does not even see it): a short grace, then KILL.
        await self._ctx.supervisor.stop(self.name, handle, min(self._ctx.settings.stop_timeout_s, 1.0))
        await self._fail("backend_unresponsive",
                         f"backend pid {self.record.pid} stopped answering: {misses} liveness probes in a row got "
                         f"no answer within {LIVENESS_TIMEOUT_S:g}s each (~{waited:g}s); it was stopped, and the "
                         "next request loads the slot again", extra={"liveness_misses": misses})

    async def close(self) -> None:
        """Stop hal0's own tasks for this slot. The backend keeps running: the slot owns the model."""
        for task in (self._load_task, self._watch_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

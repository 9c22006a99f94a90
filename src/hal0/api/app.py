"""The ASGI application: builds the shared objects once (bus, HTTP session, registry, slots) and serves the
/v1 edge from the first request on; the management app (/api, /metrics, the dashboard) is imported and
built on the first request that needs it, so a restarted API serves /v1 without paying for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from hal0 import __version__
from hal0.client import HttpClient
from hal0.datatypes import datatype
from hal0.dispatch.backend_errors import anthropic_path
from hal0.dispatch.decisions import DecisionLog
from hal0.dispatch.proxy import Dispatcher, Receive, Scope, Send
from hal0.errors import anthropic_error_body, openai_error_body
from hal0.events import EventBus
from hal0.fsio import WriteFailures
from hal0.metrics import Metrics
from hal0.providers.base import Provider
from hal0.providers.llamacpp import LlamaCppProvider
from hal0.registry.store import ModelStore
from hal0.settings import Settings
from hal0.slots.manager import SlotManager
from hal0.slots.state import SlotState
from hal0.stats import StatsRing
from hal0.supervisors.base import Supervisor
from hal0.supervisors.choose import choose_supervisor

if TYPE_CHECKING:
    from hal0.registry.pull import PullEvent, Registry

ASGIApp = Any

log = logging.getLogger("hal0")


@datatype(frozen=True, slots=True)
class AppOptions:
    """How `hal0 serve` builds the app."""
    #: Register and assign the generated demo model to `primary` on a first run.
    demo: bool = False


class Providers(Mapping[str, Provider]):
    """The providers by name, each built (its module imported) when a slot first asks for it: an API whose slots
    run llama.cpp never imports the speech, NPU or RPC providers, and a restarted one serves sooner."""

    def __init__(self, factories: dict[str, Callable[[], Provider]]) -> None:
        self._factories = factories
        self._built: dict[str, Provider] = {}

    def __getitem__(self, name: str) -> Provider:
        provider = self._built.get(name)
        if provider is None:
            provider = self._built[name] = self._factories[name]()
        return provider

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def __len__(self) -> int:
        return len(self._factories)


def build_providers(settings: Settings) -> Providers:
    def moonshine() -> Provider:
        from hal0.providers.moonshine import MoonshineProvider

        return MoonshineProvider()

    def kokoro() -> Provider:
        from hal0.providers.kokoro import KokoroProvider

        return KokoroProvider()

    def flm() -> Provider:
        from hal0.providers.flm import FlmProvider

        return FlmProvider()

    def rpc() -> Provider:
        from hal0.providers.rpc import RpcProvider

        return RpcProvider(settings.llama_server)

    return Providers({"llama.cpp": lambda: LlamaCppProvider(settings.llama_server), "moonshine": moonshine,
                      "kokoro": kokoro, "flm": flm, "rpc": rpc})


def build_supervisor(settings: Settings) -> Supervisor:
    supervisor, reason = choose_supervisor(settings)
    log.info("supervisor: %s (%s)", supervisor.kind, reason)
    return supervisor


class RegistryModels:
    """The registry as the slots' ModelSource: installed files, catalog pulls published on the bus.

    Installed files are read from the store; the pull machinery (its module and the catalog's) is imported and
    built on first use — a pull, a ref that is not installed, the management app — so an API restarted over
    installed models serves without it."""

    def __init__(self, settings: Settings, bus: EventBus, registry: Registry | None = None) -> None:
        self._settings = settings
        self._bus = bus
        self._registry = registry
        self.store = registry.store if registry is not None else ModelStore(settings.models_dir)

    def registry(self) -> Registry:
        if self._registry is None:
            from hal0.registry.pull import Registry

            settings = self._settings
            self._registry = Registry(settings, hf_endpoint=settings.hf_endpoint,
                                      hf_token=settings.hf_token or None, store=self.store)
        return self._registry

    def path(self, ref: str) -> Path | None:
        if not self.store.exists(ref):
            return None
        return self.store.primary_path(ref)

    def pullable(self, ref: str) -> bool:
        from hal0.registry import catalog

        return catalog.lookup(ref) is not None

    async def pull(self, ref: str) -> Path:
        await self.registry().pull(ref, on_event=self._publish)
        return self.store.primary_path(ref)

    def check(self, ref: str) -> None:
        self.store.check(ref)

    def cancel_pull(self, ref: str) -> None:
        if self._registry is not None:  # never built: nothing is pulling
            self._registry.cancel(ref)

    async def aclose(self) -> None:
        if self._registry is not None:
            await self._registry.aclose()

    def _publish(self, event: PullEvent) -> None:
        self._bus.publish("pull", event.to_dict())


class Hal0App:
    """The ASGI entry. It runs the lifespan itself (the shared objects live from startup to shutdown); /v1 goes
    straight to the dispatcher (the hot path skips the management routing); everything else goes to the management
    app, built on the first request for it.
    """

    def __init__(self, settings: Settings, options: AppOptions) -> None:
        self.settings = settings
        self.options = options
        #: The shared objects while the app runs (`serving` sets them): what the management routes read from
        #: `request.app.state`.
        self.state: SimpleNamespace | None = None
        self.dispatcher: Dispatcher | None = None
        self._management: ASGIApp | None = None
        self._keys = tuple(k.encode() for k in settings.api_keys)
        if self._keys:  # hmac only for an API with keys
            import hmac

            self._same = hmac.compare_digest
        self._max_body = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if self._keys and _needs_key(path) and not self._authorized(scope):
                await _unauthorized(send, path)
                return
            if path.startswith("/v1/") and self.dispatcher is not None:
                await self.dispatcher(scope, receive, send)
                return
            if path == "/api/health" and scope["method"] in ("GET", "HEAD") and self.state is not None:
                # Liveness is polled by supervisors, doctor and scripts: answered here, not by the management app.
                await _send_json(send, 200, health(self.state.manager))  # the server drops the body of a HEAD
                return
            if self._max_body is not None and _declared_length(scope) > self._max_body:
                await _too_large(send, self._max_body)
                return
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.management()(scope, receive, send)

    def management(self) -> ASGIApp:
        """The app of /api, /metrics and the dashboard, imported and built once, when first asked for."""
        if self._management is None:
            from hal0.api.management import management_app

            assert self.state is not None, "the management app is built once the shared objects exist"
            self.state.registry = self.state.models.registry()  # /api/models and /api/catalog read it
            self._management = management_app(self.state)
            gc.freeze()  # its modules, routes and models, too: see `serving`
        return self._management

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(serving(self))
            except Exception as exc:
                log.exception("hal0 failed to start")
                await send({"type": "lifespan.startup.failed", "message": str(exc) or repr(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif key == b"x-api-key":  # what Anthropic-style clients send
                given = value.strip()
            else:
                continue
            if any(self._same(given, k) for k in self._keys):
                return True
        return False


def health(manager: SlotManager) -> dict[str, Any]:
    """`GET /api/health`: the API is up; its supervisor, its slots and the writes that failed."""
    failures = {"state": 0, "decisions": 0, **manager.store.failures.to_dict()}
    return {"status": "ok", "supervisor": manager.supervisor.kind, "slots": len(manager.slots),
            "write_failures": failures}


async def _send_json(send: Send, status: int, data: Any) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _declared_length(scope: Scope) -> int:
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit():
            return int(value)
    return 0


async def _too_large(send: Send, limit: int) -> None:
    # /v1 enforces the limit while streaming the body in; /api bodies are small JSON, refused by their header.
    body = json.dumps(openai_error_body(413, "body_too_large", f"request body exceeds the limit of {limit} bytes"))
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body.encode()})


def _needs_key(path: str) -> bool:
    # The dashboard's static page and the API's liveness check stay open; data (metrics too) and actions need
    # a key.
    return (path.startswith("/v1/") or path.startswith("/api/") or path == "/metrics") and path != "/api/health"


async def _unauthorized(send: Send, path: str) -> None:
    shape = anthropic_error_body if anthropic_path(path) else openai_error_body
    body = json.dumps(shape(401, "invalid_api_key",
                            "missing or wrong API key: send `Authorization: Bearer <key>`")).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(edge: Hal0App) -> AsyncIterator[None]:
    """Build the shared objects, start the slots (adopting running backends) and hand /v1 to the dispatcher;
    undo it all in reverse on the way out."""
    settings = edge.settings
    settings.ensure_dirs()
    bus = EventBus()
    client = HttpClient()
    models = RegistryModels(settings, bus)
    failures = WriteFailures()
    decisions = DecisionLog(settings.log_dir / "decisions.jsonl", bus, settings.decision_log_max_bytes,
                            failures=failures)
    manager = SlotManager(settings, bus, build_supervisor(settings), build_providers(settings), client,
                          models, failures, evicted=decisions.record_eviction)
    stats = StatsRing()
    # Imported here, not at the top: the samplers read /api's memory views only when asked (a scrape, a tick).
    from hal0.api import samples

    meters = Metrics([s.value for s in SlotState], lambda: samples.slot_samples(manager, stats),
                     lambda: dict(failures.counts), lambda: samples.device_samples(manager))
    bus.tap(meters.observe)
    bus.tap(stats.observe)
    followed = None
    if settings.peers:  # the following machinery is imported only where there is someone to follow
        from hal0.peers.follow import Peers

        followed = Peers(settings.peers, bus)
    edge.state = SimpleNamespace(settings=settings, events=bus, client=client, models=models,
                                 manager=manager, decisions=decisions, stats=stats, metrics=meters,
                                 peers=followed)
    dispatcher = Dispatcher(settings, manager, client, decisions, meters, followed)
    sampler: asyncio.Task[None] | None = None
    try:
        await manager.start()
        edge.dispatcher = dispatcher
        sampler = asyncio.create_task(samples.sample_every_second(manager, stats), name="stats-sampler")
        # Peers are followed from here to shutdown: their tasks are cancelled and awaited in `finally`.
        if followed is not None:
            followed.start()
        if edge.options.demo:
            from hal0.demo import ensure_demo_model

            await ensure_demo_model(models.store, manager)
        log.info("hal0 %s serving on %s (supervisor: %s)", __version__, settings.base_url,
                 manager.supervisor.kind)
        # What exists now (modules, the app, the slots) lives as long as the process: out of the collector's
        # way, so a full collection under load walks only what requests made (with the management app
        # imported, one took 14 ms on the event loop; after the freeze, well under 1 ms).
        gc.freeze()
        gc.enable()  # `hal0 serve` starts with it off
        yield
    finally:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        edge.dispatcher = None
        if followed is not None:
            await followed.aclose()
        await dispatcher.close()
        await manager.close()
        decisions.close()
        await models.aclose()
        bus.close()
        await client.close()


def create_app(settings: Settings, options: AppOptions | None = None) -> Hal0App:
    return Hal0App(settings, options or AppOptions())

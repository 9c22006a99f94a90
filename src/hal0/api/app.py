"""The ASGI application: builds the shared objects once (bus, HTTP session, registry, slots) and mounts
the /v1 edge, the /api management routes and the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from fastapi import FastAPI

from hal0 import __version__
from hal0.api import dashboard, errors, hardware, manage, metrics, models, peers
from hal0.dispatch.backend_errors import anthropic_path
from hal0.dispatch.decisions import DecisionLog
from hal0.dispatch.proxy import Dispatcher, Receive, Scope, Send
from hal0.errors import anthropic_error_body
from hal0.events import EventBus
from hal0.fsio import WriteFailures
from hal0.metrics import Metrics
from hal0.peers import Peers
from hal0.providers.base import Provider
from hal0.providers.flm import FlmProvider
from hal0.providers.kokoro import KokoroProvider
from hal0.providers.llamacpp import LlamaCppProvider
from hal0.providers.moonshine import MoonshineProvider
from hal0.providers.rpc import RpcProvider
from hal0.registry import catalog
from hal0.registry.pull import PullEvent, Registry
from hal0.settings import Settings
from hal0.slots.manager import SlotManager
from hal0.slots.state import SlotState
from hal0.stats import StatsRing
from hal0.supervisors.base import Supervisor
from hal0.supervisors.choose import choose_supervisor

log = logging.getLogger("hal0")


@dataclass(frozen=True, slots=True)
class AppOptions:
    #: Register and assign the generated demo model to `primary` on a first run.
    demo: bool = False


def build_providers(settings: Settings) -> dict[str, Provider]:
    return {"llama.cpp": LlamaCppProvider(settings.llama_server), "moonshine": MoonshineProvider(),
            "kokoro": KokoroProvider(), "flm": FlmProvider(), "rpc": RpcProvider(settings.llama_server)}


def build_supervisor(settings: Settings) -> Supervisor:
    supervisor, reason = choose_supervisor(settings)
    log.info("supervisor: %s (%s)", supervisor.kind, reason)
    return supervisor


class RegistryModels:
    """The registry as the slots' ModelSource: installed files, catalog pulls published on the bus."""

    def __init__(self, registry: Registry, bus: EventBus) -> None:
        self._registry = registry
        self._bus = bus

    def path(self, ref: str) -> Path | None:
        if not self._registry.exists(ref):
            return None
        return self._registry.model_path(ref)

    def pullable(self, ref: str) -> bool:
        return catalog.lookup(ref) is not None

    async def pull(self, ref: str) -> Path:
        await self._registry.pull(ref, on_event=self._publish)
        return self._registry.model_path(ref)

    def check(self, ref: str) -> None:
        self._registry.store.check(ref)

    def cancel_pull(self, ref: str) -> None:
        self._registry.cancel(ref)

    def _publish(self, event: PullEvent) -> None:
        self._bus.publish("pull", event.to_dict())


class Hal0App:
    """The ASGI entry: /v1 goes straight to the dispatcher (the hot path skips FastAPI's routing);
    everything else, lifespan included, goes to the FastAPI app.
    """

    def __init__(self, api_keys: tuple[str, ...] = (), max_body_bytes: int | None = None) -> None:
        self.fastapi: FastAPI | None = None
        self.dispatcher: Dispatcher | None = None
        self._keys = tuple(k.encode() for k in api_keys)
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if self._keys and _needs_key(path) and not self._authorized(scope):
                await _unauthorized(send, path)
                return
            if path.startswith("/v1/") and self.dispatcher is not None:
                await self.dispatcher(scope, receive, send)
                return
            if self._max_body is not None and _declared_length(scope) > self._max_body:
                await _too_large(send, self._max_body)
                return
        assert self.fastapi is not None
        await self.fastapi(scope, receive, send)


    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif key == b"x-api-key":  # what Anthropic-style clients send
                given = value.strip()
            else:
                continue
            if any(hmac.compare_digest(given, k) for k in self._keys):
                return True
        return False


def _declared_length(scope: Scope) -> int:
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit():
            return int(value)
    return 0


async def _too_large(send: Send, limit: int) -> None:
    # /v1 enforces the limit while streaming the body in; /api bodies are small JSON, refused by their header.
    body = json.dumps(errors.error_body(413, "body_too_large", f"request body exceeds the limit of {limit} bytes"))
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body.encode()})


def _needs_key(path: str) -> bool:
    # The dashboard's static page and the API's liveness check stay open; data (metrics too) and actions need
    # a key.
    return (path.startswith("/v1/") or path.startswith("/api/") or path == "/metrics") and path != "/api/health"


async def _unauthorized(send: Send, path: str) -> None:
    shape = anthropic_error_body if anthropic_path(path) else errors.error_body
    body = json.dumps(shape(401, "invalid_api_key",
                            "missing or wrong API key: send `Authorization: Bearer <key>`")).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, options: AppOptions | None = None) -> Hal0App:
    options = options or AppOptions()
    edge = Hal0App(settings.api_keys, settings.max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        bus = EventBus()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        registry = Registry(settings, hf_endpoint=settings.hf_endpoint, hf_token=settings.hf_token or None)
        failures = WriteFailures()
        decisions = DecisionLog(settings.log_dir / "decisions.jsonl", bus, settings.decision_log_max_bytes,
                                failures=failures)
        manager = SlotManager(settings, bus, build_supervisor(settings), build_providers(settings), session,
                              RegistryModels(registry, bus), failures, evicted=decisions.record_eviction)
        app.state.settings = settings
        app.state.events = bus
        app.state.session = session
        app.state.registry = registry
        app.state.manager = manager
        app.state.decisions = decisions
        stats = StatsRing()
        meters = Metrics([s.value for s in SlotState], lambda: metrics.slot_samples(manager, stats),
                         lambda: dict(failures.counts), lambda: metrics.device_samples(manager))
        bus.tap(meters.observe)
        bus.tap(stats.observe)
        app.state.stats = stats
        app.state.metrics = meters
        followed = Peers(settings.peers, bus)
        app.state.peers = followed
        dispatcher = Dispatcher(settings, manager, session, decisions, meters, followed)
        edge.dispatcher = dispatcher
        sampler: asyncio.Task[None] | None = None
        try:
            await manager.start()
            sampler = asyncio.create_task(metrics.sample_every_second(manager, stats), name="stats-sampler")
            # Peers are followed from here to shutdown: their tasks are cancelled and awaited in `finally`.
            followed.start()
            if options.demo:
                from hal0.demo import ensure_demo_model

                await ensure_demo_model(registry.store, manager)
            log.info("hal0 %s serving on %s (supervisor: %s)", __version__, settings.base_url,
                     manager.supervisor.kind)
            yield
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            edge.dispatcher = None
            await followed.aclose()
            await dispatcher.close()
            await manager.close()
            decisions.close()
            await registry.aclose()
            bus.close()
            await session.close()

    app = FastAPI(title="hal0", version=__version__, lifespan=lifespan,
                  description="Control plane for local AI inference: management API (/api) and an "
                              "OpenAI-shaped edge (/v1).")
    errors.install(app)
    app.include_router(manage.router)
    app.include_router(hardware.router)
    app.include_router(models.router)
    app.include_router(metrics.router)
    app.include_router(peers.router)
    app.include_router(dashboard.router)
    edge.fastapi = app
    return edge

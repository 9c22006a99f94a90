"""The ASGI application: builds the shared objects once (bus, HTTP session, registry, slots) and mounts
the /v1 edge, the /api management routes and the dashboard.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from fastapi import FastAPI

from hal0 import __version__
from hal0.api import errors, manage
from hal0.events import EventBus
from hal0.providers.base import Provider
from hal0.providers.llamacpp import LlamaCppProvider
from hal0.registry.store import ModelStore
from hal0.settings import Settings
from hal0.slots.manager import SlotManager
from hal0.supervisors.base import Supervisor
from hal0.supervisors.embedded import EmbeddedSupervisor

log = logging.getLogger("hal0")


@dataclass(frozen=True, slots=True)
class AppOptions:
    #: Register and assign the generated demo model to `primary` on a first run.
    demo: bool = False


def build_providers(settings: Settings) -> dict[str, Provider]:
    return {"llama.cpp": LlamaCppProvider(settings.llama_server)}


def build_supervisor(settings: Settings) -> Supervisor:
    return EmbeddedSupervisor(settings.slots_state_dir, settings.log_dir)


def model_resolver(store: ModelStore) -> Callable[[str], Path]:
    def resolve(ref: str) -> Path:
        manifest = store.get(ref)
        return store.file_path(ref, manifest.primary_file.name)

    return resolve


def create_app(settings: Settings, options: AppOptions | None = None) -> FastAPI:
    options = options or AppOptions()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        bus = EventBus()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        registry = ModelStore(settings.models_dir)
        manager = SlotManager(settings, bus, build_supervisor(settings), build_providers(settings), session,
                              model_resolver(registry))
        app.state.settings = settings
        app.state.events = bus
        app.state.session = session
        app.state.model_store = registry
        app.state.manager = manager
        try:
            await manager.start()
            if options.demo:
                from hal0.demo import ensure_demo_model

                await ensure_demo_model(registry, manager)
            log.info("hal0 %s serving on %s (supervisor: %s)", __version__, settings.base_url,
                     manager.supervisor.kind)
            yield
        finally:
            await manager.close()
            bus.close()
            await session.close()

    app = FastAPI(title="hal0", version=__version__, lifespan=lifespan,
                  description="Control plane for local AI inference: management API (/api) and an "
                              "OpenAI-shaped edge (/v1).")
    errors.install(app)
    app.include_router(manage.router)
    return app

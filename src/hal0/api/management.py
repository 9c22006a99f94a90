"""The management app: /api (slots, models, hardware, peers, events), /metrics and the dashboard, on FastAPI.

Built by the edge (`Hal0App.management`) on the first request that is not /v1, over the shared objects the edge's
lifespan made: importing FastAPI costs a restarted API ~0.3 s and ~15 MB, which /v1 does not pay.
"""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import FastAPI

from hal0 import __version__
from hal0.api import dashboard, errors, hardware, manage, metrics, models, peers


def management_app(state: SimpleNamespace) -> FastAPI:
    app = FastAPI(title="hal0", version=__version__,
                  description="Control plane for local AI inference: management API (/api) and an "
                              "OpenAI-shaped edge (/v1).")
    for name, value in vars(state).items():
        setattr(app.state, name, value)
    errors.install(app)
    app.include_router(manage.router)
    app.include_router(hardware.router)
    app.include_router(models.router)
    app.include_router(metrics.router)
    app.include_router(peers.router)
    app.include_router(dashboard.router)
    return app


__all__ = ["management_app"]

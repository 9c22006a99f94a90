"""The management app: /api (slots, models, hardware, peers, events), /metrics and the dashboard.

Built by the edge (`Hal0App.management`) on the first request that is not /v1, over the shared objects the edge's
lifespan made: its routes, Starlette's requests and pydantic's models are imported then, which /v1 does not pay.
"""

from __future__ import annotations

from types import SimpleNamespace

from hal0 import __version__
from hal0.api import dashboard, hardware, manage, metrics, models, peers
from hal0.api.routing import ManagementApp


def management_app(state: SimpleNamespace) -> ManagementApp:
    return ManagementApp([manage.router, hardware.router, models.router, metrics.router, peers.router,
                          dashboard.router], state, title="hal0", version=__version__,
                         description="Control plane for local AI inference: management API (/api) and an "
                                     "OpenAI-shaped edge (/v1).")


__all__ = ["management_app"]

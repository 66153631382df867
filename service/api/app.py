"""The API process: ``create_app(settings)`` builds a FastAPI app (OpenAPI at ``/docs``).

It never imports torch. Uploads are validated with numpy and safetensors headers; work goes to
the workers by task name (``service.core.dispatch``).
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import Context
from service.api.problems import Problem, install, problem_response
from service.api.routes import audit, datasets, deletions, health, models
from service.api.telemetry import Metrics, MetricsMiddleware
from service.core.artifacts import LocalArtifactStore, TooLarge
from service.core.db import Database
from service.core.dispatch import Dispatcher
from service.core.settings import Settings

log = logging.getLogger("unlearnd.api")
FORM_OVERHEAD = 1 << 20  # multipart boundaries and small fields on top of the files


class BodyLimit:
    """Refuse a request body larger than ``limit``: early from Content-Length, else while it streams
    (a chunked upload cannot fill the disk before the route sees it)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            problem = Problem(413, "Content too large", f"body: larger than the limit of {self.limit} bytes",
                              kind="too-large", field="body")
            await problem_response(problem)(scope, receive, send)
            return
        seen = 0

        async def _receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge(self.limit)
            return message

        await self.app(scope, _receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.ensure_dirs()
    ctx = Context(settings=settings, db=Database(settings.db_url), store=LocalArtifactStore(settings.artifacts),
                  dispatcher=Dispatcher(settings), metrics=Metrics())
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        ctx.db.dispose()

    # /docs (Swagger UI) and /redoc load their scripts from the service, not from a CDN
    app = FastAPIOffline(title="unlearnd", version="1", lifespan=lifespan, description=(
        "Make trained PyTorch classifiers forget specific training examples, and prove it. "
        "Authenticate with `Authorization: Bearer <key>` (create one with `unlearnd keys create --tenant T`). "
        "Errors are application/problem+json (RFC 9457)."))
    app.state.ctx = ctx
    install(app)
    for router in (health.router, datasets.router, models.router, deletions.router, audit.router):
        app.include_router(router)
    app.add_middleware(BodyLimit, limit=2 * settings.max_upload_bytes + FORM_OVERHEAD)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)

    return app

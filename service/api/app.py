"""The API process: ``create_app(settings)`` builds a FastAPI app (OpenAPI at ``/docs``).

It never imports torch. Uploads are validated with numpy and safetensors headers; work goes to
the workers by task name (``service.core.dispatch``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
from urllib.parse import parse_qsl

import anyio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import openapi
from service.api.deps import Context
from service.api.problems import Problem, from_domain, install, problem_response
from service.api.routes import audit, datasets, deletions, health, models, webhooks
from service.api.telemetry import Metrics, MetricsMiddleware
from service.api.uploads import MAX_JSON_DEPTH, check_json_text, json_depth
from service.core.artifacts import LocalArtifactStore, TooLarge
from service.core.celery_app import DELIVER_WEBHOOKS
from service.core.db import Database
from service.core.dispatch import Dispatcher
from service.core.errors import DomainError, invalid
from service.core.repo import webhooks as webhook_repo
from service.core.settings import Settings
from worker.engine.datafile import CONTROL_CHARACTERS

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


MAX_JSON_BODY = 64 << 20  # 100,000 sample ids (the most a request takes) of 256 characters: 27 MB
# A control character in a JSON string is written as a \u escape (raw C0 bytes are not valid JSON),
# C1 ones may also come raw in UTF-8.
CONTROL_ESCAPE = re.compile(rb"\\u00(?:[01][0-9a-fA-F]|7[fF]|[89][0-9a-fA-F])|\xc2[\x80-\x9f]")


class NoControlCharacters:
    """Refuse control characters (NUL included) in the path, the query and JSON bodies with a 422
    naming the parameter or the body field, before any route, the database or a log sees them:
    no name, id or reference of ours holds one, and PostgreSQL cannot store NUL in text."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = None
        if CONTROL_CHARACTERS.search(scope.get("path", "")):
            where = "path"
        else:
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            where = next((k if not CONTROL_CHARACTERS.search(k) else "query"
                          for k, v in query if CONTROL_CHARACTERS.search(k) or CONTROL_CHARACTERS.search(v)), None)
        if where is not None:
            problem = invalid(where, "must not contain control characters")
            await problem_response(from_domain(problem))(scope, receive, send)
            return
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        if not content_type.startswith(b"application/json"):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:  # JSON bodies are small: read it, check it, replay it to the route
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_JSON_BODY:
                problem = Problem(413, "Content too large", f"body: a JSON body is limited to {MAX_JSON_BODY} bytes",
                                  kind="too-large", field="body")
                await problem_response(problem)(scope, receive, send)
                return
        if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:  # might nest too deep for the parser
            depth = await anyio.to_thread.run_sync(json_depth, body.decode("utf-8", "replace"))
            if depth > MAX_JSON_DEPTH:
                problem = invalid("body", f"nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
                await problem_response(from_domain(problem))(scope, receive, send)
                return
        if CONTROL_ESCAPE.search(body):  # a cheap scan; the parse below tells an escaped backslash apart
            try:
                check_json_text(json.loads(body), "body")
            except DomainError as exc:
                field = (exc.field or "body").removeprefix("body.")
                await problem_response(from_domain(invalid(field, "must not contain control characters")))(
                    scope, receive, send)
                return
            except (ValueError, RecursionError):
                pass  # not JSON: the route answers that
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.ensure_dirs()
    ctx = Context(settings=settings, db=Database(settings.db_url, generic_plans=True),  # service/core/db.py
                  store=LocalArtifactStore(settings.artifacts), dispatcher=Dispatcher(settings), metrics=Metrics())
    # a canceled job or a test message: its webhook messages go out now, not at the next beat
    webhook_repo.wake_after_commit(ctx.db, lambda: ctx.dispatcher.send(DELIVER_WEBHOOKS))
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # what startup made lives as long as the process: the collector need not scan it again on
        # every full collection under load (collected first, so that no garbage is kept for good)
        gc.collect()
        gc.freeze()
        yield
        ctx.db.dispose()

    # /docs (Swagger UI) and /redoc load their scripts from the service, not from a CDN
    app = FastAPIOffline(title="unlearnd", version="1", lifespan=lifespan, description=(
        "Make trained PyTorch classifiers forget specific training examples, and prove it. "
        "Authenticate with `Authorization: Bearer <key>` (create one with `unlearnd keys create --tenant T`). "
        "Errors are application/problem+json (RFC 9457)."))
    app.state.ctx = ctx
    install(app)
    # deletions first: a request is matched against the routes in order, and accepting deletion requests
    # is the hot path (no two routers have a path in common, so the order changes no match)
    for router in (deletions.router, health.router, datasets.router, models.router, audit.router, webhooks.router):
        app.include_router(router)
    openapi.install(app, settings.max_page_size)
    app.add_middleware(NoControlCharacters)
    app.add_middleware(BodyLimit, limit=2 * settings.max_upload_bytes + FORM_OVERHEAD)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)

    return app

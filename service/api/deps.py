"""What a route needs: the process context (settings, database, artifact store, dispatcher) and
the authenticated caller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from service.api.telemetry import Metrics
from service.core.artifacts import LocalArtifactStore
from service.core.auth import Caller, authenticate
from service.core.db import Database
from service.core.dispatch import Dispatcher
from service.core.settings import Settings


@dataclass
class Context:
    settings: Settings
    db: Database
    store: LocalArtifactStore
    dispatcher: Dispatcher
    metrics: Metrics


def context(request: Request) -> Context:
    return request.app.state.ctx


def caller(ctx: Annotated[Context, Depends(context)],
           authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Caller:
    with ctx.db.transaction() as session:
        return authenticate(session, authorization)


Ctx = Annotated[Context, Depends(context)]
Auth = Annotated[Caller, Depends(caller)]

"""What a route needs: the process context (settings, database, artifact store, dispatcher) and
the authenticated caller (or, for a route that authenticates in its own transaction, the bearer key)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, NamedTuple

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.problems import Problem
from service.api.telemetry import Metrics
from service.core.artifacts import LocalArtifactStore
from service.core.auth import Caller, authenticate, bearer_key
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
    upload_slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self):
        self.upload_slots = threading.BoundedSemaphore(self.settings.max_concurrent_uploads)

    @contextmanager
    def upload_slot(self) -> Iterator[None]:
        """One of the process's upload slots for reading and validating a file (routes run in
        threads), or 503 with Retry-After when none frees up in time. Held once per request."""
        if not self.upload_slots.acquire(timeout=self.settings.upload_wait_s):
            raise Problem(503, "Busy", f"{self.settings.max_concurrent_uploads} uploads are being validated; "
                          "retry after the delay in Retry-After", kind="busy", headers={"Retry-After": "5"})
        try:
            yield
        finally:
            self.upload_slots.release()


async def context(request: Request) -> Context:  # async: FastAPI runs a plain def in a worker thread
    return request.app.state.ctx


# Documents the bearer scheme in OpenAPI (the Authorize button of /docs). The key itself is read from
# the raw header below, so that a missing or malformed one gets our 401 problem+json.
BEARER = HTTPBearer(auto_error=False, scheme_name="apiKey", bearerFormat="ulk_<prefix>_<secret>",
                    description="An API key: `unlearnd keys create --tenant T` prints one.")


def caller(ctx: Annotated[Context, Depends(context)],
           _documented: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
           authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Caller:
    with ctx.db.transaction() as session:
        return authenticate(session, authorization)


class BearerKey(NamedTuple):
    """What :class:`BearerHeader` hands a route: the process context and the bearer key with its prefix."""
    ctx: Context
    key: str
    prefix: str


class BearerHeader(HTTPBearer):
    """The same scheme as ``BEARER`` in OpenAPI; as a dependency, for a route that checks the key in
    its own transaction (the accept path reads it with the model: service/core/repo/deletions.py),
    the key of the Authorization header, refused (401) here when missing or malformed, before the
    body is validated, and the process context. One dependency, not two: each costs FastAPI tens of
    microseconds a request."""

    async def __call__(self, request: Request) -> BearerKey:  # type: ignore[override]
        key, prefix = bearer_key(request.headers.get("authorization"))
        return BearerKey(request.app.state.ctx, key, prefix)


Ctx = Annotated[Context, Depends(context)]
Auth = Annotated[Caller, Depends(caller)]
Bearer = Annotated[BearerKey, Security(BearerHeader(auto_error=False, scheme_name=BEARER.scheme_name,
                                                    bearerFormat=BEARER.model.bearerFormat,
                                                    description=BEARER.model.description))]

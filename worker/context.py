"""What a worker process holds: settings, database and artifact store, created once."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

from service.core.artifacts import LocalArtifactStore
from service.core.celery_app import DELIVER_WEBHOOKS
from service.core.db import Database
from service.core.dispatch import Dispatcher
from service.core.repo import webhooks
from service.core.settings import Settings
from service.core.signing import Signer, load_signer


@dataclass
class WorkerContext:
    settings: Settings
    db: Database
    store: LocalArtifactStore

    @cached_property
    def dispatcher(self) -> Dispatcher:
        """One Celery client per worker process (not a new one per task or sweep)."""
        return Dispatcher(self.settings)

    @cached_property
    def signer(self) -> Signer:
        """The deployment's signing key, read (or, for the embedded default, created) once."""
        return load_signer(self.settings)


@cache
def worker_context() -> WorkerContext:
    settings = Settings()
    settings.ensure_dirs()
    ctx = WorkerContext(settings, Database(settings.db_url), LocalArtifactStore(settings.artifacts))
    webhooks.wake_after_commit(ctx.db, lambda: ctx.dispatcher.send(DELIVER_WEBHOOKS))  # messages go out now
    return ctx

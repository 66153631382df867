"""What a worker process holds: settings, database and artifact store, created once."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from service.artifacts import LocalArtifactStore
from service.db import Database
from service.settings import Settings


@dataclass
class WorkerContext:
    settings: Settings
    db: Database
    store: LocalArtifactStore


@cache
def worker_context() -> WorkerContext:
    settings = Settings()
    settings.ensure_dirs()
    return WorkerContext(settings, Database(settings.db_url), LocalArtifactStore(settings.artifacts))

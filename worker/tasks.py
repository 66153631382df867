"""Celery tasks: thin glue between the database, the artifact store and the engine.

Run a worker with ``unlearnd worker`` (or ``celery -A worker.tasks worker``)."""

from __future__ import annotations

import datetime as dt
import logging

from service.dispatch import Dispatcher
from service.models import utcnow
from service.repo import models as model_repo
from service.settings import Settings

from .celery_app import REGISTER_VERSION, SWEEP, make_celery
from .context import worker_context
from .registration import validate_version

log = logging.getLogger("unlearnd.worker")
app = make_celery(Settings())


@app.task(name=REGISTER_VERSION)
def register_version(version_id: int) -> str | None:
    return validate_version(worker_context(), int(version_id))


@app.task(name=SWEEP)
def sweep() -> dict:
    """Re-send wake-ups that were lost (broker down at the time, worker killed): the database
    says what is still pending."""
    ctx = worker_context()
    cutoff = utcnow() - dt.timedelta(seconds=ctx.settings.redispatch_after_s)
    with ctx.db.session() as s:
        pending = model_repo.pending_registrations(s, cutoff)
    sent = [v for v in pending if Dispatcher(ctx.settings).send(REGISTER_VERSION, v)]
    if sent:
        with ctx.db.transaction() as s:
            model_repo.mark_dispatched(s, sent)
        log.info("sweeper re-sent %d registration(s)", len(sent))
    return {"registrations": len(sent)}

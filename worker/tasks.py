"""Celery tasks: thin glue between the database, the artifact store and the engine.

Run a worker with ``unlearnd worker`` (or ``celery -A worker.tasks worker``)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket

from celery.signals import worker_init, worker_shutting_down
from sqlalchemy import select

from service.core import batching
from service.core.celery_app import (
    COLLECT_ARTIFACTS,
    DELIVER_WEBHOOKS,
    REGISTER_VERSION,
    RUN_CALIBRATION,
    RUN_JOB,
    SEQUENCE,
    SWEEP,
    make_celery,
    task_for_kind,
)
from service.core.models import Job, ModelVersion, utcnow
from service.core.repo import blobs, retention, transparency
from service.core.repo import models as model_repo
from service.core.repo import webhooks as webhook_repo
from service.core.settings import Settings
from service.core.statuses import JobStatus, VersionStatus

from .context import worker_context
from .pipeline.progress import SHUTDOWN
from .registration import validate_version
from .webhooks import deliver

log = logging.getLogger("unlearnd.worker")
app = make_celery(Settings())


@worker_init.connect
def _set_threads(**_) -> None:
    """Torch's CPU threads, once at start (``UNLEARND_WORKER_THREADS``): changing them mid-job has
    crashed backward passes."""
    threads = Settings().worker_threads
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


@worker_shutting_down.connect
def _release_the_running_job(**_) -> None:
    """SIGTERM (Celery's warm shutdown) or SIGINT: a running job stops at its next check and is
    released, queued again for another worker (worker/pipeline/endings.py), instead of holding the
    stop past its timeout."""
    SHUTDOWN.set()


@app.task(name=REGISTER_VERSION)
def register_version(version_id: int) -> str | None:
    ctx = worker_context()
    status = validate_version(ctx, int(version_id))
    if status == VersionStatus.READY:  # an automatic calibration, or requests that arrived while version 1 was pending
        with ctx.db.session() as s:
            model_id = s.scalar(select(ModelVersion.model_id).where(ModelVersion.id == int(version_id)))
        batching.next_job(ctx.db, ctx.dispatcher, model_id)
    return status


@app.task(name=RUN_JOB)
def run_job(job_id: int) -> str | None:
    """Run one claimed job; then claim the model's next batch if one is due (one job per model)."""
    from .pipeline import run_job as run

    ctx = worker_context()
    status = run(ctx, int(job_id), worker_name=f"{socket.gethostname()}:{os.getpid()}")
    if status is not None:
        _next(ctx, int(job_id))
        _purge_due(ctx, int(job_id))  # retention.purge_after_days = 0: the superseded versions go at once
        sequence()  # the job's requests get their certificates now, not after the next beat
    return status


@app.task(name=RUN_CALIBRATION)
def run_calibration(job_id: int) -> str | None:
    """Run one calibration job (a no-op while an older job of its model is active: it is sent
    again when that one ends); then start what the model does next."""
    from .calibration import run_calibration as run

    ctx = worker_context()
    status = run(ctx, int(job_id), worker_name=f"{socket.gethostname()}:{os.getpid()}")
    if status is not None:
        _next(ctx, int(job_id))
        _purge_due(ctx, int(job_id))  # a rewrite of the events or dataset file that waited for this job
    return status


def _next(ctx, job_id: int) -> None:
    with ctx.db.session() as s:
        model_id = s.scalar(select(Job.model_id).where(Job.id == job_id))
    batching.next_job(ctx.db, ctx.dispatcher, model_id)


def _purge_due(ctx, job_id: int) -> None:
    """After a job (deletion or calibration): purge what is due of its model, and do the learning-events
    and dataset-file rewrites that waited for a running job (service/core/repo/retention.py ``purge``)."""
    with ctx.db.session() as s:
        model_id = s.scalar(select(Job.model_id).where(Job.id == job_id))
    if model_id is not None:
        purged = retention.purge_due(ctx.db, ctx.store, model_id, catch_up=True)
        if purged:
            log.info("purged version(s) %s of model %s (retention)", [p["version"] for p in purged], model_id)


@app.task(name=SWEEP)
def sweep() -> dict:
    """The database says what is owed; re-send what the broker lost and start what is due:
    registrations still pending, batches whose wait ran out, queued jobs (deletion or calibration)
    whose wake-up was lost, and running jobs whose worker stopped beating (killed): the next
    delivery takes them over. And superseded versions whose retention ran out are purged
    (service/core/repo/retention.py), delivered or given-up webhook messages older than
    ``webhook_delivery_retention_days`` leave the delivery log, and webhook secrets whose grace
    period after a rotation is over are forgotten. The artifact store's orphans are not collected
    here but by :func:`collect_artifacts`, on an interval of its own: it walks the whole store."""
    ctx = worker_context()
    dispatcher = ctx.dispatcher
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=ctx.settings.redispatch_after_s)
    stale = now - dt.timedelta(seconds=ctx.settings.job_stale_after_s)
    with ctx.db.session() as s:
        pending = model_repo.pending_registrations(s, cutoff)
        models = batching.models_with_pending(s)
        lost = list(s.execute(select(Job.id, Job.kind).where(
            ((Job.status == JobStatus.QUEUED) & (Job.dispatched_at.is_(None) | (Job.dispatched_at < cutoff)))
            | ((Job.status == JobStatus.RUNNING) & (Job.heartbeat_at < stale)))).all())
    sent = [v for v in pending if dispatcher.send(REGISTER_VERSION, v)]
    if sent:
        with ctx.db.transaction() as s:
            model_repo.mark_dispatched(s, sent)
        log.info("sweeper re-sent %d registration(s)", len(sent))
    claimed = [m for m in models if batching.claim_and_dispatch(ctx.db, dispatcher, m) is not None]
    resent = [j for j, kind in lost if dispatcher.send(task_for_kind(kind), j)]
    if resent:
        with ctx.db.transaction() as s:
            s.execute(Job.__table__.update().where(Job.id.in_(resent)).values(dispatched_at=utcnow()))
        log.info("sweeper re-sent %d job(s): %s", len(resent), resent)
    purged = retention.sweep(ctx.db, ctx.store)
    if purged:
        log.info("sweeper purged %d version(s) (retention)", len(purged))
    pruned = webhook_repo.prune(ctx.db, now - dt.timedelta(days=ctx.settings.webhook_delivery_retention_days))
    if pruned:
        log.info("sweeper removed %d finished webhook message(s) from the delivery log", pruned)
    expired = webhook_repo.drop_expired_secrets(ctx.db, now)
    return {"registrations": len(sent), "batches": len(claimed), "jobs": len(resent), "purged": len(purged),
            "webhook_deliveries_pruned": pruned, "webhook_secrets_expired": expired}


@app.task(name=COLLECT_ARTIFACTS)
def collect_artifacts() -> dict:
    """The artifact store's collector (beat, every ``artifact_collect_interval_s``): blobs no row
    references and staging files, both untouched for ``artifact_grace_s``, leave the store
    (service/core/repo/blobs.py): a crashed job's checkpoint, an upload whose insert failed, a
    purge stopped before it pruned. It walks the whole store, and nothing becomes collectable
    faster than the grace, hence an interval of its own rather than every sweep."""
    ctx = worker_context()
    collected, staging = blobs.collect(ctx.db, ctx.store, grace_s=ctx.settings.artifact_grace_s)
    if collected or staging:
        log.info("collector removed %d blob(s) no row references and %d staging file(s), untouched for %gs",
                 len(collected), staging, ctx.settings.artifact_grace_s)
    return {"blobs_collected": len(collected), "staging_files_removed": staging}


@app.task(name=SEQUENCE)
def sequence() -> dict:
    """The transparency log's sequencer (beat, every ``sequence_interval_s``; also callable
    directly): completed deletion requests get their log entry, queued entries go into their
    tenant's tree under a new signed tree head, and provable certificates are signed."""
    ctx = worker_context()
    done = transparency.sequence(ctx.db, ctx.signer, ctx.settings.sequence_batch)
    if done.entries or done.certificates:
        log.info("sequencer: %d entr(ies) in %d tree head(s), %d certificate(s)", done.entries,
                 len(done.tree_heads), done.certificates)
    return done.to_dict()


@app.task(name=DELIVER_WEBHOOKS)
def deliver_webhooks() -> dict:
    """Send the due webhook messages of the outbox (beat, every ``webhook_interval_s``; also sent
    when a transaction that wrote messages commits): each is signed, retried with backoff, and
    given up after ``webhook_max_attempts`` (worker/webhooks.py)."""
    ctx = worker_context()
    done = deliver(ctx.db, ctx.settings)
    if done["sent"]:
        log.info("webhooks: %d sent, %d delivered, %d given up", done["sent"], done["delivered"], done["failed"])
    return done

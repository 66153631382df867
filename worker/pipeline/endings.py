"""How a run ends without publishing a version: canceled, released (the worker is stopping),
failed, or nothing left to unlearn.
Each is one fenced transaction on the job, its requests (service/core/repo/requests.py) and the
audit log."""

from __future__ import annotations

import logging

from service.core import batching
from service.core.models import utcnow
from service.core.repo import audit as audit_log
from service.core.repo import requests
from service.core.statuses import JobStatus

from ..context import WorkerContext
from .lease import Lease
from .loading import JobRecord
from .progress import Progress

log = logging.getLogger("unlearnd.worker")


def cancel(ctx: WorkerContext, lease: Lease, progress: Progress, why: str, *, started: bool = True) -> str:
    """Publish nothing; the requests go back to pending. ``stage`` keeps where it stopped (None if
    it never started)."""
    now = utcnow()
    with ctx.db.transaction() as session:
        job = lease.lock_job(session)
        requeued = requests.requeue(session, job.id, now)
        stage = progress.stage if started else None
        job.status, job.finished_at, job.timings, job.stage = JobStatus.CANCELED, now, progress.timings(), stage
        audit_log.record(session, job.tenant_id, "worker", "job.canceled", f"job:{job.id}", {
            "model_id": job.model_id, "stage": stage, "reason": why, "requests": requeued,
            "attempts": job.attempts})
    log.info("job %s: canceled during %s; %d request(s) back to pending", lease.job_id, stage, len(requeued))
    return JobStatus.CANCELED.value


def release(ctx: WorkerContext, lease: Lease, progress: Progress) -> str:
    """The worker is shutting down: the job goes back to ``queued`` with its requests (``batched``),
    for the next worker, and its wake-up is sent again. Nothing was published; the next claim is a
    new attempt (its fencing token), so nothing this run might still write can land."""
    now = utcnow()
    with ctx.db.transaction() as session:
        job = lease.lock_job(session)
        requests.release(session, job.id, now)
        stage = progress.stage
        job.status, job.stage, job.progress, job.worker, job.heartbeat_at = JobStatus.QUEUED, None, 0.0, None, None
        kind = job.kind
        audit_log.record(session, job.tenant_id, "worker", "job.released", f"job:{job.id}", {
            "model_id": job.model_id, "stage": stage, "attempts": job.attempts, "worker": lease.worker})
    batching.dispatch(ctx.db, ctx.dispatcher, lease.job_id, kind)  # a lost wake-up is sent again by the sweeper
    log.info("job %s: released during %s (worker shutting down); queued again", lease.job_id, stage)
    return JobStatus.QUEUED.value


def fail(ctx: WorkerContext, lease: Lease, progress: Progress, exc: BaseException) -> str:
    """Record the error (type, message, stage) on the job; each request goes back to pending, or
    fails once it took part in ``max_request_attempts`` jobs."""
    now = utcnow()
    error = {"type": type(exc).__name__, "message": str(exc)[:2000], "stage": progress.stage}
    with ctx.db.transaction() as session:
        job = lease.lock_job(session)
        failed, requeued = requests.fail_job(session, job.id, error, ctx.settings.max_request_attempts, now)
        job.status, job.finished_at, job.error, job.timings = JobStatus.FAILED, now, error, progress.timings()
        audit_log.record(session, job.tenant_id, "worker", "job.failed", f"job:{job.id}", {
            "model_id": job.model_id, "error": error, "attempts": job.attempts, "requests_failed": failed,
            "requests_requeued": requeued})
    return JobStatus.FAILED.value


def finish_empty(ctx: WorkerContext, lease: Lease, progress: Progress, record: JobRecord) -> str:
    """Nothing left to unlearn (every new sample was forgotten by an earlier job meanwhile): publish
    no version. Such samples are linked to the request that forgot them (as the API links them on
    arrival); a request then covered by completed work completes with the newest version involved,
    the others go back to pending (all linked now: they complete when their linked requests do)."""
    now = utcnow()
    with ctx.db.transaction() as session:
        job = lease.lock_job(session)
        requests.link_forgotten(session, job.model_id, [(s.request_id, s.row, s.linked_request_id)
                                                        for s in record.forget_set.samples])
        completed = requests.complete_linked(session, job.model_id, now)
        for request_id in requests.in_job(session, job.id):
            version = requests.covered_by(session, job.model_id, request_id)
            if version is not None:
                requests.complete(session, [request_id], version, now)
                completed.append(request_id)
        requeued = requests.requeue(session, job.id, now)
        job.status, job.stage, job.progress, job.finished_at = JobStatus.SUCCEEDED, None, 1.0, now
        job.timings = progress.timings()
        audit_log.record(session, job.tenant_id, "worker", "job.succeeded", f"job:{job.id}", {
            "model_id": job.model_id, "base_version": record.base.version, "new_version": None, "n_forget": 0,
            "published": False, "completed": sorted(completed), "requeued": requeued})
    log.info("job %s: nothing left to unlearn (%d row(s) forgotten earlier); no version published",
             lease.job_id, record.forget_set.already_forgotten)
    return JobStatus.SUCCEEDED.value


__all__ = ["cancel", "fail", "finish_empty", "release"]

"""Jobs (deletion and calibration): status, stage, progress, timings, error; cancellation."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.core.auth import Caller
from service.core.errors import Conflict, conflict, not_found
from service.core.models import Job, Model, utcnow
from service.core.repo import audit, requests
from service.core.repo.common import iso
from service.core.repo.datasets import MAX_ID
from service.core.statuses import JobStatus

KINDS = ("deletion", "calibration")


def get(session: Session, caller: Caller, job_id: int) -> Job:
    row = (session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == caller.tenant_id))
           if 0 < job_id <= MAX_ID else None)
    if row is None:
        raise not_found(f"job {job_id}")
    return row


def query(caller: Caller, model_id: int | None = None, status: JobStatus | None = None, kind: str | None = None):
    q = select(Job).where(Job.tenant_id == caller.tenant_id)
    if model_id is not None:
        q = q.where(Job.model_id == model_id)
    if kind:
        q = q.where(Job.kind == kind)
    return q.where(Job.status == status) if status else q


def create_calibration(session: Session, model: Model, *, settings: dict, apply: bool | None, actor: str,
                       trigger: str) -> Job:
    """A ``queued`` calibration job of ``model`` (the caller holds the model row's lock). It runs
    when it is the oldest active job of the model: a deletion job running now finishes first, and
    no deletion batch is claimed while it waits or runs (service/core/batching.py). One calibration per
    model at a time: 409 while one is active."""
    active = session.scalar(select(Job.id).where(Job.model_id == model.id, Job.kind == "calibration",
                                                 Job.status.in_(JobStatus.ACTIVE)).limit(1))
    if active is not None:
        raise conflict(f"model {model.id} has a calibration in progress (job {active})")
    job = Job(tenant_id=model.tenant_id, model_id=model.id, kind="calibration", status=JobStatus.QUEUED,
              policy=model.policy, policy_revision=model.policy_revision,
              params={"settings": settings, "apply": apply, "trigger": trigger})
    session.add(job)
    session.flush()
    audit.record(session, model.tenant_id, actor, "calibration.requested", f"job:{job.id}",
                 {"model_id": model.id, "settings": settings, "apply": apply, "trigger": trigger,
                  "policy_revision": model.policy_revision})
    return job


def cancel(session: Session, caller: Caller, job_id: int) -> Job:
    """A queued job is canceled at once (its requests go back to pending); a running one is asked
    to stop at its next step and publishes nothing."""
    job = get(session, caller, job_id)
    if job.status in JobStatus.TERMINAL:
        raise Conflict(f"job {job_id} is {job.status} and cannot be canceled", title="Job finished",
                       kind="job-finished")
    now = utcnow()
    if job.status == JobStatus.QUEUED:
        done = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(
            status=JobStatus.CANCELED, cancel_requested=True, finished_at=now, stage=None))
        if done.rowcount == 1:
            requests.requeue(session, job_id, now)
            audit.record(session, caller.tenant_id, caller.actor, "job.canceled", f"job:{job_id}", {"while": "queued"})
            session.refresh(job)
            return job
    job.cancel_requested = True
    audit.record(session, caller.tenant_id, caller.actor, "job.cancel_requested", f"job:{job_id}", {})
    session.flush()
    return job


def render(j: Job) -> dict:
    return {"id": j.id, "kind": j.kind, "model_id": j.model_id, "status": j.status, "stage": j.stage,
            "progress": j.progress, "policy_revision": j.policy_revision, "params": j.params,
            "base_version": j.base_version, "result_version": j.result_version, "n_requests": j.n_requests,
            "n_forget": j.n_forget, "cancel_requested": j.cancel_requested, "attempts": j.attempts,
            "error": j.error, "timings": j.timings, "worker": j.worker, "created_at": iso(j.created_at),
            "started_at": iso(j.started_at), "finished_at": iso(j.finished_at),
            "heartbeat_at": iso(j.heartbeat_at),
            "links": {"self": f"/v1/jobs/{j.id}",
                      "report": f"/v1/jobs/{j.id}/report" if j.report_sha256 else None,
                      "report_html": f"/v1/jobs/{j.id}/report.html" if j.report_html_sha256 else None,
                      "version": (f"/v1/models/{j.model_id}/versions/{j.result_version}"
                                  if j.result_version else None)}}

"""Batching: pending deletion requests of one model are claimed atomically into one job.

A batch is claimed when ``batching.max_requests`` requests are pending, when the oldest waited
``batching.max_wait_s``, or on ``POST /v1/models/{id}/flush``. One job per model runs at a time:
a model with a queued or running job (a deletion job or a calibration) claims nothing (its requests
wait for the next batch, which the worker claims when the job ends, or the sweeper). A flush that
finds a job active is remembered (``models.flush_requested_at``): the next batch is then due as
soon as that job ends, and the claim that takes it clears the mark. A calibration
requested while a deletion job runs is queued and starts when that job ends (``next_job``): a
calibration job only runs as the oldest active job of its model (worker/calibration.py).
On PostgreSQL the model row is locked and the pending requests are taken with
``FOR UPDATE SKIP LOCKED``; SQLite has a single writer (``BEGIN IMMEDIATE``), which serializes claims the same way.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, Connection, Integer, bindparam, column, exists, func, select, text, update
from sqlalchemy.orm import Session

from service.core.db import is_postgres
from service.core.models import DeletionRequest, DeletionRequestSample, Job, Model, ModelVersion, utcnow
from service.core.policy import Batching
from service.core.repo import audit, requests
from service.core.statuses import JobStatus, RequestStatus, VersionStatus


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


def batching_of(policy: dict | None) -> Batching:
    """A stored policy's batching part, with the defaults of service/core/policy.py for what it leaves out."""
    return Batching.model_validate((policy or {}).get("batching") or {})


def has_new_samples():
    """A request with at least one sample not already covered by earlier work."""
    return exists().where(DeletionRequestSample.request_id == DeletionRequest.id,
                          DeletionRequestSample.linked_request_id.is_(None))


def claim(session: Session, model_id: int, *, force: bool = False, now: dt.datetime | None = None) -> Job | None:
    """Claim the model's pending requests into a new ``queued`` job, if a batch is due; in the
    caller's transaction. Returns the job, or None (nothing pending, not due, or a job active)."""
    now = now or utcnow()
    pg = is_postgres(session)
    q = select(Model).where(Model.id == model_id)
    model = session.scalar(q.with_for_update(of=Model) if pg else q)
    if model is None:
        return None
    pending_q = (select(DeletionRequest).where(DeletionRequest.model_id == model_id,
                                               DeletionRequest.status == RequestStatus.RECEIVED, has_new_samples())
                 .order_by(DeletionRequest.id))
    if session.scalar(select(Job.id).where(Job.model_id == model_id, Job.status.in_(JobStatus.ACTIVE)).limit(1)):
        if force and model.flush_requested_at is None and session.scalar(pending_q.with_only_columns(
                DeletionRequest.id).limit(1)):
            model.flush_requested_at = now  # remembered: the next batch is due when the active job ends
        return None
    if not session.scalar(select(ModelVersion.id).where(ModelVersion.model_id == model_id,
                                                        ModelVersion.status == VersionStatus.READY).limit(1)):
        return None  # nothing to unlearn from yet
    pending = list(session.scalars(pending_q.with_for_update(skip_locked=True) if pg else pending_q))
    remembered = model.flush_requested_at is not None
    if not pending:
        if remembered:  # what the flush was for was batched, or linked to other work, meanwhile
            model.flush_requested_at = None
        return None
    batching = batching_of(model.policy)
    oldest = _aware(pending[0].created_at)
    due = (force or remembered or len(pending) >= batching.max_requests
           or (now - oldest).total_seconds() >= batching.max_wait_s)
    if not due:
        return None
    if remembered:
        model.flush_requested_at = None
    ids = [r.id for r in pending]
    n_forget = session.scalar(select(func.count(func.distinct(DeletionRequestSample.row))).where(
        DeletionRequestSample.request_id.in_(ids), DeletionRequestSample.linked_request_id.is_(None)))
    job = Job(tenant_id=model.tenant_id, model_id=model_id, kind="deletion", status=JobStatus.QUEUED,
              policy=model.policy,
              policy_revision=model.policy_revision, n_requests=len(ids), n_forget=int(n_forget or 0))
    session.add(job)
    session.flush()
    requests.batch(session, ids, job.id, now)
    audit.record(session, model.tenant_id, "batcher", "job.created", f"job:{job.id}",
                 {"model_id": model_id, "requests": ids, "n_forget": job.n_forget,
                  "trigger": "flush" if force else "remembered-flush" if remembered else "batch",
                  "policy_revision": model.policy_revision})
    return job


def _due_queries():
    """The two looks of ``maybe_due``, built once.

    The first costs a few index probes whatever the backlog: the model's policy and flush mark,
    whether a job of it is active, and the ids of its oldest and newest received requests
    (``ix_deletion_requests_model_status_id``). Ids come from one sequence, so the model has at most
    ``newest - oldest + 1`` received requests: a bound on their number that needs no count. It runs
    after every accepted request, so it is written out as text with its columns declared: SQLAlchemy
    then neither walks the statement for its cache key nor reads the result's shape from the cursor
    on each call (0.07 ms a call as a composed select). The second, run only when that bound (or the
    age, or a flush) says a batch may be due, counts the requests with new samples up to
    ``max_requests`` (a LIMIT: never more rows than a batch)."""
    dr, m, jobs = DeletionRequest.__table__, Model.__table__, Job.__table__
    received = f"d.model_id = m.id AND d.status = '{RequestStatus.RECEIVED}'"
    first = f"SELECT {{}} FROM {dr.name} d WHERE {received} ORDER BY d.id{{}} LIMIT 1"
    active = ", ".join(f"'{status}'" for status in JobStatus.ACTIVE)  # our statuses: nothing to escape
    look = text(f"""
SELECT m.policy, m.flush_requested_at,
       EXISTS (SELECT 1 FROM {jobs.name} j WHERE j.model_id = m.id AND j.status IN ({active})) AS active,
       ({first.format("d.id", "")}) AS first_id, ({first.format("d.created_at", "")}) AS first_at,
       ({first.format("d.id", " DESC")}) AS last_id
FROM {m.name} m WHERE m.id = :model_id""").columns(
        m.c.policy, m.c.flush_requested_at, column("active", Boolean), column("first_id", Integer),
        column("first_at", dr.c.created_at.type), column("last_id", Integer))
    model_id = bindparam("model_id")
    new = (DeletionRequest.model_id == model_id, DeletionRequest.status == RequestStatus.RECEIVED, has_new_samples())
    counted = select(DeletionRequest.id).where(*new).limit(bindparam("bound")).subquery()
    exact = select(select(func.count()).select_from(counted).scalar_subquery(),
                   select(DeletionRequest.created_at).where(*new).order_by(DeletionRequest.id).limit(1)
                   .scalar_subquery())
    return look, exact


LOOK, RECEIVED_WITH_NEW_SAMPLES = _due_queries()


def maybe_due(session: Session | Connection, model_id: int, now: dt.datetime | None = None) -> bool:
    """A cheap, lock-free look: could a batch be due now? (``claim`` decides under the lock.) Keeps
    the per-model lock off the hot path of accepting requests, and its cost off the backlog: False
    while a job of the model is active (``claim`` would take nothing; the job's end claims what
    waits, ``next_job``), else a bound on the number of received requests from their ids, and only
    when that bound, their age or a flush says a batch may be due, the count of those with new
    samples (at most ``max_requests`` rows read)."""
    now = now or utcnow()
    policy, flush_requested, active, first_id, first_at, last_id = session.execute(
        LOOK, {"model_id": model_id}).one()
    if active or first_id is None:
        return False
    batching = batching_of(policy)

    def due(n: int, oldest: dt.datetime | None) -> bool:
        if not n:
            return False
        waited = (now - _aware(oldest)).total_seconds()
        return flush_requested is not None or n >= batching.max_requests or waited >= batching.max_wait_s

    if not due(last_id - first_id + 1, first_at):
        return False
    n, oldest = session.execute(RECEIVED_WITH_NEW_SAMPLES, {"model_id": model_id,
                                                            "bound": batching.max_requests}).one()
    return due(n, oldest)


def models_with_pending(session: Session) -> list[int]:
    """Models that have claimable requests and no active job (the sweeper checks if they are due)."""
    active = select(Job.model_id).where(Job.status.in_(JobStatus.ACTIVE))
    q = (select(DeletionRequest.model_id).where(DeletionRequest.status == RequestStatus.RECEIVED, has_new_samples(),
                                                DeletionRequest.model_id.not_in(active)).distinct())
    return list(session.scalars(q))


def claim_and_dispatch(db, dispatcher, model_id: int, *, force: bool = False) -> Job | None:
    """Claim in its own transaction, then wake a worker (a lost wake-up is re-sent by the sweeper)."""
    with db.transaction() as session:
        job = claim(session, model_id, force=force)
    if job is not None:
        dispatch(db, dispatcher, job.id, job.kind)
    return job


def dispatch(db, dispatcher, job_id: int, kind: str) -> bool:
    """Wake a worker for a queued job (the task of its kind) and record when."""
    from service.core.celery_app import task_for_kind

    if not dispatcher.send(task_for_kind(kind), job_id):
        return False
    with db.transaction() as session:
        session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))
    return True


def next_job(db, dispatcher, model_id: int) -> Job | None:
    """What a model does next once a job of it ended (or version 1 became ready): a queued
    calibration that waited for it, else the next deletion batch if one is due."""
    with db.session() as session:
        oldest = session.scalar(select(Job).where(Job.model_id == model_id, Job.status.in_(JobStatus.ACTIVE))
                                .order_by(Job.id).limit(1))
    if oldest is not None:
        if oldest.status == JobStatus.QUEUED:
            dispatch(db, dispatcher, oldest.id, oldest.kind)
        return oldest
    return claim_and_dispatch(db, dispatcher, model_id)

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
from dataclasses import dataclass

from sqlalchemy import JSON, Boolean, Connection, Integer, bindparam, column, exists, func, select, text, update
from sqlalchemy.orm import Session

from service.core.db import is_postgres
from service.core.models import DeletionRequest, DeletionRequestSample, Job, Model, ModelVersion, utcnow
from service.core.policy import Batching
from service.core.repo import audit, requests
from service.core.repo.common import aware
from service.core.statuses import JobStatus, RequestStatus, VersionStatus, sql_list


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
    oldest = aware(pending[0].created_at)
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


@dataclass(frozen=True)
class Backlog:
    """What tells whether a model's batch may be due, read without counting its backlog: its
    batching policy and flush mark, whether a job of it is active, and the ids (and the age) of its
    oldest and newest received requests. Ids come from one sequence, so the model has at most
    ``last_id - first_id + 1`` received requests: a bound on their number that needs no count."""

    batching: Batching
    flush_requested: dt.datetime | None
    active: bool
    first_id: int | None
    first_at: dt.datetime | None
    last_id: int | None

    @classmethod
    def of_row(cls, row, policy: dict | None) -> Backlog:
        return cls(batching_of(policy), row.flush_requested_at, bool(row.active), row.first_id, row.first_at,
                   row.last_id)

    def bound(self) -> int:
        return 0 if self.first_id is None else self.last_id - self.first_id + 1

    def due(self, n: int, oldest: dt.datetime | None, now: dt.datetime) -> bool:
        """Whether ``n`` claimable requests, the oldest received at ``oldest``, make a batch due."""
        if not n or self.active:
            return False
        return (self.flush_requested is not None or n >= self.batching.max_requests
                or (now - aware(oldest)).total_seconds() >= self.batching.max_wait_s)


def backlog_sql(policy: str) -> str:
    """The select list of a :class:`Backlog` of the model aliased ``m`` (its policy as ``policy``
    gives it), as SQL text: a few index probes (``ix_deletion_requests_model_status_id``, the jobs'
    ``(model_id, status)``) whatever the backlog. Written out, with its columns declared
    (:data:`BACKLOG_COLUMNS`), because it runs for every accepted request: SQLAlchemy then neither
    walks a composed statement for its cache key nor reads the result's shape from the cursor on
    each call (0.07 ms a call as a composed select)."""
    dr, jobs = DeletionRequest.__tablename__, Job.__tablename__
    received = f"d.model_id = m.id AND d.status = '{RequestStatus.RECEIVED}'"
    first = f"SELECT {{}} FROM {dr} d WHERE {received} ORDER BY d.id{{}} LIMIT 1"
    return f"""{policy} AS policy, m.flush_requested_at,
       EXISTS (SELECT 1 FROM {jobs} j WHERE j.model_id = m.id AND j.status IN ({sql_list(JobStatus.ACTIVE)})) AS active,
       ({first.format("d.id", "")}) AS first_id, ({first.format("d.created_at", "")}) AS first_at,
       ({first.format("d.id", " DESC")}) AS last_id"""


BACKLOG_COLUMNS = (column("policy", JSON), column("flush_requested_at", Model.flush_requested_at.type),
                   column("active", Boolean), column("first_id", Integer),
                   column("first_at", DeletionRequest.created_at.type), column("last_id", Integer))
LOOK = text(f"SELECT {backlog_sql('m.policy')} FROM {Model.__tablename__} m WHERE m.id = :model_id").columns(
    *BACKLOG_COLUMNS)


def _received_with_new_samples():
    """The exact look: the received requests with new samples, counted up to ``max_requests`` (a
    LIMIT: never more rows than a batch), and the oldest of them."""
    model_id = bindparam("model_id")
    new = (DeletionRequest.model_id == model_id, DeletionRequest.status == RequestStatus.RECEIVED, has_new_samples())
    counted = select(DeletionRequest.id).where(*new).limit(bindparam("bound")).subquery()
    return select(select(func.count()).select_from(counted).scalar_subquery(),
                  select(DeletionRequest.created_at).where(*new).order_by(DeletionRequest.id).limit(1)
                  .scalar_subquery())


RECEIVED_WITH_NEW_SAMPLES = _received_with_new_samples()


def maybe_due(session: Session | Connection, model_id: int, now: dt.datetime | None = None) -> bool:
    """A cheap, lock-free look: could a batch be due now? (``claim`` decides under the lock.) Keeps
    the per-model lock off the hot path of accepting requests, and its cost off the backlog: the
    model's :class:`Backlog` (False while a job of the model is active: ``claim`` would take nothing,
    and the job's end claims what waits, ``next_job``), and only when its bound, the age or a flush
    says a batch may be due, the exact count of those with new samples (at most ``max_requests``)."""
    now = now or utcnow()
    row = session.execute(LOOK, {"model_id": model_id}).one()
    backlog = Backlog.of_row(row, row.policy)
    if not backlog.due(backlog.bound(), backlog.first_at, now):
        return False
    n, oldest = session.execute(RECEIVED_WITH_NEW_SAMPLES, {"model_id": model_id,
                                                            "bound": backlog.batching.max_requests}).one()
    return backlog.due(n, oldest, now)


def may_complete_a_batch(before: Backlog | None, now: dt.datetime | None = None) -> bool:
    """Whether a request just accepted may have made a batch due, from the model's :class:`Backlog`
    as the request's first query saw it (before its write; None: not read, so look). Its bound
    plus the request itself, the age of the oldest, a flush mark: if none says a batch may be due,
    the accept path skips its look after the commit (``maybe_due``). Two requests that complete a
    batch at the same instant may then both skip it, neither having seen the other: the model's next
    request, or the sweeper within ``sweep_interval_s``, claims that batch."""
    if before is None:
        return True
    now = now or utcnow()
    return before.due(before.bound() + 1, before.first_at or now, now)


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

"""Every status transition of deletion requests, in the caller's transaction.

``received → batched`` (the batcher, service/core/batching.py) ``→ processing`` (a worker claimed
the job) ``→ completed`` (its job published a version; or every sample of it is covered by
completed work) ``| failed`` (its jobs failed ``max_request_attempts`` times). A canceled job, a
failed job with attempts left, or a job that had nothing left to unlearn puts its requests back
to ``received`` (``requeue``): they are batched again. Requests are created in
service/core/repo/deletions.py (``received``, or ``completed`` at once when every sample was
forgotten already).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session, aliased

from service.core.models import DeletionRequest, DeletionRequestSample, ForgottenSample, utcnow
from service.core.statuses import RequestStatus


def _in_job(job_id: int):
    return (DeletionRequest.job_id == job_id) & DeletionRequest.status.in_(RequestStatus.IN_JOB)


def in_job(session: Session, job_id: int) -> list[int]:
    """The requests of job ``job_id`` that are still in it (``batched`` or ``processing``)."""
    return list(session.scalars(select(DeletionRequest.id).where(_in_job(job_id)).order_by(DeletionRequest.id)))


def batch(session: Session, request_ids: Sequence[int], job_id: int, now: dt.datetime | None = None) -> None:
    """``received → batched``: the requests go into job ``job_id``."""
    session.execute(update(DeletionRequest).where(DeletionRequest.id.in_(list(request_ids)))
                    .values(status=RequestStatus.BATCHED, job_id=job_id, updated_at=now or utcnow()))


def start(session: Session, job_id: int, now: dt.datetime | None = None) -> None:
    """``batched → processing``: a worker claimed job ``job_id``."""
    session.execute(update(DeletionRequest)
                    .where(DeletionRequest.job_id == job_id, DeletionRequest.status == RequestStatus.BATCHED)
                    .values(status=RequestStatus.PROCESSING, updated_at=now or utcnow()))


def release(session: Session, job_id: int, now: dt.datetime | None = None) -> None:
    """``processing → batched``: job ``job_id`` was released by a worker that stopped; the requests
    stay in it for the next worker."""
    session.execute(update(DeletionRequest)
                    .where(DeletionRequest.job_id == job_id, DeletionRequest.status == RequestStatus.PROCESSING)
                    .values(status=RequestStatus.BATCHED, updated_at=now or utcnow()))


def requeue(session: Session, job_id: int, now: dt.datetime | None = None) -> list[int]:
    """The requests still in job ``job_id`` go back to ``received`` (batched again later); returns
    their ids."""
    ids = in_job(session, job_id)
    if ids:
        session.execute(update(DeletionRequest).where(DeletionRequest.id.in_(ids)).values(
            status=RequestStatus.RECEIVED, job_id=None, updated_at=now or utcnow()))
    return ids


def complete(session: Session, request_ids: Iterable[int], version: int | None,
             now: dt.datetime | None = None) -> None:
    """The requests are ``completed``: their samples are forgotten from ``version`` on."""
    ids = list(request_ids)
    if not ids:
        return
    now = now or utcnow()
    session.execute(update(DeletionRequest).where(DeletionRequest.id.in_(ids)).values(
        status=RequestStatus.COMPLETED, result_version=version, completed_at=now, updated_at=now, error=None))


def complete_job(session: Session, job_id: int, version: int, now: dt.datetime | None = None) -> None:
    """Every request of job ``job_id`` that has not ended completes with ``version`` (the job published it)."""
    now = now or utcnow()
    session.execute(update(DeletionRequest).where(DeletionRequest.job_id == job_id,
                                                  DeletionRequest.status.not_in(RequestStatus.TERMINAL))
                    .values(status=RequestStatus.COMPLETED, result_version=version, completed_at=now,
                            updated_at=now, error=None))


def complete_linked(session: Session, model_id: int, now: dt.datetime | None = None) -> list[int]:
    """Complete every open request of the model whose samples are all linked to requests now
    completed (and that has no sample of its own), with the newest version among its targets;
    repeated until none is left (a link may point at a request completed in the round before).
    Returns the ids completed."""
    now = now or utcnow()
    target = aliased(DeletionRequest)
    done: list[int] = []
    while True:
        own = exists().where(DeletionRequestSample.request_id == DeletionRequest.id,
                             DeletionRequestSample.linked_request_id.is_(None))
        some = exists().where(DeletionRequestSample.request_id == DeletionRequest.id)
        open_target = exists().where(DeletionRequestSample.request_id == DeletionRequest.id,
                                     DeletionRequestSample.linked_request_id == target.id,
                                     target.status != RequestStatus.COMPLETED)
        ids = list(session.scalars(select(DeletionRequest.id).where(
            DeletionRequest.model_id == model_id, DeletionRequest.status.not_in(RequestStatus.TERMINAL),
            some, ~own, ~open_target).order_by(DeletionRequest.id)))
        if not ids:
            return done
        versions = dict(session.execute(
            select(DeletionRequestSample.request_id, func.max(target.result_version))
            .join(target, DeletionRequestSample.linked_request_id == target.id)
            .where(DeletionRequestSample.request_id.in_(ids)).group_by(DeletionRequestSample.request_id)).all())
        for request_id in ids:
            complete(session, [request_id], versions.get(request_id), now)
        done += ids


def covered_by(session: Session, model_id: int, request_id: int) -> int | None:
    """The version from which every sample of a request is forgotten (its own rows in
    ``forgotten_samples``, its linked requests completed), or None if some sample is not yet."""
    versions = []
    for row, linked in session.execute(select(DeletionRequestSample.row, DeletionRequestSample.linked_request_id)
                                       .where(DeletionRequestSample.request_id == request_id)):
        if linked is None:
            version = session.scalar(select(ForgottenSample.version).where(ForgottenSample.model_id == model_id,
                                                                           ForgottenSample.row == row))
        else:
            version = session.scalar(select(DeletionRequest.result_version).where(
                DeletionRequest.id == linked, DeletionRequest.status == RequestStatus.COMPLETED))
        if version is None:
            return None
        versions.append(version)
    return max(versions) if versions else None


def link_forgotten(session: Session, model_id: int, samples: Iterable[tuple[int, int, int | None]]) -> None:
    """Link each unlinked sample ``(request_id, row, linked_request_id)`` whose row the model has
    forgotten meanwhile to the request that forgot it (as the API links a sample on arrival)."""
    by_row = dict(session.execute(select(ForgottenSample.row, ForgottenSample.request_id).where(
        ForgottenSample.model_id == model_id, ForgottenSample.request_id.is_not(None))).all())
    for request_id, row, linked in samples:
        if linked is None and by_row.get(row) not in (None, request_id):
            session.execute(update(DeletionRequestSample).where(DeletionRequestSample.request_id == request_id,
                                                                DeletionRequestSample.row == row)
                            .values(linked_request_id=by_row[row]))


def fail_job(session: Session, job_id: int, error: dict, max_attempts: int,
             now: dt.datetime | None = None) -> tuple[list[int], list[int]]:
    """Job ``job_id`` failed: each of its requests counts one more attempt; those that took part in
    ``max_attempts`` jobs are ``failed`` (with ``error``), the others go back to ``received``.
    Requests waiting on a failed one carry their samples themselves from then on (unlinked).
    Returns (failed ids, requeued ids)."""
    now = now or utcnow()
    in_job = _in_job(job_id)
    session.execute(update(DeletionRequest).where(in_job).values(attempts=DeletionRequest.attempts + 1,
                                                                 updated_at=now))
    failed = list(session.scalars(select(DeletionRequest.id).where(in_job, DeletionRequest.attempts >= max_attempts)
                                  .order_by(DeletionRequest.id)))
    if failed:
        session.execute(update(DeletionRequest).where(DeletionRequest.id.in_(failed)).values(
            status=RequestStatus.FAILED, error={**error, "job_id": job_id}))
        waiting = select(DeletionRequest.id).where(DeletionRequest.status.in_(RequestStatus.ACTIVE))
        session.execute(update(DeletionRequestSample).where(DeletionRequestSample.linked_request_id.in_(failed),
                                                            DeletionRequestSample.request_id.in_(waiting))
                        .values(linked_request_id=None))
    return failed, requeue(session, job_id, now)


__all__ = ["batch", "complete", "complete_job", "complete_linked", "covered_by", "fail_job", "in_job", "link_forgotten",
           "requeue", "start"]

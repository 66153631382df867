"""The lease on a job: the claim, its fencing token and the heartbeat that keeps it.

A worker claims a job in one transaction (``claim``); the claimed ``jobs.attempts`` is the fencing
token. Every later write of the run names the job, ``status = running`` and that token
(``Lease.fenced``), and the final transactions lock the job row and check them
(``Lease.lock_job``): a worker whose job was taken over after its heartbeat went stale finds it
no longer holds the lease (``Lost``) and writes nothing more.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from dataclasses import dataclass

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from service.core.db import Database
from service.core.models import Job, ModelVersion, utcnow
from service.core.repo import redaction, requests
from service.core.statuses import JobStatus

from ..context import WorkerContext

log = logging.getLogger("unlearnd.worker")


class Lost(Exception):
    """This run no longer holds the job (taken over after a stale heartbeat, or finished elsewhere)."""


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Lease:
    """A claimed job: who holds it and under which token (``jobs.attempts`` after the claim)."""

    job_id: int
    token: int
    worker: str
    tenant_id: int
    model_id: int
    cancel_requested: bool  # as read at the claim
    published: int | None  # the version number an earlier attempt of this job already published
    lost: bool = False  # set once a fenced write found the job no longer ours

    def fenced(self, stmt):
        """``stmt`` (an UPDATE of ``jobs``) restricted to this lease."""
        return stmt.where(Job.id == self.job_id, Job.status == JobStatus.RUNNING, Job.attempts == self.token)

    def lock_job(self, session: Session) -> Job:
        """The job row, locked (PostgreSQL) for a final transaction; raises Lost if not ours."""
        job = session.scalar(select(Job).where(Job.id == self.job_id).with_for_update())
        if job is None or job.status != JobStatus.RUNNING or job.attempts != self.token:
            self.lost = True
            raise Lost
        return job

    def check(self) -> None:
        """Raise Lost when a fenced write (or the heartbeat) found the job taken over."""
        if self.lost:
            raise Lost

    def update(self, db: Database, **values) -> None:
        """One fenced update of the job row in its own transaction; raises Lost if not ours."""
        with db.transaction() as session:
            done = session.execute(self.fenced(update(Job)).values(**values))
        if done.rowcount != 1:
            self.lost = True
            raise Lost


def claim(ctx: WorkerContext, job_id: int, worker: str, *, kind: str = "deletion") -> Lease | None:
    """Claim a job of ``kind``: queued, or running with a stale heartbeat (its worker was killed).
    A calibration is claimed only as the oldest active job of its model (a deletion job ahead of it
    finishes first). The job's requests go to ``processing``. None: nothing to claim."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=ctx.settings.job_stale_after_s)
    claimable = [Job.id == job_id, Job.kind == kind, or_(
        Job.status == JobStatus.QUEUED,
        and_(Job.status == JobStatus.RUNNING, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale)))]
    if kind != "deletion":
        other = aliased(Job)
        claimable.append(~exists().where(other.model_id == Job.model_id, other.id < Job.id,
                                         other.status.in_(JobStatus.ACTIVE)))
    with ctx.db.transaction() as session:
        done = session.execute(
            update(Job).where(*claimable)
            .values(status=JobStatus.RUNNING, attempts=Job.attempts + 1, worker=worker, heartbeat_at=now,
                    started_at=func.coalesce(Job.started_at, now), stage="loading")
            .execution_options(synchronize_session=False))
        if done.rowcount != 1:
            return None
        # The job will read its dataset's file once this commits: a rewrite of it in progress commits
        # first (its worker reads the new address), and one that starts later sees the job running and
        # waits (service/core/repo/redaction.py). Taken after the job row, so the claim never holds
        # the dataset row while it waits for another lock.
        redaction.share_file_of_job(session, job_id)
        job = session.execute(select(Job.tenant_id, Job.model_id, Job.attempts, Job.cancel_requested)
                              .where(Job.id == job_id)).one()
        requests.start(session, job_id, now)
        published = session.scalar(select(ModelVersion.version).where(ModelVersion.job_id == job_id))
    return Lease(job_id, job.attempts, worker, job.tenant_id, job.model_id, bool(job.cancel_requested), published)


class Heartbeat:
    """Touches ``jobs.heartbeat_at`` every ``every_s`` seconds from a thread while the run works;
    marks the lease lost when the job is no longer ours. A database blip is retried at the next beat."""

    def __init__(self, db: Database, lease: Lease, every_s: float):
        self.db, self.lease, self.every_s = db, lease, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"job-{self.lease.job_id}-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.lease.update(self.db, heartbeat_at=utcnow())
            except Lost:
                return
            except Exception:
                log.warning("job %s: heartbeat failed", self.lease.job_id, exc_info=True)


__all__ = ["Heartbeat", "Lease", "Lost", "claim", "default_worker_name"]

"""Deletion-request transitions (service/core/repo/requests.py) on SQLite and PostgreSQL databases
made by the migrations: batching, claiming, requeueing, completing (by a job, or through links to
completed work), failing after ``max_request_attempts`` jobs."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from service.core.db import Database
from service.core.migrate import upgrade
from service.core.models import (
    Dataset,
    DeletionRequest,
    DeletionRequestSample,
    ForgottenSample,
    Job,
    Model,
    ModelVersion,
    Tenant,
)
from service.core.repo import requests
from service.core.statuses import JobStatus, RequestStatus


class World:
    """One tenant, one model with a ready version 1, and helpers to add requests and jobs."""

    def __init__(self, db: Database):
        self.db = db
        with db.transaction() as session:
            tenant = Tenant(name="acme")
            session.add(tenant)
            session.flush()
            dataset = Dataset(tenant_id=tenant.id, name="d", sha256="0" * 64, size_bytes=1, num_classes=2,
                              input_shape=[2], dtype="float32", n_train=100, n_test=10)
            session.add(dataset)
            session.flush()
            model = Model(tenant_id=tenant.id, name="m", dataset_id=dataset.id, architecture={"name": "mlp"},
                          policy={})
            session.add(model)
            session.flush()
            session.add(ModelVersion(model_id=model.id, version=1, status="ready", checkpoint_sha256="1" * 64,
                                     checkpoint_size=1))
            self.tenant_id, self.model_id = tenant.id, model.id

    def request(self, rows: list[int], *, links: dict[int, int] | None = None,
                status: RequestStatus = RequestStatus.RECEIVED, job_id: int | None = None) -> int:
        links = links or {}
        with self.db.transaction() as session:
            req = DeletionRequest(tenant_id=self.tenant_id, model_id=self.model_id, status=status, reason="erasure",
                                  n_samples=len(rows), job_id=job_id)
            session.add(req)
            session.flush()
            session.execute(DeletionRequestSample.__table__.insert(), [
                {"request_id": req.id, "row": r, "sample_id": f"s{r}", "linked_request_id": links.get(r)}
                for r in rows])
            return req.id

    def job(self, status: JobStatus = JobStatus.QUEUED) -> int:
        with self.db.transaction() as session:
            job = Job(tenant_id=self.tenant_id, model_id=self.model_id, status=status, policy={})
            session.add(job)
            session.flush()
            return job.id

    def forget(self, rows: list[int], *, version: int, job_id: int, request_id: int) -> None:
        with self.db.transaction() as session:
            session.add_all([ForgottenSample(model_id=self.model_id, row=r, sample_id=f"s{r}", version=version,
                                             job_id=job_id, request_id=request_id) for r in rows])

    def state(self, *ids: int) -> list[tuple]:
        with self.db.session() as session:
            rows = {r.id: r for r in session.scalars(select(DeletionRequest).where(DeletionRequest.id.in_(ids)))}
        return [(rows[i].status, rows[i].job_id, rows[i].result_version) for i in ids]

    def links(self, request_id: int) -> dict[int, int | None]:
        with self.db.session() as session:
            return dict(session.execute(select(DeletionRequestSample.row, DeletionRequestSample.linked_request_id)
                                        .where(DeletionRequestSample.request_id == request_id)).all())


@pytest.fixture
def world(db_url):
    upgrade(db_url)
    db = Database(db_url)
    try:
        yield World(db)
    finally:
        db.dispose()


def test_batch_start_requeue(world):
    first, second, outside = world.request([1, 2]), world.request([3]), world.request([4])
    job = world.job()
    with world.db.transaction() as session:
        requests.batch(session, [first, second], job)
    assert world.state(first, second, outside) == [("batched", job, None), ("batched", job, None),
                                                   ("received", None, None)]
    with world.db.transaction() as session:
        requests.start(session, job)
        assert requests.in_job(session, job) == [first, second]
    assert world.state(first, second) == [("processing", job, None)] * 2
    with world.db.transaction() as session:  # a request of the job that ended is not put back
        session.get(DeletionRequest, second).status = RequestStatus.COMPLETED
    with world.db.transaction() as session:
        assert requests.requeue(session, job) == [first]
        assert requests.requeue(session, job) == []
    assert world.state(first, second, outside) == [("received", None, None), ("completed", job, None),
                                                   ("received", None, None)]


def test_complete_job_leaves_ended_requests_alone(world):
    job = world.job(JobStatus.RUNNING)
    done, failed = (world.request([1], status=RequestStatus.PROCESSING, job_id=job),
                    world.request([2], status=RequestStatus.FAILED, job_id=job))
    with world.db.transaction() as session:
        requests.complete_job(session, job, 2)
    assert world.state(done, failed) == [("completed", job, 2), ("failed", job, None)]


def test_complete_linked_follows_links_to_completed_work(world):
    job = world.job(JobStatus.RUNNING)
    first = world.request([1, 2], status=RequestStatus.PROCESSING, job_id=job)
    pending = world.request([3])  # not completed: what links to it waits
    covered = world.request([1], links={1: first})  # every sample covered by `first`
    chained = world.request([2], links={2: covered})  # covered by a request completed in the same call
    waiting = world.request([1, 3], links={1: first, 3: pending})
    own = world.request([1, 9], links={1: first})  # a sample of its own: only a job completes it
    with world.db.transaction() as session:
        assert requests.complete_linked(session, world.model_id) == []  # `first` is not completed yet
        requests.complete_job(session, job, 2)
        assert requests.complete_linked(session, world.model_id) == [covered, chained]
    assert world.state(covered, chained, waiting, own, pending) == [
        ("completed", None, 2), ("completed", None, 2), ("received", None, None), ("received", None, None),
        ("received", None, None)]


def test_covered_by_and_link_forgotten(world):
    job = world.job(JobStatus.SUCCEEDED)
    earlier = world.request([1, 2], status=RequestStatus.COMPLETED)
    world.forget([1, 2], version=2, job_id=job, request_id=earlier)
    late = world.request([2, 5])  # row 2 was forgotten while this request waited, row 5 was not
    with world.db.transaction() as session:
        assert requests.covered_by(session, world.model_id, earlier) == 2
        assert requests.covered_by(session, world.model_id, late) is None
        requests.link_forgotten(session, world.model_id, [(late, 2, None), (late, 5, None), (earlier, 1, None)])
    assert world.links(late) == {2: earlier, 5: None}
    assert world.links(earlier) == {1: None, 2: None}  # never linked to itself


def test_fail_job_requeues_until_the_last_attempt_then_fails_and_unlinks_waiting_requests(world):
    limit = 2
    failing = world.request([1, 2])
    waiting = world.request([1, 3], links={1: failing})
    error = {"type": "RuntimeError", "message": "boom", "stage": "unlearning"}
    for attempt in range(1, limit + 1):
        job = world.job(JobStatus.RUNNING)
        with world.db.transaction() as session:
            requests.batch(session, [failing], job)
            requests.start(session, job)
            failed, requeued = requests.fail_job(session, job, error, limit)
        with world.db.session() as session:
            row = session.get(DeletionRequest, failing)
            assert row.attempts == attempt
        if attempt < limit:
            assert (failed, requeued) == ([], [failing])
            assert world.state(failing) == [("received", None, None)] and row.error is None
            assert world.links(waiting) == {1: failing, 3: None}
        else:
            assert (failed, requeued) == ([failing], [])
            assert world.state(failing) == [("failed", job, None)]
            assert row.error == {**error, "job_id": job}
            assert world.links(waiting) == {1: None, 3: None}  # it carries the sample itself now

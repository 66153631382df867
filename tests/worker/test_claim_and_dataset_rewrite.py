"""A worker claiming a job and a rewrite of the job's dataset file (service/core/repo/redaction.py)
do not overlap: the claim takes the dataset row shared, the rewrite takes it exclusively and waits
for running jobs. Without it, a job claimed while the rewrite ran read the old file's address and
found the file pruned. PostgreSQL only: SQLite has no row locks (its writers are serialized by the
database lock, and a read does not take it)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from service.core.models import Dataset, Job, Model
from tests.worker.test_job_pipeline import NEGGRAD, Setup, random_rows
from worker.pipeline.lease import claim


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # the row locks are the point
def test_a_claim_waits_for_a_rewrite_of_the_dataset_file_in_progress(service, user_files):
    s = Setup(service, user_files)
    job_id = s.job([s.request(random_rows(s.n_train, 5, seed=3))], NEGGRAD)
    with s.db.session() as session:
        dataset_id = session.scalar(select(Model.dataset_id).where(Model.id == s.model_id))

    claimed: list = []
    thread = threading.Thread(target=lambda: claimed.append(claim(s.ctx, job_id, "w1")))
    with s.db.transaction() as rewrite:  # what redact_dataset holds while it rewrites the file
        rewrite.execute(select(Dataset.id).where(Dataset.id == dataset_id).with_for_update())
        thread.start()
        thread.join(timeout=1.5)
        assert thread.is_alive() and not claimed  # the claim waits for the rewrite to commit
        with s.db.session() as other:
            assert other.scalar(select(Job.status).where(Job.id == job_id)) == "queued"
    thread.join(timeout=30)
    assert not thread.is_alive() and claimed and claimed[0] is not None and claimed[0].job_id == job_id
    with s.db.session() as other:
        assert other.scalar(select(Job.status).where(Job.id == job_id)) == "running"

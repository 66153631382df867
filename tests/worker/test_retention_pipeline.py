"""Retention with the real pipeline (issue 11, item 3): a job publishes version 2, version 1 holds
the erased samples until its retention runs out, the worker's sweeper purges it (its weights and
proxy cache leave the store, the erased samples' learning events are blanked), and the next job
starts from version 2, never from a purged version, with a proxy from the blanked events."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from sqlalchemy import select, update

from service.core.models import Job, Model, ModelAlias, ModelVersion, ProxyCacheEntry, utcnow
from service.core.repo import retention
from tests.worker.test_job_pipeline import NEGGRAD, Setup, random_rows
from worker import pipeline
from worker.engine.events import REDACTED
from worker.pipeline.loading import base_version


@pytest.fixture
def setup(service, user_files) -> Setup:
    return Setup(service, user_files)


def _proxy_blobs(s: Setup, version: int) -> set[str]:
    with s.db.session() as sess:
        return set(sess.scalars(select(ProxyCacheEntry.sha256).join(
            ModelVersion, ModelVersion.id == ProxyCacheEntry.model_version_id).where(
            ModelVersion.model_id == s.model_id, ModelVersion.version == version)))


def _events(s: Setup) -> tuple[str, dict]:
    with s.db.session() as sess:
        sha = sess.get(Model, s.model_id).events_sha256
    with np.load(s.ctx.store.local_path(sha), allow_pickle=False) as f:
        return sha, {k: f[k] for k in f.files}


def _blank(events: dict) -> set[str]:
    return set(events["ids"][events["count"] == REDACTED].astype(str))


def _blank_rows(s: Setup) -> set[int]:
    """The training rows blank in the model's dataset file (all-zero input and label 0), read from the file."""
    with s.db.session() as sess:
        sha = sess.get(Model, s.model_id).dataset.sha256
    with np.load(s.ctx.store.local_path(sha), allow_pickle=False) as f:
        x, y = f["x_train"], f["y_train"]
    return set(np.flatnonzero((x.reshape(len(x), -1) == 0).all(axis=1) & (y == 0)).tolist())


def test_the_sweeper_purges_a_superseded_version_and_the_next_job_starts_after_it(setup, monkeypatch):
    from worker import tasks

    s = setup
    monkeypatch.setattr(tasks, "worker_context", lambda: s.ctx)
    rows = random_rows(s.n_train, 12, seed=3)
    assert pipeline.run_job(s.ctx, s.job([s.request(rows)], NEGGRAD)) == "succeeded"
    v1, v2 = s.versions()
    own = _proxy_blobs(s, 1)
    original = _events(s)[0]
    assert own and s.ctx.store.exists(v1.checkpoint_sha256)

    # the default retention: 30 days after version 2; nothing is due yet
    assert tasks.sweep()["purged"] == 0
    with s.db.session() as sess:
        (h,) = retention.holdings(sess, sess.get(Model, s.model_id))
    assert (h.version.version, h.erased_in, h.n_erased) == (1, [2], 12)
    assert h.due_at - h.since == dt.timedelta(days=30)
    with s.service.client() as c:
        st = c.get(f"/v1/models/{s.model_id}/samples/{s.forgotten()[0].sample_id}").json()
        assert st["holding"] == [{"version": 1, "status": "ready", "purge_due_at": st["holding"][0]["purge_due_at"]}]
        assert dt.datetime.fromisoformat(st["holding"][0]["purge_due_at"]) > utcnow() + dt.timedelta(days=29)

    # purge_after_days = 0: the sweeper purges version 1 now
    with s.db.transaction() as sess:
        policy = {**sess.get(Model, s.model_id).policy, "retention": {"purge_after_days": 0}}
        sess.execute(update(Model).where(Model.id == s.model_id).values(policy=policy))
    assert tasks.sweep()["purged"] == 1
    v1, v2 = s.versions()
    assert (v1.status, v2.status) == ("purged", "ready") and v1.purged_at is not None
    assert not s.ctx.store.exists(v1.checkpoint_sha256) and _proxy_blobs(s, 1) == set()
    assert not any(s.ctx.store.exists(b) for b in own - _proxy_blobs(s, 2))
    assert s.aliases() == {"latest": 2, "production": 2}
    with s.service.client() as c:
        r = c.get(f"/v1/models/{s.model_id}/versions/1/checkpoint")
        assert r.status_code == 410 and r.json()["type"] == "urn:unlearnd:problem:version-purged"
    assert "version.purged" in s.actions()
    # no kept version holds the erased samples any more: their learning events are blank now
    sha, events = _events(s)
    assert sha != original and not s.ctx.store.exists(original) and "model.events_redacted" in s.actions()
    assert _blank(events) == {f.sample_id for f in s.forgotten()}
    assert _proxy_blobs(s, 2) == set()  # the events proxy carried to version 2 is computed again
    # the model is its dataset's only one: the erased rows are blank in the dataset file too
    assert _blank_rows(s) == set(rows) and "dataset.redacted" in s.actions()

    # a base is never a purged version, even if 'latest' named one
    with s.db.session() as sess:
        sess.get(ModelAlias, (s.model_id, "latest")).version = 1
        job = Job(tenant_id=s.tenant_id, model_id=s.model_id, status="running", policy={})
        assert base_version(sess, job, sess.get(Model, s.model_id)).version == 2
        sess.rollback()

    # the next job starts from version 2; once it published, the worker purges version 2 at once
    more = random_rows(s.n_train, 8, seed=4, exclude=rows)
    job2 = s.job([s.request(more)], NEGGRAD)
    assert pipeline.run_job(s.ctx, job2) == "succeeded"
    j = s.get(Job, job2)
    assert (j.base_version, j.result_version) == (2, 3)
    # its proxy came from the blanked file: no value for the rows forgotten earlier, one for every other
    (entry,) = _proxy_blobs(s, 2)
    values = np.load(s.ctx.store.local_path(entry), allow_pickle=False)
    assert sorted(np.flatnonzero(np.isnan(values)).tolist()) == sorted(rows)
    tasks._purge_due(s.ctx, job2)
    assert [v.status for v in s.versions()] == ["purged", "purged", "ready"]
    assert _blank(_events(s)[1]) == {f.sample_id for f in s.forgotten()} and len(s.forgotten()) == 20
    assert _blank_rows(s) == set(rows) | set(more)  # job 2 ran on the blanked file and erased its rows from it
    assert s.aliases()["latest"] == 3
    assert tasks.sweep()["purged"] == 0


def test_a_rewrite_that_waited_for_a_calibration_happens_when_it_ends(setup, monkeypatch):
    """A purge while a calibration of the model runs leaves the events and dataset files as they are
    (its worker may be reading them); the worker's task does the rewrite once the calibration ended."""
    from worker import calibration, tasks

    s = setup
    monkeypatch.setattr(tasks, "worker_context", lambda: s.ctx)
    rows = random_rows(s.n_train, 10, seed=5)
    assert pipeline.run_job(s.ctx, s.job([s.request(rows)], NEGGRAD)) == "succeeded"
    with s.db.transaction() as sess:
        cal = Job(tenant_id=s.tenant_id, model_id=s.model_id, kind="calibration", status="running", policy={},
                  base_version=2)
        sess.add(cal)
        sess.flush()
        cal_id = cal.id
    with s.service.client() as c:
        out = c.post(f"/v1/models/{s.model_id}/purge").json()
    assert [p["version"] for p in out["purged"]] == [1] and out["events"] is None and out["dataset"] is None
    assert _blank_rows(s) == set() and _blank(_events(s)[1]) == set()

    def finished(ctx, job_id, worker_name):  # the calibration itself is tested in tests/worker/test_calibration.py
        with ctx.db.transaction() as sess:
            sess.get(Job, job_id).status = "succeeded"
        return "succeeded"

    monkeypatch.setattr(calibration, "run_calibration", finished)
    assert tasks.run_calibration(cal_id) == "succeeded"
    assert _blank_rows(s) == set(rows) and _blank(_events(s)[1]) == {f.sample_id for f in s.forgotten()}
    assert {"model.events_redacted", "dataset.redacted"} <= set(s.actions())

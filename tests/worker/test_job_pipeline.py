"""The job pipeline (``worker.pipeline.run_job``) in-process, against a database made by the migrations
and a real artifact store: digits, the session's trained small CNN with its learning events.

The job state is made by hand as the batcher leaves it (a ``queued`` job, its requests
``batched``, their samples); the Celery task and the HTTP side are tested elsewhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, update

from service.core import evidence
from service.core.artifacts import LocalArtifactStore
from service.core.models import (
    DatasetSample,
    DeletionRequest,
    DeletionRequestSample,
    ForgottenSample,
    Job,
    Model,
    ModelAlias,
    ModelVersion,
    ProxyCacheEntry,
    utcnow,
)
from service.core.repo import transparency
from service.core.signing import Signer
from tests.servicekit import register_dataset, register_model
from worker import pipeline
from worker.context import WorkerContext
from worker.pipeline import progress as job_progress
from worker.pipeline.report import canonical_json
from worker.registration import validate_version

# RUM with NegGrad+ in every bin (the paper's RUM^F NG+) moves the model on random rows: 3% of the
# original's steps per bin at 0.3 of its learning rate (worker/engine/recipe.py) with a looser guard
# (5 points instead of 3): typical rows are forgotten only by giving up some accuracy elsewhere.
# 9% in all, under the job's 10% cap. (5% a bin at the full rate ended within the guard on one
# machine and broke it in every bin on another, whose convolutions round differently: the job then
# published its input model, and no retry fit under the cap.)
_NG = {"method": "neggrad_plus", "hparams": {"budget": 0.03, "lr_scale": 0.3, "max_retain_drop": 0.05}}
NEGGRAD = {"method": "rum", "bins": [_NG, _NG, _NG]}


# --------------------------------------------------------------------------- helpers


class Setup:
    def __init__(self, service, user_files):
        with service.client() as c:
            ds = register_dataset(c, user_files)
            r = register_model(c, user_files, ds["id"])
            assert r.status_code == 201, r.text
        self.service = service
        self.model_id = r.json()["id"]
        self.ctx = WorkerContext(service.settings, service.db, LocalArtifactStore(service.settings.artifacts))
        with self.db.session() as s:
            version_id = s.scalar(select(ModelVersion.id).where(ModelVersion.model_id == self.model_id))
            self.tenant_id = s.scalar(select(Model.tenant_id).where(Model.id == self.model_id))
            self.n_train = s.scalar(select(func.count()).select_from(DatasetSample)
                                    .where(DatasetSample.dataset_id == ds["id"]))
        assert validate_version(self.ctx, version_id) == "ready"

    @property
    def db(self):
        return self.service.db

    def request(self, rows: list[int], *, links: dict[int, int] | None = None, status: str = "received",
                reason: str = "erasure") -> int:
        """A deletion request naming train rows; ``links`` maps a row to the request that covers it."""
        links = links or {}
        with self.db.transaction() as s:
            model = s.get(Model, self.model_id)
            ids = dict(s.execute(select(DatasetSample.row, DatasetSample.sample_id).where(
                DatasetSample.dataset_id == model.dataset_id, DatasetSample.row.in_(rows))).all())
            req = DeletionRequest(tenant_id=self.tenant_id, model_id=self.model_id, status=status, reason=reason,
                                  subject_hash=hashlib.sha256(str(rows).encode()).hexdigest(), n_samples=len(rows))
            s.add(req)
            s.flush()
            s.execute(DeletionRequestSample.__table__.insert(), [
                {"request_id": req.id, "row": r, "sample_id": ids[r], "linked_request_id": links.get(r)}
                for r in rows])
            return req.id

    def job(self, request_ids: list[int], policy: dict | None = None, **fields) -> int:
        """A queued job over ``request_ids`` (set to ``batched``), as the batcher makes it."""
        with self.db.transaction() as s:
            model = s.get(Model, self.model_id)
            pol = {**model.policy, **(policy or {})}
            n_forget = s.scalar(select(func.count(func.distinct(DeletionRequestSample.row))).where(
                DeletionRequestSample.request_id.in_(request_ids), DeletionRequestSample.linked_request_id.is_(None)))
            job = Job(tenant_id=self.tenant_id, model_id=self.model_id, status="queued", policy=pol,
                      n_requests=len(request_ids), n_forget=n_forget, **fields)
            s.add(job)
            s.flush()
            s.execute(update(DeletionRequest).where(DeletionRequest.id.in_(request_ids))
                      .values(status="batched", job_id=job.id))
            return job.id

    def get(self, cls, *key):
        with self.db.session() as s:
            return s.get(cls, key[0] if len(key) == 1 else key)

    def requests(self, ids: list[int]) -> list[DeletionRequest]:
        with self.db.session() as s:
            return list(s.scalars(select(DeletionRequest).where(DeletionRequest.id.in_(ids))
                                  .order_by(DeletionRequest.id)))

    def requests_of(self, job_id: int) -> list[DeletionRequest]:
        with self.db.session() as s:
            return list(s.scalars(select(DeletionRequest).where(DeletionRequest.job_id == job_id)
                                  .order_by(DeletionRequest.id)))

    def versions(self) -> list[ModelVersion]:
        with self.db.session() as s:
            return list(s.scalars(select(ModelVersion).where(ModelVersion.model_id == self.model_id)
                                  .order_by(ModelVersion.version)))

    def aliases(self) -> dict[str, int]:
        with self.db.session() as s:
            return {a.alias: a.version for a in s.scalars(select(ModelAlias)
                                                          .where(ModelAlias.model_id == self.model_id))}

    def forgotten(self) -> list[ForgottenSample]:
        with self.db.session() as s:
            return list(s.scalars(select(ForgottenSample).where(ForgottenSample.model_id == self.model_id)
                                  .order_by(ForgottenSample.row)))

    def actions(self) -> list[str]:
        from service.core.models import AuditEntry

        with self.db.session() as s:
            return list(s.scalars(select(AuditEntry.action).where(AuditEntry.tenant_id == self.tenant_id)
                                  .order_by(AuditEntry.id)))

    def report(self, job_id: int) -> dict:
        sha = self.get(Job, job_id).report_sha256
        assert sha
        raw = self.ctx.store.local_path(sha).read_bytes()

        def no_nan(name):
            raise AssertionError(f"{name} in the report")

        return json.loads(raw, parse_constant=no_nan)


def random_rows(n_train: int, n: int, seed: int, exclude=()) -> list[int]:
    pool = np.setdiff1d(np.arange(n_train), np.asarray(list(exclude), dtype=np.int64))
    return sorted(int(r) for r in np.random.default_rng(seed).choice(pool, n, replace=False))


@pytest.fixture
def setup(service, user_files) -> Setup:
    return Setup(service, user_files)


REPORT_KEYS = {"schema", "job", "dataset", "requests", "forget_set", "method", "config", "config_sha256", "seed",
               "proxy", "bins", "metrics", "per_class_accuracy", "confidence", "guardrails", "aliases_moved",
               "checkpoint", "mia_attack", "recipe"}


# --------------------------------------------------------------------------- tests


def test_a_job_publishes_a_version_and_the_next_job_builds_on_it(setup, monkeypatch):
    from worker.engine import architectures, rum

    s = setup
    first = random_rows(s.n_train, 40, seed=1)
    r1, r2 = s.request(first[:25]), s.request(first[25:])
    # a request naming only samples that r1 covers, waiting outside the job: it completes with r1
    r3 = s.request(first[:3], links={r: r1 for r in first[:3]})
    job1 = s.job([r1, r2], NEGGRAD)

    seen, recipes, caps = [], [], []
    real = rum.run_unlearning

    def spy(*args, **kwargs):
        seen.append(kwargs.get("excluded_rows"))
        recipes.append(kwargs.get("recipe"))
        caps.append(kwargs.get("max_cost_share"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rum, "run_unlearning", spy)
    assert pipeline.run_job(s.ctx, job1, worker_name="w1") == "succeeded"
    assert seen == [None]  # nothing forgotten before
    # the model's recipe on the dataset's training rows (registered without one: every field inferred)
    assert recipes[0].n_train == s.n_train and recipes[0].inferred and recipes[0].epochs == 30
    assert caps == [0.10]  # the model policy's calibration.cost_cap bounds the job's guard retries

    j = s.get(Job, job1)
    assert (j.status, j.stage, j.progress, j.base_version, j.result_version, j.attempts, j.error) == (
        "succeeded", None, 1.0, 1, 2, 1, None)
    assert j.worker == "w1" and j.finished_at is not None
    assert set(j.timings) == set(pipeline.STAGES) | {"total"}
    assert j.timings["total"] >= sum(v for k, v in j.timings.items() if k != "total") - 1e-3

    v1, v2 = s.versions()
    assert (v2.version, v2.status, v2.parent_version, v2.job_id, v2.method) == (2, "ready", 1, job1, "rum")
    assert v2.n_forgotten == 40 and v2.config["seed"] == 0 and v2.config["proxy"] == "confidence"
    assert v2.checkpoint_sha256 != v1.checkpoint_sha256
    path = s.ctx.store.local_path(v2.checkpoint_sha256)
    assert path.stat().st_size == v2.checkpoint_size
    architectures.load_model(setup_spec(s), path)  # the new checkpoint loads into the architecture

    before, after = v2.metrics["before"], v2.metrics["after"]
    assert before["acc_forget"] == pytest.approx(1.0, abs=0.03)  # training rows: fit
    # forgetting moved forget accuracy from the fit training rows' 1.0 down past test accuracy (NegGrad+
    # overshoots a little on digits), and kept utility
    assert before["acc_forget"] > before["acc_test"] - 0.01
    assert after["acc_forget"] < before["acc_forget"] - 0.05 and after["acc_forget"] < after["acc_test"]
    assert after["acc_test"] > 0.9 and after["acc_retain"] > 0.95

    report = s.report(job1)
    assert set(report) == REPORT_KEYS and report["schema"] == "unlearnd.report/2"
    assert report["job"]["new_version"] == 2 and report["job"]["base_version"] == 1
    assert report["job"]["worker"] == "w1" and report["job"]["device"]
    assert report["forget_set"]["n"] == 40 and report["forget_set"]["n_excluded_before"] == 0
    assert report["forget_set"]["sample_ids_sha256"] == hashlib.sha256(
        "\n".join(sorted(f.sample_id for f in s.forgotten())).encode()).hexdigest()
    assert report["proxy"]["source"] == "computed" and len(report["proxy"]["forget_values"]) == 40
    assert report["metrics"]["after"] == after and report["metrics"]["reference"] is None
    assert report["metrics"]["tow"] is None
    assert [r["id"] for r in report["requests"]] == [r1, r2]
    req = report["requests"][0]
    assert req["n_samples"] == 25 and req["n_new_samples"] == 25 and req["linked_to"] == []
    assert dt.datetime.fromisoformat(req["due_by"]) - dt.datetime.fromisoformat(req["received_at"]) == \
        dt.timedelta(days=30)
    assert len(report["confidence"]["forget_before"]) == 40 and len(report["confidence"]["test_after"]) == 400
    assert np.mean(report["confidence"]["forget_after"]) < np.mean(report["confidence"]["forget_before"])
    assert report["per_class_accuracy"]["classes"] == list(range(10))
    bins = report["bins"]
    assert sum(b["n"] for b in bins) == 40 and all(b["method"] == "neggrad_plus" for b in bins)
    assert len(report["proxy"]["thresholds"]) == 2 and [b["index"] for b in bins] == sorted(b["index"] for b in bins)
    for key in ("before", "after"):  # the per-bin audit adds up to the whole forget set's
        assert sum(b[key]["acc_forget"] * b["n"] for b in bins) / 40 == pytest.approx(v2.metrics[key]["acc_forget"])
    g = report["guardrails"]
    assert g["test_drop"] == pytest.approx(before["acc_test"] - after["acc_test"])
    assert report["aliases_moved"] == (["latest", "production"] if g["passed"] else ["latest"])
    assert report["config_sha256"] == hashlib.sha256(canonical_json(report["config"]).encode()).hexdigest()
    assert report["checkpoint"] == {"sha256": v2.checkpoint_sha256, "size_bytes": v2.checkpoint_size}

    assert s.aliases() == {"latest": 2, "production": 2 if g["passed"] else 1}
    forgotten = s.forgotten()
    assert [f.row for f in forgotten] == first and {f.version for f in forgotten} == {2}
    assert {f.row: f.request_id for f in forgotten} == {r: (r1 if r in first[:25] else r2) for r in first}
    reqs = s.requests([r1, r2, r3])
    assert [(r.status, r.result_version) for r in reqs] == [("completed", 2)] * 3
    assert all(r.completed_at is not None for r in reqs)
    actions = s.actions()
    assert actions[-2:] == ["version.published", "job.succeeded"]
    # the sequencer certifies the three requests; each certificate verifies offline and names the report
    signer = Signer(Ed25519PrivateKey.generate())
    assert transparency.sequence(s.db, signer).certificates == 3
    with s.db.session() as sess:
        cert = transparency.certificate(sess, s.tenant_id, r1)
        assert "deletion request" in evidence.verify(cert, signer.public)
        job = sess.get(Job, job1)
        assert (cert["erasure"]["version_before"], cert["erasure"]["version_after"]) == (1, 2)
        assert (cert["erasure"]["report_sha256"], cert["erasure"]["report_html_sha256"]) == (
            job.report_sha256, job.report_html_sha256)
        entry = sess.scalar(select(ProxyCacheEntry))
        assert (entry.model_version_id, entry.proxy, entry.source) == (v1.id, "confidence", "computed")

    # a duplicate delivery of a finished job does nothing
    assert pipeline.run_job(s.ctx, job1) is None
    assert len(s.versions()) == 2 and s.get(Job, job1).attempts == 1

    # the next job starts from version 2 and keeps job 1's rows out of every retain set
    second = random_rows(s.n_train, 30, seed=2, exclude=first)
    r4 = s.request(second)
    r5 = s.request([first[0], second[0] + 0], links={first[0]: r1, second[0]: r4})  # covered by r1 and r4
    job2 = s.job([r4, r5], NEGGRAD)
    assert pipeline.run_job(s.ctx, job2) == "succeeded"
    assert sorted(seen[-1].tolist()) == first
    v3 = s.versions()[-1]
    assert (v3.version, v3.parent_version, v3.job_id, v3.n_forgotten) == (3, 2, job2, 70)
    assert s.get(Job, job2).base_version == 2
    report2 = s.report(job2)
    assert report2["forget_set"] == {**report2["forget_set"], "n": 30, "n_excluded_before": 40}
    assert report2["proxy"]["source"] == "carried"  # events describe the original model: valid for v2
    assert report2["proxy"]["compute_seconds"] == report["proxy"]["compute_seconds"]
    assert report2["requests"][1]["linked_to"] == sorted([r1, r4]) and report2["requests"][1]["n_new_samples"] == 0
    assert s.aliases()["latest"] == 3
    assert [(r.status, r.result_version) for r in s.requests([r4, r5])] == [("completed", 3)] * 2
    assert len(s.forgotten()) == 70
    with s.db.session() as sess:
        entries = sess.execute(select(ProxyCacheEntry.model_version_id, ProxyCacheEntry.source,
                                      ProxyCacheEntry.sha256).order_by(ProxyCacheEntry.id)).all()
    assert [(e[0], e[1]) for e in entries] == [(v1.id, "computed"), (s.versions()[1].id, "carried")]
    assert entries[0][2] == entries[1][2]
    # the carried row shares the blob: leased as the row was written, as a commit of the same bytes
    # would (service/core/artifacts.py), so that a purge of version 1 meanwhile could not remove it
    assert s.ctx.store.path(entries[1][2]).stat().st_mtime > time.time() + 3600

    # an attempt that published and was killed before it finished: the next delivery finishes the
    # bookkeeping and publishes no second version
    stale = utcnow() - dt.timedelta(seconds=s.ctx.settings.job_stale_after_s + 5)
    with s.db.transaction() as sess:
        sess.execute(update(Job).where(Job.id == job2).values(status="running", heartbeat_at=stale, stage="publishing",
                                                              result_version=None, finished_at=None))
        sess.execute(update(DeletionRequest).where(DeletionRequest.id == r4).values(status="processing",
                                                                                   result_version=None))
    assert pipeline.run_job(s.ctx, job2, worker_name="w2") == "succeeded"
    assert len(s.versions()) == 3 and len(s.forgotten()) == 70
    j2 = s.get(Job, job2)
    assert (j2.status, j2.result_version, j2.attempts, j2.worker) == ("succeeded", 3, 2, "w2")
    assert [(r.status, r.result_version) for r in s.requests([r4])] == [("completed", 3)]
    assert s.actions()[-1] == "job.succeeded"


def setup_spec(s: Setup) -> dict:
    return s.get(Model, s.model_id).architecture


def test_cancel_while_queued_and_while_running(setup, monkeypatch):
    from worker.engine import rum

    s = setup
    rows = random_rows(s.n_train, 20, seed=3)
    r1 = s.request(rows)
    job = s.job([r1], NEGGRAD, cancel_requested=True)
    assert pipeline.run_job(s.ctx, job) == "canceled"
    j = s.get(Job, job)
    assert (j.status, j.stage, j.result_version, j.attempts) == ("canceled", None, None, 1)
    assert j.finished_at is not None
    assert [(r.status, r.job_id) for r in s.requests([r1])] == [("received", None)]
    assert len(s.versions()) == 1 and s.actions()[-1] == "job.canceled"

    # mid-run: the flag is set once unlearning has started; the engine's loop notices it
    monkeypatch.setattr(job_progress, "CANCEL_POLL_S", 0.0)
    real = rum.run_unlearning
    calls = []

    def flip_then_run(*args, **kwargs):
        calls.append(1)
        with s.db.transaction() as sess:
            sess.execute(update(Job).where(Job.id == job2).values(cancel_requested=True))
        return real(*args, **kwargs)

    monkeypatch.setattr(rum, "run_unlearning", flip_then_run)
    job2 = s.job([r1], NEGGRAD)
    assert pipeline.run_job(s.ctx, job2) == "canceled"
    j = s.get(Job, job2)
    assert calls == [1] and (j.status, j.stage, j.result_version, j.error) == ("canceled", "unlearning", None, None)
    assert "unlearning" in j.timings
    assert [(r.status, r.job_id, r.attempts) for r in s.requests([r1])] == [("received", None, 0)]
    assert len(s.versions()) == 1 and s.forgotten() == [] and s.aliases() == {"latest": 1, "production": 1}
    assert s.actions()[-1] == "job.canceled"
    assert pipeline.run_job(s.ctx, job2) is None  # canceled is final


def test_a_failing_job_requeues_its_requests_until_they_ran_out_of_attempts(setup, monkeypatch):
    from worker.engine import rum
    from worker.engine.errors import ConfigError

    def boom(*args, **kwargs):
        raise ConfigError("bins[1].method: boom")

    monkeypatch.setattr(rum, "run_unlearning", boom)
    s = setup
    rows = random_rows(s.n_train, 10, seed=4)
    r1 = s.request(rows)
    # a later request waiting on r1 for two of its rows (linked, as the API links duplicates)
    waiting = s.request(rows[:2] + random_rows(s.n_train, 1, seed=5, exclude=rows), links={rows[0]: r1, rows[1]: r1})
    limit = s.ctx.settings.max_request_attempts
    for attempt in range(1, limit + 1):
        job = s.job([r1], NEGGRAD)
        assert pipeline.run_job(s.ctx, job) == "failed"
        j = s.get(Job, job)
        assert j.error == {"type": "ConfigError", "message": "bins[1].method: boom", "stage": "unlearning"}
        assert j.finished_at is not None and j.result_version is None
        (r,) = s.requests([r1])
        assert r.attempts == attempt
        if attempt < limit:
            assert (r.status, r.job_id, r.error) == ("received", None, None)
        else:
            assert (r.status, r.job_id) == ("failed", job)
            assert r.error["message"] == "bins[1].method: boom" and r.error["job_id"] == job
    assert len(s.versions()) == 1 and s.actions().count("job.failed") == limit
    with s.db.session() as sess:  # r1 failed for good: the waiting request now carries those rows itself
        linked = sess.scalars(select(DeletionRequestSample.linked_request_id)
                              .where(DeletionRequestSample.request_id == waiting)).all()
        assert linked == [None, None, None]
    with s.db.session() as sess:  # the proxy was computed once, then found in the cache
        assert sess.scalar(select(func.count()).select_from(ProxyCacheEntry)) == 1


def test_rum_policy_with_a_retrain_reference_and_broken_guardrails(setup, monkeypatch):
    from worker.engine.unlearners.retrain import Retrain

    monkeypatch.setitem(Retrain.defaults, "epochs", 4)  # a short reference keeps the test fast
    s = setup
    policy = {"method": "rum", "bins": [{"method": "finetune", "hparams": {"epochs": 2}},
                                         {"method": "finetune", "hparams": {"epochs": 2}},
                                         {"method": "random_label", "hparams": {"lr": 0.2, "max_retain_drop": None}}],
              "proxy": "confidence_final", "audit": {"reference": "retrain"},
              "guardrails": {"max_test_drop": 0.0, "max_retain_drop": 0.0}, "seed": 7}
    r1 = s.request(random_rows(s.n_train, 45, seed=5))
    job = s.job([r1], policy)
    assert pipeline.run_job(s.ctx, job) == "succeeded"
    report = s.report(job)
    m = report["metrics"]
    assert m["reference"] is not None and 0.0 < m["tow"] <= 1.0 and 0.0 < m["tow_mia"] <= 1.0
    assert 0.0 < m["tow_before"] <= 1.0
    assert len(report["per_class_accuracy"]["reference"]) == 10
    assert report["seed"] == 7 and report["config"]["seed"] == 7 and report["method"] == "rum"
    assert report["proxy"]["name"] == "confidence_final" and report["proxy"]["source"] == "computed"
    assert len(report["proxy"]["thresholds"]) == 2
    assert [b["level"] for b in report["bins"]] == sorted({b["level"] for b in report["bins"]},
                                                           key=["low", "mid", "high"].index)
    assert sum(b["n"] for b in report["bins"]) == 45
    g = report["guardrails"]
    assert g["passed"] is False and report["aliases_moved"] == ["latest"]
    assert s.aliases() == {"latest": 2, "production": 1}  # a broken guardrail does not move production
    v2 = s.versions()[-1]
    assert v2.metrics["guardrails"]["passed"] is False and v2.metrics["reference"] == m["reference"]


def test_a_live_job_is_left_alone_and_a_stale_one_is_taken_over_without_a_second_version(setup, monkeypatch):
    from worker.engine import rum

    s = setup
    fast = WorkerContext(s.ctx.settings.model_copy(update={"job_heartbeat_s": 0.05}), s.ctx.db, s.ctx.store)
    real = rum.run_unlearning
    seen: dict = {}

    def during(*args, **kwargs):
        if "inner" in seen:  # the taking-over worker's own run
            return real(*args, **kwargs)
        time.sleep(0.4)
        j = s.get(Job, seen["job"])
        seen.update(stage=j.stage, progress=j.progress, beat=j.heartbeat_at > j.started_at)
        seen["inner"] = "running"
        seen["inner"] = pipeline.run_job(s.ctx, seen["job"], worker_name="w2")  # a second delivery meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(rum, "run_unlearning", during)
    # a live worker (heartbeat every 0.05 s): a second delivery does nothing
    seen["job"] = job = s.job([s.request(random_rows(s.n_train, 20, seed=6))], NEGGRAD)
    assert pipeline.run_job(fast, job, worker_name="w1") == "succeeded"
    assert seen["inner"] is None and seen["stage"] == "unlearning" and seen["beat"]
    assert job_progress.SPANS["unlearning"][0] <= seen["progress"] < job_progress.SPANS["unlearning"][1]
    assert [(v.version, v.job_id) for v in s.versions()] == [(1, None), (2, job)]

    # a worker that looks dead (stale heartbeat): the next delivery takes the job over and publishes;
    # the first worker, still running, finds it lost the job and publishes nothing
    def stale_then_deliver(*args, **kwargs):
        if "inner" in seen:
            return real(*args, **kwargs)
        old = utcnow() - dt.timedelta(seconds=s.ctx.settings.job_stale_after_s + 1)
        with s.db.transaction() as sess:
            sess.execute(update(Job).where(Job.id == seen["job"]).values(heartbeat_at=old))
        seen["inner"] = "running"
        seen["inner"] = pipeline.run_job(s.ctx, seen["job"], worker_name="w2")
        return real(*args, **kwargs)

    seen.clear()
    monkeypatch.setattr(rum, "run_unlearning", stale_then_deliver)
    seen["job"] = job2 = s.job([s.request(random_rows(s.n_train, 20, seed=7, exclude=s_rows(s)))], NEGGRAD)
    assert pipeline.run_job(s.ctx, job2, worker_name="w1") is None
    assert seen["inner"] == "succeeded"
    j = s.get(Job, job2)
    assert (j.status, j.worker, j.attempts, j.result_version) == ("succeeded", "w2", 2, 3)
    assert [(v.version, v.job_id) for v in s.versions()] == [(1, None), (2, job), (3, job2)]
    assert len(s.forgotten()) == 40 and s.actions().count("version.published") == 2


def s_rows(s: Setup) -> list[int]:
    return [f.row for f in s.forgotten()]


def test_a_job_with_nothing_left_to_unlearn_publishes_nothing(setup):
    s = setup
    rows = random_rows(s.n_train, 10, seed=8)
    r1 = s.request(rows)
    assert pipeline.run_job(s.ctx, s.job([r1], NEGGRAD)) == "succeeded"
    # requests that raced the linking: their rows were forgotten meanwhile by r1's job
    r2 = s.request(rows[:4])
    r3 = s.request(rows[4:6], links={rows[5]: r1})
    other = random_rows(s.n_train, 3, seed=9, exclude=rows)
    r4 = s.request(other, status="received")  # pending, not in the job
    r5 = s.request([rows[6], other[0]], links={other[0]: r4})  # forgotten row + a row r4 will forget
    job = s.job([r2, r3, r5], NEGGRAD)
    assert pipeline.run_job(s.ctx, job) == "succeeded"
    j = s.get(Job, job)
    assert (j.status, j.result_version, j.progress, j.report_sha256) == ("succeeded", None, 1.0, None)
    assert [(r.status, r.result_version) for r in s.requests([r1, r2, r3])] == [("completed", 2)] * 3
    # r5 waits for r4 (its forgotten row is now linked to r1, so it is not batched again on its own)
    (r5_row,) = s.requests([r5])
    assert (r5_row.status, r5_row.job_id) == ("received", None)
    with s.db.session() as sess:
        links = dict(sess.execute(select(DeletionRequestSample.row, DeletionRequestSample.linked_request_id)
                                  .where(DeletionRequestSample.request_id == r5)).all())
    assert links == {rows[6]: r1, other[0]: r4}
    assert pipeline.run_job(s.ctx, s.job([r4], NEGGRAD)) == "succeeded"
    assert [(r.status, r.result_version) for r in s.requests([r4, r5])] == [("completed", 3)] * 2
    assert len(s.versions()) == 3 and len(s.forgotten()) == 13


def test_rows_whose_labels_are_wrong_take_the_corrective_step_before_the_bins(setup):
    from service.core.report import JobReport
    from worker.report import render_job_page

    s = setup
    wrong = random_rows(s.n_train, 12, seed=11)
    erased = random_rows(s.n_train, 20, seed=12, exclude=wrong)
    r1, r2 = s.request(erased), s.request(wrong, reason="mislabeled")
    job = s.job([r1, r2], {"corrective": {"hparams": {"budget": 0.02}}})
    assert pipeline.run_job(s.ctx, job) == "succeeded"
    report = s.report(job)
    first, *rest = report["bins"]
    assert (first["index"], first["level"], first["n"], first["method"]) == (-1, "corrective", 12, "random_label")
    assert first["hparams"]["label_mode"] == "runner_up" and first["hparams"]["budget"] == 0.02
    assert report["config"]["corrective"]["method"] == "random_label"  # the reproducibility record has it
    assert rest and sum(b["n"] for b in rest) == 20 and all(b["index"] >= 0 for b in rest)
    page = render_job_page(JobReport.model_validate(report))
    assert "labels are wrong" in page and "bin -1" not in page

    # turned off: a poisoned request's rows go through the policy's bins like an erasure's
    r3 = s.request(random_rows(s.n_train, 15, seed=13, exclude=wrong + erased), reason="poisoned")
    job2 = s.job([r3], {"corrective": {"reasons": []}})
    assert pipeline.run_job(s.ctx, job2) == "succeeded"
    report2 = s.report(job2)
    bins = report2["bins"]
    assert sum(b["n"] for b in bins) == 15 and all(b["level"] != "corrective" for b in bins)
    assert "corrective" not in report2["config"]


def test_a_run_whose_every_step_the_guard_undid_publishes_nothing_and_says_why(setup):
    """No version and no completed request for a model that did not change: the job fails with a
    message that names the steps and what to do, and its requests go back to pending."""
    s = setup
    hot = {"method": "neggrad_plus", "hparams": {"budget": 0.03, "lr_scale": 8.0, "max_retain_drop": 0.001,
                                                 "retries": 0}}
    r1 = s.request(random_rows(s.n_train, 30, seed=11))
    job = s.job([r1], {"method": "rum", "bins": [hot, hot, hot]})
    assert pipeline.run_job(s.ctx, job) == "failed"
    j = s.get(Job, job)
    assert (j.error["type"], j.error["stage"]) == ("NothingForgotten", "unlearning") and j.result_version is None
    message = j.error["message"]
    assert message.startswith("nothing was forgotten: the accuracy guard undid every step (low (")
    assert "neggrad_plus, lr tried" in message and f"/v1/models/{s.model_id}/calibrations" in message
    (r,) = s.requests([r1])
    assert (r.status, r.job_id, r.attempts) == ("received", None, 1)
    assert len(s.versions()) == 1 and "job.failed" in s.actions()


def test_undone_steps_counts_only_steps_that_had_work():
    from types import SimpleNamespace as NS

    from worker.pipeline.unlearning import undone_steps

    def step(method, outcome=None):
        return NS(method=method, run={"guard": {"outcome": outcome}} if outcome else {})

    assert undone_steps(NS(steps=[step("none"), step("finetune", "input"), step("salun", "input")])) is not None
    assert undone_steps(NS(steps=[step("finetune", "input"), step("salun", "within")])) is None  # one moved
    assert undone_steps(NS(steps=[step("none"), step("salun")])) is None  # an empty bin: nothing ran
    assert undone_steps(NS(steps=[step("salun", "off")])) is None  # the guard was off: never undone

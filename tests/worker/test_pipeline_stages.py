"""Each stage of the job pipeline (worker/pipeline/) on its own, and the lease that fences them:
digits, the session's trained small CNN with its learning events, a database made by the
migrations and a real artifact store (the set-up of tests/worker/test_job_pipeline.py)."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import time

import pytest
import torch
from sqlalchemy import func, select, update

from service.core.models import DeletionRequest, ForgottenSample, Job, ModelVersion, ProxyCacheEntry, utcnow
from service.core.policy import Policy
from tests.worker.test_job_pipeline import NEGGRAD, Setup, random_rows
from worker.engine import proxies as engine_proxies
from worker.engine.errors import Cancelled
from worker.pipeline import auditing, loading, progress, proxies, publishing, refining, report, unlearning
from worker.pipeline.lease import Heartbeat, Lost, claim
from worker.pipeline.progress import Progress


@pytest.fixture
def setup(service, user_files) -> Setup:
    return Setup(service, user_files)


def claimed(s: Setup, request_rows: list[list[int]], policy: dict | None = NEGGRAD, **job_fields):
    """A queued job over new requests naming ``request_rows``, claimed by worker w1."""
    job_id = s.job([s.request(rows) for rows in request_rows], policy, **job_fields)
    lease = claim(s.ctx, job_id, "w1")
    assert lease is not None
    return lease, Progress(s.ctx, lease)


def through_refining(s: Setup, lease, run_progress):
    record = loading.read_job(s.ctx, lease)
    loaded = loading.load(s.ctx, record)
    return loaded, proxies.find(s.ctx, run_progress, loaded), refining.refine(loaded)


def through_auditing(s: Setup, rows: list[int]):
    """A claimed job over ``rows``, run through every stage before publishing."""
    lease, run_progress = claimed(s, [rows])
    loaded, proxy, sets = through_refining(s, lease, run_progress)
    unlearned = unlearning.unlearn(run_progress, loaded, proxy, sets)
    audited = auditing.audit(run_progress, loaded, sets, unlearned)
    return lease, run_progress, (loaded, proxy, unlearned, audited)


# --------------------------------------------------------------------------- lease and progress


def test_a_claim_is_a_lease_that_fences_every_write(setup):
    s = setup
    lease, run_progress = claimed(s, [random_rows(s.n_train, 5, seed=1)])
    assert (lease.token, lease.worker, lease.model_id, lease.published, lease.cancel_requested) == (
        1, "w1", s.model_id, None, False)
    assert claim(s.ctx, lease.job_id, "w2") is None  # live: a second delivery gets nothing
    assert {r.status for r in s.requests_of(lease.job_id)} == {"processing"}

    run_progress.enter("proxies")
    job = s.get(Job, lease.job_id)
    assert (job.stage, job.progress) == ("proxies", progress.SPANS["proxies"][0])

    # the heartbeat went stale: another worker takes the job over with the next token
    with s.db.transaction() as session:
        session.execute(update(Job).where(Job.id == lease.job_id).values(
            heartbeat_at=utcnow() - dt.timedelta(seconds=s.ctx.settings.job_stale_after_s + 1)))
    takeover = claim(s.ctx, lease.job_id, "w2")
    assert takeover is not None and takeover.token == 2
    with pytest.raises(Lost):
        run_progress.enter("refining")  # the first run's writes are refused from now on
    assert lease.lost and s.get(Job, lease.job_id).worker == "w2"
    with pytest.raises(Lost), s.db.transaction() as session:
        lease.lock_job(session)


def test_the_heartbeat_touches_the_job_and_notices_a_takeover(setup):
    s = setup
    lease, _ = claimed(s, [random_rows(s.n_train, 5, seed=2)])
    first_beat = s.get(Job, lease.job_id).heartbeat_at
    heartbeat = Heartbeat(s.db, lease, 0.05)
    heartbeat.start()
    try:
        deadline = utcnow() + dt.timedelta(seconds=10)
        while s.get(Job, lease.job_id).heartbeat_at == first_beat and utcnow() < deadline:
            time.sleep(0.02)
        assert s.get(Job, lease.job_id).heartbeat_at > first_beat
        with s.db.transaction() as session:  # finished elsewhere
            session.execute(update(Job).where(Job.id == lease.job_id).values(status="canceled"))
        while not lease.lost and utcnow() < deadline:
            time.sleep(0.02)
        assert lease.lost
    finally:
        heartbeat.stop()


def test_cancel_checks_are_throttled_inside_a_stage_and_fresh_at_its_start(setup, monkeypatch):
    s = setup
    lease, run_progress = claimed(s, [random_rows(s.n_train, 5, seed=3)])
    monkeypatch.setattr(progress, "CANCEL_POLL_S", 3600.0)
    run_progress.enter("proxies")
    with s.db.transaction() as session:
        session.execute(update(Job).where(Job.id == lease.job_id).values(cancel_requested=True))
    assert run_progress.cancel_requested() is False  # read less than CANCEL_POLL_S ago
    run_progress.check()
    with pytest.raises(Cancelled, match="canceled during refining"):
        run_progress.enter("refining")
    context = run_progress.run_context(0.5, 1.0)
    low, high = progress.SPANS["refining"]
    assert (context.start, context.end) == (pytest.approx(low + (high - low) / 2), pytest.approx(high))
    timings = run_progress.timings()
    assert {"loading", "proxies", "refining", "total"} <= set(timings)


# --------------------------------------------------------------------------- the stages


def test_loading_reads_the_job_and_returns_typed_inputs(setup):
    s = setup
    earlier = random_rows(s.n_train, 4, seed=4)
    done, _ = claimed(s, [earlier])
    with s.db.transaction() as session:  # an earlier job forgot these rows
        session.add_all([ForgottenSample(model_id=s.model_id, row=r, sample_id=str(r), version=1, job_id=done.job_id)
                         for r in earlier])
    rows = random_rows(s.n_train, 10, seed=5, exclude=earlier)
    first = s.request(rows[:6])
    second = s.request(rows[4:] + earlier[:1])  # two rows shared with `first`, one forgotten already
    linked = s.request(rows[:2], links={rows[0]: first, rows[1]: first})
    lease = claim(s.ctx, s.job([first, second, linked], NEGGRAD), "w1")

    record = loading.read_job(s.ctx, lease)
    assert isinstance(record, loading.JobRecord)
    assert (record.base.version, record.next_version, record.job.base_version) == (1, 2, 1)
    assert [r.id for r in record.requests] == [first, second, linked]
    forget = record.forget_set
    assert forget.rows == rows and forget.excluded == earlier and forget.already_forgotten == 1
    assert {e.row: e.request_id for e in forget.entries} == {r: first if r in rows[:6] else second for r in rows}
    assert len(forget.samples) == 6 + 7 + 2 and all(isinstance(x, loading.RequestSample) for x in forget.samples)
    assert s.get(Job, lease.job_id).base_version == 1  # fixed on the job at its first attempt

    loaded = loading.load(s.ctx, record)
    assert isinstance(loaded.policy, Policy) and loaded.policy.method == "rum"
    assert loaded.engine_policy.to_dict()["bins"][0]["method"] == "neggrad_plus"
    inputs = loaded.inputs
    assert isinstance(inputs, loading.EngineInputs)
    assert inputs.n_train == s.n_train and inputs.events is not None and inputs.recipe.n_train == s.n_train
    assert not inputs.base.training


def test_proxies_computes_once_then_reads_the_cache(setup, monkeypatch):
    s = setup
    lease, run_progress = claimed(s, [random_rows(s.n_train, 8, seed=6)])
    loaded = loading.load(s.ctx, loading.read_job(s.ctx, lease))
    computed = proxies.find(s.ctx, run_progress, loaded)
    assert (computed.name, computed.source, computed.values.shape) == ("confidence", "computed", (s.n_train,))

    def no_compute(*args, **kwargs):
        raise AssertionError("the proxy was computed again")

    monkeypatch.setattr(engine_proxies, "compute_proxy", no_compute)
    cached = proxies.find(s.ctx, run_progress, loaded)
    assert cached.source == "cached" and cached.sha256 == computed.sha256
    assert (cached.values == computed.values).all()
    with s.db.session() as session:
        assert session.scalar(select(func.count()).select_from(ProxyCacheEntry)) == 1


def test_refining_splits_forget_retain_and_test(setup):
    s = setup
    lease, run_progress = claimed(s, [random_rows(s.n_train, 12, seed=7)])
    loaded, _, sets = through_refining(s, lease, run_progress)
    assert sets.forget_rows.tolist() == loaded.record.forget_set.rows
    assert len(sets.forget) == 12 and len(sets.retain) == s.n_train - 12
    assert len(sets.test) == len(loaded.inputs.data.test) and sets.excluded_or_none is None
    retain_rows = set(sets.retain.index.tolist())
    assert not retain_rows & set(sets.forget_rows.tolist())


def test_unlearning_changes_a_copy_of_the_base_weights(setup):
    s = setup
    lease, run_progress = claimed(s, [random_rows(s.n_train, 20, seed=8)])
    loaded, proxy, sets = through_refining(s, lease, run_progress)
    before = copy.deepcopy(loaded.inputs.base.state_dict())
    run_progress.enter("unlearning")
    unlearned = unlearning.unlearn(run_progress, loaded, proxy, sets)
    assert unlearned.result.method == "rum" and sum(len(step.bin) for step in unlearned.result.steps) == 20
    assert not unlearned.model.training
    after = unlearned.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before[k], v) for k, v in loaded.inputs.base.state_dict().items())  # base untouched


def test_auditing_measures_before_and_after(setup):
    s = setup
    lease, run_progress = claimed(s, [random_rows(s.n_train, 20, seed=9)])
    loaded, proxy, sets = through_refining(s, lease, run_progress)
    unlearned = unlearning.unlearn(run_progress, loaded, proxy, sets)
    run_progress.enter("auditing")
    audited = auditing.audit(run_progress, loaded, sets, unlearned)
    assert isinstance(audited, auditing.AuditResult)
    for scores in (audited.before, audited.after):
        assert set(scores) == set(auditing.METRIC_KEYS) and all(0.0 <= v <= 1.0 for v in scores.values())
    assert audited.before["acc_forget"] > audited.after["acc_forget"]
    assert (audited.reference, audited.tow, audited.tow_mia, audited.tow_before) == (None, None, None, None)
    assert len(audited.bins_before) == len(audited.bins_after) == len(unlearned.result.steps)
    assert len(audited.per_class["after"]) == 10 and audited.per_class["reference"] is None
    assert len(audited.confidence["forget_after"]) == 20 and len(audited.confidence["test_before"]) == len(sets.test)
    guard = audited.guardrails
    assert guard["test_drop"] == pytest.approx(audited.before["acc_test"] - audited.after["acc_test"])
    assert audited.passed is guard["passed"] and audited.metrics()["after"] == audited.after


def test_publishing_writes_one_version_and_its_bookkeeping_and_is_fenced(setup):
    s = setup
    rows = random_rows(s.n_train, 20, seed=10)
    lease, run_progress, (loaded, proxy, unlearned, audited) = through_auditing(s, rows)

    # a run that lost its job to another worker (an earlier token) publishes nothing
    outdated = dataclasses.replace(lease, token=lease.token - 1)
    with pytest.raises(Lost):
        publishing.publish(s.ctx, outdated, run_progress, loaded, proxy, unlearned, audited)
    assert len(s.versions()) == 1 and s.forgotten() == [] and outdated.lost and not lease.lost

    run_progress.enter("publishing")
    published = publishing.publish(s.ctx, lease, run_progress, loaded, proxy, unlearned, audited)
    assert (published.version, published.base_version) == (2, 1)
    versions = s.versions()
    assert [(v.version, v.parent_version, v.job_id) for v in versions] == [(1, None, None), (2, 1, lease.job_id)]
    version = versions[1]
    assert (version.checkpoint_sha256, version.checkpoint_size) == (published.checkpoint.sha256,
                                                                    published.checkpoint.size_bytes)
    assert version.metrics["guardrails"]["passed"] is published.guardrails_passed and version.n_forgotten == 20
    assert s.aliases()["latest"] == 2 and published.aliases_moved[0] == "latest"
    assert [f.row for f in s.forgotten()] == rows and {f.version for f in s.forgotten()} == {2}
    job = s.get(Job, lease.job_id)
    assert (job.status, job.result_version, job.report_sha256) == ("succeeded", 2, published.report_sha256)
    assert [(r.status, r.result_version) for r in s.requests_of(lease.job_id)] == [("completed", 2)]
    stored = json.loads(s.ctx.store.local_path(published.report_sha256).read_bytes())
    assert stored["schema"] == report.REPORT_SCHEMA and stored["job"]["new_version"] == 2
    assert s.actions()[-2:] == ["version.published", "job.succeeded"]

    # the job is finished: the same lease can publish nothing more
    with pytest.raises(Lost):
        publishing.publish(s.ctx, lease, run_progress, loaded, proxy, unlearned, audited)
    assert len(s.versions()) == 2


def test_publishing_again_after_a_crash_only_finishes_the_bookkeeping(setup):
    s = setup
    lease, run_progress, stage_outputs = through_auditing(s, random_rows(s.n_train, 10, seed=12))
    publishing.publish(s.ctx, lease, run_progress, *stage_outputs)
    with s.db.transaction() as session:  # as if the worker died between the version and the bookkeeping
        session.execute(update(Job).where(Job.id == lease.job_id).values(
            status="running", result_version=None, heartbeat_at=utcnow() - dt.timedelta(hours=1)))
        session.execute(update(DeletionRequest).where(DeletionRequest.job_id == lease.job_id)
                        .values(status="processing", result_version=None))
    resumed = claim(s.ctx, lease.job_id, "w2")
    assert resumed.published == 2
    assert publishing.finish_published(s.ctx, resumed) == "succeeded"
    with s.db.session() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)
                              .where(ModelVersion.model_id == s.model_id)) == 2
    assert [(r.status, r.result_version) for r in s.requests_of(lease.job_id)] == [("completed", 2)]
    assert len(s.forgotten()) == 10 and s.get(Job, lease.job_id).result_version == 2


def test_a_worker_shutting_down_releases_its_job_for_the_next_worker(setup, monkeypatch):
    """SIGTERM to a worker (Celery's warm shutdown sets progress.SHUTDOWN): the running job stops at
    its next check and goes back to queued with its requests batched, its wake-up sent again; the
    next worker claims it as a new attempt and the old run can no longer write."""
    from worker.pipeline import run

    s = setup
    lease, run_progress = claimed(s, [random_rows(s.n_train, 5, seed=11)])
    sent = []
    monkeypatch.setattr(type(s.ctx), "dispatcher", property(lambda _: type("D", (), {
        "send": lambda self, task, *args: sent.append((task, args)) or True})()))

    def execute(ctx, lease_, progress_):
        progress_.enter("proxies")
        progress.SHUTDOWN.set()  # what the worker_shutting_down signal does
        progress_.check()
        raise AssertionError("check() should have stopped the run")

    try:
        assert run.run_claimed(s.ctx, lease, run_progress, execute, "job") == "queued"
    finally:
        progress.SHUTDOWN.clear()
    with s.db.session() as session:
        job = session.get(Job, lease.job_id)
        statuses = set(session.scalars(select(DeletionRequest.status).where(DeletionRequest.job_id == job.id)))
    assert (job.status, job.stage, job.worker, job.heartbeat_at) == ("queued", None, None, None)
    assert statuses == {"batched"} and job.finished_at is None
    assert sent and sent[0][1] == (lease.job_id,)
    again = claim(s.ctx, lease.job_id, "w2")
    assert again is not None and again.token == lease.token + 1
    with pytest.raises(Lost):  # the released run's token is stale
        lease.update(s.db, stage="stale write")

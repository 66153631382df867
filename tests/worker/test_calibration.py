"""Recipes, policy revisions and calibration jobs: the API (validation, one job per model, cancel)
and the calibration pipeline (``worker.calibration.run_calibration``) in-process on digits, on
SQLite and PostgreSQL, up to a deletion job that runs with the calibrated policy revision."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, select, text, update

from service.core.artifacts import LocalArtifactStore
from service.core.migrate import alembic_config
from service.core.models import Base, Job, ModelVersion, PolicyRevision
from service.core.repo import models as model_repo
from service.core.settings import OPTUNA_SCHEMA
from tests.servicekit import make_settings, register_dataset, register_model, running_service
from worker import calibration as worker_calibration
from worker import pipeline
from worker.context import WorkerContext
from worker.engine.sample_data import digits_arrays

ID = [str(i) for i in digits_arrays()["ids_train"]]
# The session's trained CNN (tests/conftest.py): 12 epochs of the engine's default recipe.
RECIPE = {"epochs": 12, "batch_size": 128, "lr": 0.05, "optimizer": "sgd"}
# A calibration small enough for CI (a few seconds on digits): 3 trials, 3% forget sets.
TINY = {"n_trials": 3, "forget_fraction": 0.03, "max_retrains": 6.0}


def _ctx(service) -> WorkerContext:
    return WorkerContext(service.settings, service.db, LocalArtifactStore(service.settings.artifacts))


def _ready(service, mid: int) -> None:
    """Mark version 1 ready as the registration task would (no worker here)."""
    with service.db.transaction() as s:
        vid = s.scalar(select(ModelVersion.id).where(ModelVersion.model_id == mid, ModelVersion.version == 1))
        model_repo.finish_registration(s, vid, ok=True, reason=None, metrics={"test_accuracy": 0.99})


def _model(service, user_files, c, name: str, *, ready: bool = True, dataset_id: int | None = None, **kw) -> int:
    ds = dataset_id or register_dataset(c, user_files, name=f"ds-{name}")["id"]
    r = register_model(c, user_files, ds, name, **kw)
    assert r.status_code == 201, r.text
    if ready:
        _ready(service, r.json()["id"])
    return r.json()["id"]


def _jobs(service, mid: int) -> list[Job]:
    with service.db.session() as s:
        return list(s.scalars(select(Job).where(Job.model_id == mid).order_by(Job.id)))


def _problem(r, status: int, field: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["detail"].startswith(f"{field}:"), body
    assert body["errors"][0]["field"] == field, body


# --------------------------------------------------------------------------- recipes


def test_recipe_at_registration_given_inferred_and_refused(service, user_files):
    with service.client() as c:
        ds = register_dataset(c, user_files)
        n_train = ds["n_train"]
        r = register_model(c, user_files, ds["id"], "given", recipe=RECIPE)
        assert r.status_code == 201, r.text
        recipe = r.json()["recipe"]
        assert {k: recipe[k] for k in RECIPE} == RECIPE and recipe["n_train"] == n_train
        assert sorted(recipe["inferred"]) == ["momentum", "schedule", "weight_decay"]
        assert recipe["steps"] == 12 * -(-n_train // 128)
        mid = r.json()["id"]
        assert c.get(f"/v1/models/{mid}/versions/1").json()["recipe"] == recipe
        assert c.get(f"/v1/models/{mid}/versions").json()["items"][0]["recipe"] == recipe
        # n_train may be given when it is the dataset's
        full = {**RECIPE, "n_train": n_train, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
        r = register_model(c, user_files, ds["id"], "full", recipe=full)
        assert r.status_code == 201, r.text and r.json()["recipe"]["inferred"] == []

        r = register_model(c, user_files, ds["id"], "inferred")
        inferred = r.json()["recipe"]
        assert inferred["n_train"] == n_train and inferred["epochs"] == 30
        assert sorted(inferred["inferred"]) == sorted(["epochs", "batch_size", "lr", "optimizer", "momentum",
                                                       "weight_decay", "schedule"])
        assert c.get(f"/v1/models/{r.json()['id']}").json()["recipe"] == inferred

        before = service.snapshot()
        bad = [
            ({"lr": 0}, "recipe.lr"), ({"lr": "fast"}, "recipe.lr"), ({"epochs": 0}, "recipe.epochs"),
            ({"epochs": 2.5}, "recipe.epochs"), ({"batch_size": -1}, "recipe.batch_size"),
            ({"optimizer": "rmsprop"}, "recipe.optimizer"), ({"schedule": "step"}, "recipe.schedule"),
            ({"momentum": 1.0}, "recipe.momentum"), ({"weight_decay": -0.1}, "recipe.weight_decay"),
            ({"n_train": n_train + 1}, "recipe.n_train"), ({"n_train": True}, "recipe.n_train"),
            ({"steps_per_epoch": 3}, "recipe"), ("[1, 2]", "recipe"), ("{not json", "recipe"),
        ]
        for i, (recipe, field) in enumerate(bad):
            _problem(register_model(c, user_files, ds["id"], f"bad-{i}", recipe=recipe), 422, field)
        assert service.snapshot() == before  # no row, no file


# --------------------------------------------------------------------------- policy and calibration API


def test_policy_revisions_and_calibration_requests(service, user_files):
    with service.client() as c:
        mid = _model(service, user_files, c, "cnn", ready=False)
        pol = c.get(f"/v1/models/{mid}/policy").json()
        assert (pol["revision"], pol["source"], pol["job_id"], pol["pinned"], pol["n_revisions"]) == (
            1, "registration", None, False, 1)
        assert pol["policy"]["calibration"] == {"auto": False, "forget_fraction": 0.06, "n_trials": 16,
                                                "cost_cap": 0.1, "max_retrains": 3.0, "space": "rum"}
        assert pol["revisions"][0]["current"] and pol["calibration_job"] is None
        # nothing to calibrate before version 1 is ready
        r = c.post(f"/v1/models/{mid}/calibrations")
        assert r.status_code == 409 and r.json()["type"].endswith("model-not-ready")
        _ready(service, mid)

        before = service.snapshot()
        # the body's fields are named as they are written in it (n_trials), not as in the policy
        for body, field in [({"n_trials": 0}, "n_trials"), ({"space": "grid"}, "space"),
                            ({"forget_fraction": 0.9}, "forget_fraction"),
                            ({"cost_cap": 0}, "cost_cap"), ({"bogus": 1}, "bogus"),
                            ({"apply": "yes"}, "apply")]:
            _problem(c.post(f"/v1/models/{mid}/calibrations", json=body), 422, field)
        r = c.post(f"/v1/models/{mid}/calibrations", json=[1])
        assert r.status_code == 422
        assert service.snapshot() == before and _jobs(service, mid) == []
        ds_id = c.get(f"/v1/models/{mid}").json()["dataset_id"]
        r = register_model(c, user_files, ds_id, "bad-cal", policy={"calibration": {"max_retrains": 0}})
        _problem(r, 422, "policy.calibration.max_retrains")

        # a calibration job: 202 + Location, kind, its settings
        r = c.post(f"/v1/models/{mid}/calibrations", json={"n_trials": 2})
        assert r.status_code == 202, r.text
        cal = r.json()
        assert r.headers["location"] == f"/v1/jobs/{cal['id']}" == cal["links"]["self"]
        assert (cal["kind"], cal["status"], cal["policy_revision"]) == ("calibration", "queued", 1)
        assert cal["params"]["settings"]["n_trials"] == 2 and cal["params"]["apply"] is None
        assert c.get(f"/v1/jobs/{cal['id']}").json()["kind"] == "calibration"
        assert c.get(f"/v1/models/{mid}/policy").json()["calibration_job"] == cal["links"]["self"]
        r = c.post(f"/v1/models/{mid}/calibrations")
        assert r.status_code == 409 and f"job {cal['id']}" in r.json()["detail"]
        # one job per model: deletion requests wait for the calibration
        assert c.post(f"/v1/models/{mid}/deletion-requests", json={"sample_ids": ID[:3], "reason": "erasure"}
                      ).status_code == 202
        flushed = c.post(f"/v1/models/{mid}/flush").json()
        assert flushed["created"] is False and flushed["job"]["id"] == cal["id"]
        assert [j["kind"] for j in c.get(f"/v1/models/{mid}/jobs?kind=calibration").json()["items"]] == [
            "calibration"]
        assert c.get(f"/v1/models/{mid}/jobs?kind=deletion").json()["items"] == []
        r = c.get(f"/v1/jobs/{cal['id']}/report")
        assert r.status_code == 409 and r.json()["job_status"] == "queued"  # it will have one
        # canceled while queued: the deletion batch goes next
        assert c.post(f"/v1/jobs/{cal['id']}/cancel").json()["status"] == "canceled"
        flushed = c.post(f"/v1/models/{mid}/flush").json()
        assert flushed["created"] is True and flushed["job"]["kind"] == "deletion"
        assert flushed["job"]["policy_revision"] == 1
        # a calibration requested while a deletion job is active waits for it: not claimable before
        second = c.post(f"/v1/models/{mid}/calibrations", json=TINY).json()
        assert second["status"] == "queued"
        assert worker_calibration.run_calibration(_ctx(service), second["id"]) is None
        assert c.get(f"/v1/jobs/{second['id']}").json()["status"] == "queued"
        # a deletion job is never run by the calibration task, nor a calibration by the job task
        assert worker_calibration.run_calibration(_ctx(service), flushed["job"]["id"]) is None
        assert pipeline.run_job(_ctx(service), second["id"]) is None
        assert c.post(f"/v1/jobs/{second['id']}/cancel").json()["status"] == "canceled"

        # a pinned policy (a plain method) and an automatic calibration after registration
        pinned = _model(service, user_files, c, "pinned", dataset_id=ds_id, ready=False,
                        policy={"method": "scrub", "calibration": {"auto": True, "n_trials": 4}})
        assert c.get(f"/v1/models/{pinned}/policy").json()["pinned"] is True
        assert _jobs(service, pinned) == []
        _ready(service, pinned)
        (auto,) = _jobs(service, pinned)
        assert (auto.kind, auto.status, auto.params["trigger"], auto.params["settings"]["n_trials"]) == (
            "calibration", "queued", "auto", 4)
        rum = _model(service, user_files, c, "rum-named", dataset_id=ds_id, policy={"method": "rum"})
        assert c.get(f"/v1/models/{rum}/policy").json()["pinned"] is False
        log = c.get("/v1/audit-log").json()
        assert "calibration.requested" in [e["action"] for e in log["items"]]


# --------------------------------------------------------------------------- the pipeline


def _calibrate(service, c, mid: int, body: dict) -> tuple[int, str | None]:
    r = c.post(f"/v1/models/{mid}/calibrations", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    return job_id, worker_calibration.run_calibration(_ctx(service), job_id, worker_name="w1")


def test_calibration_job_publishes_a_policy_revision_used_by_the_next_deletion_job(service, user_files, db_url):
    with service.client() as c:
        mid = _model(service, user_files, c, "cnn", recipe=RECIPE)
        job_id, status = _calibrate(service, c, mid, TINY)
        assert status == "succeeded"
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert (job["status"], job["stage"], job["progress"], job["attempts"], job["base_version"]) == (
            "succeeded", None, 1.0, 1, 1)
        assert set(job["timings"]) <= set(worker_calibration.STAGES) | {"total"}
        assert {"loading", "proxies", "reference", "search", "check", "publishing"} <= set(job["timings"])
        assert job["params"]["result_revision"] == 2 and job["params"]["applied"] is True

        report = c.get(f"/v1/jobs/{job_id}/report").json()
        assert report["schema"] == "unlearnd.calibration/1" and report["job"]["kind"] == "calibration"
        assert 1 <= len(report["trials"]) <= TINY["n_trials"]
        assert {"number", "state", "score", "tow", "tow_mia", "cost_share", "seconds"} <= set(report["trials"][0])
        assert report["recipe"]["epochs"] == 12 and report["settings"]["n_trials"] == 3
        for key in ("search", "check", "default_check"):
            assert 0 <= report[key]["score"] <= 1
        assert report["cost_retrains"] > 0 and report["payback"]["summary"]
        assert report["revision"]["number"] == 2 and report["revision"]["applied"] is True
        html = c.get(f"/v1/jobs/{job_id}/report.html")
        assert html.status_code == 200 and "Trials" in html.text

        pol = c.get(f"/v1/models/{mid}/policy").json()
        assert (pol["revision"], pol["source"], pol["job_id"], pol["n_revisions"]) == (2, "calibration", job_id, 2)
        assert pol["scores"]["search"]["score"] == report["search"]["score"]
        assert pol["scores"]["check"]["score"] == report["check"]["score"]
        assert pol["scores"]["cost_retrains"] == report["cost_retrains"]
        for key in ("method", "bins", "quantiles"):
            assert pol["policy"].get(key) == report["policy"].get(key)
        assert pol["policy"]["batching"] == pol["revisions"][0]["policy"]["batching"]  # envelope kept
        assert c.get(f"/v1/models/{mid}").json()["policy_revision"] == 2

        # the next deletion job runs with revision 2
        assert c.post(f"/v1/models/{mid}/deletion-requests", json={"sample_ids": ID[:20], "reason": "erasure"}
                      ).status_code == 202
        flushed = c.post(f"/v1/models/{mid}/flush").json()
        deletion = flushed["job"]
        assert deletion["kind"] == "deletion" and deletion["policy_revision"] == 2
        assert pipeline.run_job(_ctx(service), deletion["id"]) == "succeeded"
        version = c.get(f"/v1/models/{mid}/versions/2").json()
        assert version["config"]["method"] == report["policy"]["method"]
        if report["policy"]["method"] == "rum":
            assert [b["method"] for b in version["config"]["bins"]] == [
                b["method"] for b in report["policy"]["bins"]]
        deletion_report = c.get(f"/v1/jobs/{deletion['id']}/report").json()
        assert deletion_report["job"]["policy_revision"] == 2 and deletion_report["recipe"]["epochs"] == 12
        assert "policy.revised" in [e["action"] for e in c.get("/v1/audit-log").json()["items"]]

    # Optuna's tables live apart from ours: our schema still matches the migrations exactly
    engine = create_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
        if db_url.startswith("postgresql"):
            assert "studies" in inspect(engine).get_table_names(schema=OPTUNA_SCHEMA)
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM optuna.studies")) == 1
    finally:
        engine.dispose()
    if db_url.startswith("sqlite"):
        assert (service.settings.optuna_storage_url or "").endswith("optuna.sqlite3")
    command.check(alembic_config(db_url))


@pytest.fixture
def sqlite_service(tmp_path):
    """SQLite only: for paths whose database side the tests above cover on both databases."""
    with running_service(make_settings(tmp_path, f"sqlite:///{tmp_path / 'unlearnd.sqlite3'}")) as svc:
        yield svc


def test_pinned_policy_records_the_calibration_without_applying_it_and_cancel(sqlite_service, user_files,
                                                                              monkeypatch):
    service = sqlite_service
    pinned = {"method": "rum", "bins": ["none", "finetune", "salun"]}
    with service.client() as c:
        mid = _model(service, user_files, c, "pinned", recipe=RECIPE, policy=pinned)
        job_id, status = _calibrate(service, c, mid, TINY)
        assert status == "succeeded"
        pol = c.get(f"/v1/models/{mid}/policy").json()
        assert (pol["revision"], pol["source"], pol["pinned"], pol["n_revisions"]) == (1, "registration", True, 2)
        rev2 = pol["revisions"][1]
        assert (rev2["source"], rev2["job_id"], rev2["applied"], rev2["current"]) == (
            "calibration", job_id, False, False)
        assert pol["policy"]["bins"] == pinned["bins"]
        assert c.get(f"/v1/jobs/{job_id}/report").json()["revision"]["applied"] is False

        # cancel while it runs: nothing is recorded, the policy stays where it was
        from worker.engine import calibration as engine_calibration

        real = engine_calibration.calibrate

        def cancel_then_run(*args, **kwargs):
            with service.db.transaction() as s:
                s.execute(update(Job).where(Job.id == current["job"]).values(cancel_requested=True))
            return real(*args, **kwargs)

        current = {}
        monkeypatch.setattr(engine_calibration, "calibrate", cancel_then_run)
        r = c.post(f"/v1/models/{mid}/calibrations", json={**TINY, "apply": True})
        current["job"] = r.json()["id"]
        assert worker_calibration.run_calibration(_ctx(service), current["job"]) == "canceled"
        job = c.get(f"/v1/jobs/{current['job']}").json()
        # the flag is read at most once a second inside the search, and afresh before publishing
        assert job["status"] == "canceled" and job["stage"] in ("reference", "search", "check", "publishing")
        assert job["links"]["report"] is None
        pol = c.get(f"/v1/models/{mid}/policy").json()
        assert (pol["revision"], pol["n_revisions"]) == (1, 2)
        with service.db.session() as s:
            assert s.scalar(select(PolicyRevision.id).where(PolicyRevision.job_id == current["job"])) is None
        actions = [e["action"] for e in c.get("/v1/audit-log").json()["items"]]
        assert "job.canceled" in actions and actions.count("policy.revised") == 1


def test_calibration_failure_is_recorded(sqlite_service, user_files, monkeypatch):
    service = sqlite_service
    with service.client() as c:
        mid = _model(service, user_files, c, "cnn", recipe=RECIPE)
        from worker.engine import calibration as engine_calibration
        from worker.engine.errors import ConfigError

        def boom(*args, **kwargs):
            raise ConfigError("calibration: no trial completed (every trial was pruned or failed)")

        monkeypatch.setattr(engine_calibration, "calibrate", boom)
        job_id, status = _calibrate(service, c, mid, TINY)
        assert status == "failed"
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["error"]["type"] == "ConfigError" and job["error"]["stage"] == "reference"
        assert c.get(f"/v1/models/{mid}/policy").json()["n_revisions"] == 1
        # the model's next job can start (a calibration again, or deletions)
        assert c.post(f"/v1/models/{mid}/calibrations", json=TINY).status_code == 202


def test_the_service_policy_and_the_engine_share_one_job_cost_cap():
    """service/core/policy.py cannot import the engine, so it repeats the number: keep them equal."""
    from service.core.policy import Calibration
    from worker.engine.policies import JOB_COST_CAP

    assert Calibration().cost_cap == JOB_COST_CAP

"""The registration check through a real Celery worker process: SQLite with the embedded SQLite
broker, and PostgreSQL with Redis."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.servicekit import (
    fresh_postgres,
    make_settings,
    register_dataset,
    register_model,
    running_service,
    wait_for,
    worker_process,
)


@pytest.fixture(params=["sqlite+sqla", "postgres+redis"])
def stack(request, tmp_path):
    """A live API and a real worker sharing one database, broker and artifact directory."""
    if request.param == "sqlite+sqla":
        settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'unlearnd.sqlite3'}")
        with running_service(settings) as svc, worker_process(settings, tmp_path / "worker.log"):
            yield svc
    else:
        from tests.servicekit import flush_redis

        redis = request.getfixturevalue("redis_url") + "/7"
        flush_redis(redis)
        with fresh_postgres(request.getfixturevalue("postgres_admin")) as url:
            settings = make_settings(tmp_path, url, broker_url=redis)
            with running_service(settings) as svc, worker_process(settings, tmp_path / "worker.log"):
                yield svc
        flush_redis(redis)


def _version(c, model_id, ref="1"):
    return c.get(f"/v1/models/{model_id}/versions/{ref}").json()


def _settled(c, model_id):
    def check():
        v = _version(c, model_id)
        return v if v["status"] != "pending" else None

    return wait_for(check, timeout=90, what=f"model {model_id} version 1 to be checked")


def test_registration_becomes_ready_or_invalid_with_the_reason(stack, user_files, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    state = load_file(str(user_files.weights))
    nan = dict(state)
    first = sorted(k for k in state if state[k].dtype == np.float32)[0]
    nan[first] = np.full_like(state[first], np.nan)
    save_file(nan, str(bad / "nan.safetensors"))
    wide = {**user_files.spec, "kwargs": {**user_files.spec["kwargs"], "width": 32}}
    with stack.client() as c:
        ds = register_dataset(c, user_files)
        cases = {
            "good": register_model(c, user_files, ds["id"], "good"),
            "nan": register_model(c, user_files, ds["id"], "nan", weights=bad / "nan.safetensors"),
            "shapes": register_model(c, user_files, ds["id"], "shapes", spec=wide),
            "arch": register_model(c, user_files, ds["id"], "arch", spec={"name": "no_such_net", "kwargs": {}}),
        }
        # hyperparameters are checked against the engine's schema at registration, before any worker
        refused = register_model(c, user_files, ds["id"], "policy",
                                 policy={"method": "finetune", "hparams": {"lr": -1}})
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "policy.hparams.lr", refused.text
        ids = {k: r.json()["id"] for k, r in cases.items() if r.status_code == 201}
        assert set(ids) == set(cases), {k: r.text for k, r in cases.items()}
        done = {k: _settled(c, mid) for k, mid in ids.items()}

        good = done["good"]
        assert good["status"] == "ready", good
        assert good["metrics"]["test_accuracy"] == pytest.approx(user_files.test_accuracy, abs=1e-6)
        assert good["metrics"]["n_test"] == 400 and good["metrics"]["parameters"] > 0
        assert good["aliases"] == ["latest", "production"]
        assert c.get(f"/v1/models/{ids['good']}").json()["aliases"] == {"latest": 1, "production": 1}
        blob = c.get(f"/v1/models/{ids['good']}/versions/production/checkpoint")
        assert blob.status_code == 200
        assert hashlib.sha256(blob.content).hexdigest() == good["checkpoint"]["sha256"]

        reasons = {k: (v["status"], v["status_reason"] or "") for k, v in done.items() if k != "good"}
        assert all(status == "invalid" for status, _ in reasons.values()), reasons
        assert "NaN" in reasons["nan"][1]
        assert "shape" in reasons["shapes"][1]
        assert "unknown architecture" in reasons["arch"][1]
        # an invalid version gets no alias, and cannot be aliased
        assert c.get(f"/v1/models/{ids['nan']}").json()["aliases"] == {}
        put = c.put(f"/v1/models/{ids['nan']}/aliases/production", json={"version": 1})
        assert put.status_code == 409
        # a user-chosen alias on a ready version
        assert c.put(f"/v1/models/{ids['good']}/aliases/champion", json={"version": 1}).status_code == 200
        assert _version(c, ids["good"], "champion")["version"] == 1
        actions = [e["action"] for e in c.get("/v1/audit-log").json()["items"]]
        assert actions.count("version.validated") == 1 and actions.count("version.invalid") == 3


def test_a_lost_wake_up_is_sent_again_by_the_sweeper(tmp_path, user_files):
    """The API could not reach the broker when the model was registered: the version is in the
    database, and the worker's periodic sweeper finds it and checks it."""
    from tests.servicekit import free_port

    db = f"sqlite:///{tmp_path / 'unlearnd.sqlite3'}"
    good = make_settings(tmp_path, db)
    cut_off = make_settings(tmp_path, db, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with running_service(cut_off) as svc, svc.client() as c:
        ds = register_dataset(c, user_files)
        r = register_model(c, user_files, ds["id"])
        assert r.status_code == 201  # accepted although the broker is down
        mid = r.json()["id"]
        assert _version(c, mid)["status"] == "pending"
        with worker_process(good, tmp_path / "worker.log", beat=True, UNLEARND_SWEEP_INTERVAL_S="1",
                            UNLEARND_REDISPATCH_AFTER_S="0"):
            assert _settled(c, mid)["status"] == "ready"
        assert "sweeper re-sent 1 registration" in (tmp_path / "worker.log").read_text()


def test_policy_stored_with_defaults(stack, user_files):
    with stack.client() as c:
        ds = register_dataset(c, user_files)
        r = register_model(c, user_files, ds["id"], policy={"batching": {"max_requests": 4}})
        assert r.status_code == 201
        policy = r.json()["policy"]
        assert policy["method"] == "rum" and policy["batching"] == {"max_requests": 4, "max_wait_s": 60.0}
        assert json.loads(json.dumps(policy))["guardrails"]["max_test_drop"] == 0.05
        assert _settled(c, r.json()["id"])["status"] == "ready"  # the default RUM policy passes the engine

"""Retention of superseded versions over real HTTP on SQLite and PostgreSQL (issue 11, item 3): a
version that holds samples a later version erased is purged when its retention runs out (the
sweeper's part, service/core/repo/retention.py) or on POST /v1/models/{id}/purge. No worker runs
here: version 1 is marked ready as the registration task marks it, and version 2 is written as a
job publishes it (tests/worker/test_retention_pipeline.py runs the real pipeline)."""

from __future__ import annotations

import datetime as dt

import numpy as np
from sqlalchemy import select

from service.core.models import ForgottenSample, Job, Model, ModelVersion, ProxyCacheEntry, utcnow
from service.core.repo import blobs, retention
from service.core.repo import models as model_repo
from tests.api.test_delete_resources import _problem, _register
from tests.core.test_artifact_store import age
from tests.servicekit import register_dataset, register_model
from worker.engine.events import EVENT_KEYS, REDACTED
from worker.engine.sample_data import digits_arrays

ID = [str(i) for i in digits_arrays()["ids_train"]]


def _publish(service, mid: int, rows: list[int], *, version: int = 2, at: dt.datetime | None = None) -> dict[str, str]:
    """Version ``version`` as a job publishes it: ready, child of the one before, ``latest``, the
    rows it forgot; for version 2 plus proxy cache entries: version 1's own (a blob only it uses)
    and a proxy carried to version 2 (one blob, two rows). Returns the blobs by name."""
    store = service.store
    blobs = {"v2": store.put_bytes(f"weights of version {version}".encode()),
             "own": store.put_bytes(b"proxy of version 1"), "carried": store.put_bytes(b"events proxy")}
    at = at or utcnow()
    with service.db.transaction() as s:
        model = s.get(Model, mid)
        v1 = s.scalar(select(ModelVersion).where(ModelVersion.model_id == mid, ModelVersion.version == 1))
        job = Job(tenant_id=model.tenant_id, model_id=mid, status="succeeded", policy=model.policy,
                  base_version=version - 1, result_version=version, attempts=1)
        s.add(job)
        s.flush()
        v2 = ModelVersion(model_id=mid, version=version, status="ready", parent_version=version - 1, job_id=job.id,
                          checkpoint_sha256=blobs["v2"], checkpoint_size=20, method="rum", n_forgotten=len(rows))
        s.add(v2)
        s.flush()
        s.add_all([ForgottenSample(model_id=mid, row=r, sample_id=ID[r], version=version, job_id=job.id,
                                   created_at=at) for r in rows])
        if version == 2:
            s.add_all([ProxyCacheEntry(model_version_id=v1.id, proxy="confidence", sha256=blobs["own"],
                                       source="computed", compute_seconds=1.0),
                       ProxyCacheEntry(model_version_id=v1.id, proxy="events", sha256=blobs["carried"],
                                       source="computed", compute_seconds=0.1),
                       ProxyCacheEntry(model_version_id=v2.id, proxy="events", sha256=blobs["carried"],
                                       source="carried", compute_seconds=0.0)])
        model_repo.move_alias(s, mid, "latest", version)
    return blobs


def test_purge_leaves_a_tombstone_answers_410_moves_aliases_and_keeps_shared_blobs(service, user_files):
    store = service.store
    with service.client() as c:
        ds = register_dataset(c, user_files)
        keep = _register(service, c, user_files, ds["id"], "keep", ok=True)  # the same weights: one blob
        mid = _register(service, c, user_files, ds["id"], "cnn", ok=True)
        v1 = c.get(f"/v1/models/{mid}/versions/1").json()
        blobs = _publish(service, mid, [3, 5])
        assert c.put(f"/v1/models/{mid}/aliases/staging", json={"version": 1}).status_code == 200
        assert c.get(f"/v1/models/{mid}/aliases").json()["aliases"] == {"latest": 2, "production": 1, "staging": 1}

        # before: version 1 holds the erased samples until 30 days after version 2
        st = c.get(f"/v1/models/{mid}/samples/{ID[3]}").json()
        assert (st["forgotten"], st["forgotten_in_version"], st["versions_containing"]) == (True, 2, [1])
        (held,) = st["holding"]
        with service.db.session() as s:
            erased_at = s.scalar(select(ForgottenSample.created_at).where(ForgottenSample.model_id == mid).limit(1))
        erased_at = erased_at if erased_at.tzinfo else erased_at.replace(tzinfo=dt.UTC)
        assert held["version"] == 1 and held["status"] == "ready"
        assert dt.datetime.fromisoformat(held["purge_due_at"]) == erased_at + dt.timedelta(days=30)
        assert st["purged_versions"] == []
        kept = c.get(f"/v1/models/{mid}/samples/{ID[4]}").json()  # never erased: held by both, purged by neither
        assert kept["versions_containing"] == [1, 2]
        assert [h["purge_due_at"] is None for h in kept["holding"]] == [False, True]
        assert c.get(f"/v1/models/{mid}/versions/1/checkpoint").status_code == 200

        r = c.post(f"/v1/models/{mid}/purge")
        assert r.status_code == 200, r.text
        out = r.json()
        (p,) = out["purged"]
        assert (p["version"], p["checkpoint_sha256"], p["trigger"], p["erased_in"], p["n_erased"]) == (
            1, v1["checkpoint"]["sha256"], "request", [2], 2)
        assert p["aliases_moved"] == {"production": 2} and p["aliases_removed"] == ["staging"]
        assert p["n_proxy_cache_entries"] == 2 and "held 2 sample(s) erased in version(s) 2" in p["reason"]
        # version 1's own proxy goes; its weights stay (model 'keep' uses them), the carried proxy too
        assert out["blobs_removed"] == [blobs["own"]]
        assert store.exists(v1["checkpoint"]["sha256"]) and store.exists(blobs["carried"])
        assert not store.exists(blobs["own"]) and store.exists(blobs["v2"])

        # the tombstone, and 410 for its checkpoint (by number and whatever the ETag)
        t = c.get(f"/v1/models/{mid}/versions/1").json()
        assert (t["status"], t["checkpoint"]["sha256"], t["purge_reason"]) == (
            "purged", v1["checkpoint"]["sha256"], p["reason"])
        assert t["purged_at"] == p["purged_at"] and t["aliases"] == []
        for headers in ({}, {"If-None-Match": f'"{v1["checkpoint"]["sha256"]}"'}, {"Range": "bytes=0-9"}):
            gone = _problem(c.get(f"/v1/models/{mid}/versions/1/checkpoint", headers=headers), 410, "version-purged")
            assert gone["version"] == 1 and gone["purged_at"] == p["purged_at"]
            assert gone["checkpoint_sha256"] == v1["checkpoint"]["sha256"] and gone["purge_reason"] == p["reason"]
        assert c.get(f"/v1/models/{mid}/versions/production/checkpoint").status_code == 200  # now version 2
        # no alias may point at it
        assert c.get(f"/v1/models/{mid}/aliases").json()["aliases"] == {"latest": 2, "production": 2}
        r = c.put(f"/v1/models/{mid}/aliases/staging", json={"version": 1})
        assert r.status_code == 409 and "purged" in r.json()["detail"]

        # the audit log records it
        entries = [e for e in c.get("/v1/audit-log", params={"max_results": 1000}).json()["items"]
                   if e["action"] == "version.purged"]
        (e,) = entries
        assert e["resource"] == f"model:{mid}/version:1"
        assert e["details"]["checkpoint_sha256"] == v1["checkpoint"]["sha256"]
        assert e["details"]["trigger"] == "request" and e["details"]["aliases_removed"] == ["staging"]
        assert {x["sha256"] for x in e["details"]["proxy_cache"]} == {blobs["own"], blobs["carried"]}

        # the sample status: no kept version holds it; the purged one is listed
        st = c.get(f"/v1/models/{mid}/samples/{ID[3]}").json()
        assert st["versions_containing"] == [] and st["holding"] == []
        assert st["purged_versions"] == [{"version": 1, "purged_at": p["purged_at"]}]
        # nothing left to purge; the newest version never holds erased samples
        assert c.post(f"/v1/models/{mid}/purge").json() == {"model_id": mid, "purged": [], "events": None,
                                                         "dataset": None, "blobs_removed": []}

        # a tombstone is no reference: once the other model goes, version 1's weights go (once the
        # lease that the second upload of the same weights took is over: its row might not have
        # been committed yet)
        age(store, v1["checkpoint"]["sha256"], 1)
        assert c.delete(f"/v1/models/{keep}").status_code == 204
        assert not store.exists(v1["checkpoint"]["sha256"])
        assert _problem(c.post("/v1/models/999999/purge"), 404, "not-found")
    with service.client(tenant="other") as other:  # another tenant's model is not found
        assert _problem(other.post(f"/v1/models/{mid}/purge"), 404, "not-found")


def test_the_sweeper_purges_what_is_due(service, user_files):
    with service.client() as c:
        ds = register_dataset(c, user_files)
        mid = _register(service, c, user_files, ds["id"], "cnn", ok=True)  # the default: 30 days
        now = _register(service, c, user_files, ds["id"], "now", ok=True,
                        policy={"retention": {"purge_after_days": 0}})
        assert c.get(f"/v1/models/{now}").json()["policy"]["retention"] == {"purge_after_days": 0}
        assert c.get(f"/v1/models/{mid}").json()["policy"]["retention"] == {"purge_after_days": 30}
        for bad in (-1, 1.5, "x", 40_000):
            r = register_model(c, user_files, ds["id"], "bad", policy={"retention": {"purge_after_days": bad}})
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == "policy.retention.purge_after_days"
        t0 = utcnow()
        _publish(service, mid, [1], at=t0)
        _publish(service, now, [1], at=t0)

        weights = c.get(f"/v1/models/{mid}/versions/1").json()["checkpoint"]["sha256"]  # both models' version 1
        swept = retention.sweep(service.db, service.store, now=t0 + dt.timedelta(seconds=1))
        assert [(p["version"], p["trigger"]) for p in swept] == [(1, "retention")]
        assert service.store.exists(weights)  # model 'cnn' still uses them
        assert c.get(f"/v1/models/{now}/versions/1").json()["status"] == "purged"
        assert "retention.purge_after_days = 0 ran out" in c.get(f"/v1/models/{now}/versions/1").json()["purge_reason"]
        assert c.get(f"/v1/models/{mid}/versions/1").json()["status"] == "ready"
        assert retention.sweep(service.db, service.store, now=t0 + dt.timedelta(days=29, hours=23)) == []
        age(service.store, weights, 1)  # 30 days on, the lease the second upload took is long over
        (p,) = retention.sweep(service.db, service.store, now=t0 + dt.timedelta(days=30, seconds=1))
        assert p["version"] == 1 and c.get(f"/v1/models/{mid}/versions/1").json()["status"] == "purged"
        _problem(c.get(f"/v1/models/{mid}/versions/1/checkpoint"), 410, "version-purged")
        assert not service.store.exists(weights)
        assert retention.sweep(service.db, service.store, now=t0 + dt.timedelta(days=60)) == []
        # a process stopped between a purge's commit and its pruning: the blob is an orphan, which
        # the collector removes once untouched for the grace (until then it could be a
        # new upload of the same weights whose row is not committed yet)
        assert service.store.put_file(user_files.weights) == weights
        assert blobs.collect(service.db, service.store, grace_s=3600) == ([], 0)
        age(service.store, weights, 3601)
        assert blobs.collect(service.db, service.store, grace_s=3600) == ([weights], 0)
        assert not service.store.exists(weights)
        actors = {e["actor"] for e in c.get("/v1/audit-log", params={"max_results": 1000}).json()["items"]
                  if e["action"] == "version.purged"}
        assert actors == {"worker"}


def _events_of(service, mid: int) -> tuple[str, dict]:
    with service.db.session() as s:
        sha = s.get(Model, mid).events_sha256
    with np.load(service.store.local_path(sha), allow_pickle=False) as f:
        return sha, {k: f[k] for k in f.files}


def _job_of(service, mid: int, status: str, base: int) -> int:
    with service.db.transaction() as s:
        job = Job(tenant_id=s.get(Model, mid).tenant_id, model_id=mid, status=status, policy={}, base_version=base)
        s.add(job)
        s.flush()
        return job.id


def test_a_purge_blanks_the_learning_events_of_samples_no_kept_version_holds(service, user_files):
    store = service.store
    with service.client() as c:
        ds = register_dataset(c, user_files)
        mid = _register(service, c, user_files, ds["id"], "cnn", ok=True)
        first, original = _events_of(service, mid)
        _publish(service, mid, [3, 5])  # version 2 forgot rows 3 and 5: version 1 holds them
        _publish(service, mid, [7], version=3)  # version 3 forgot row 7: versions 1 and 2 hold it
        # version 3's proxies: one from the events (carried, derived from rows 3 and 5 too), one post hoc
        from_events, post_hoc = store.put_bytes(b"confidence of version 1"), store.put_bytes(b"holdout of 3")
        with service.db.transaction() as s:
            v3 = s.scalar(select(ModelVersion.id).where(ModelVersion.model_id == mid, ModelVersion.version == 3))
            s.add_all([ProxyCacheEntry(model_version_id=v3, proxy="confidence", sha256=from_events, source="carried",
                                       compute_seconds=0.0),
                       ProxyCacheEntry(model_version_id=v3, proxy="holdout_retrain", sha256=post_hoc,
                                       source="computed", compute_seconds=9.0)])
        queued = _job_of(service, mid, "queued", base=2)  # keeps version 2 (and row 7 with it)

        out = c.post(f"/v1/models/{mid}/purge").json()
        assert [p["version"] for p in out["purged"]] == [1]
        ev = out["events"]
        assert (ev["rows_redacted"], ev["rows_redacted_total"], ev["trigger"], ev["purged_versions"]) == (
            2, 2, "request", [1])
        second, redacted = _events_of(service, mid)
        assert (ev["previous_sha256"], ev["sha256"]) == (first, second) and first != second
        assert ev["proxy_cache_dropped"] == [from_events]
        # the old file and the events proxy leave the store (nothing else uses them); the post-hoc proxy stays
        assert {first, from_events} <= set(out["blobs_removed"])
        assert not store.exists(first) and not store.exists(from_events) and store.exists(post_hoc)
        assert c.get(f"/v1/models/{mid}").json()["has_events"] is True

        def check_blank(gone: list[int]) -> None:
            _, now = _events_of(service, mid)
            assert now.keys() == original.keys() and np.array_equal(now["ids"], original["ids"])
            blank = np.isin(now["ids"].astype(str), [ID[r] for r in gone])
            assert blank.sum() == len(gone) and (now["count"][blank] == REDACTED).all()
            for k, before in original.items():
                assert now[k].dtype == before.dtype
                assert [x.tobytes() for x in now[k][~blank]] == [x.tobytes() for x in before[~blank]], k
                if k in EVENT_KEYS:
                    assert np.isnan(now[k][blank]).all()

        check_blank([3, 5])  # row 7 is still held by version 2: its events stay
        (e,) = [x for x in c.get("/v1/audit-log", params={"max_results": 1000}).json()["items"]
                if x["action"] == "model.events_redacted"]
        assert e["resource"] == f"model:{mid}" and e["details"] == ev

        # a running job may read the file: version 2 goes, its row's events wait for the next purge
        with service.db.transaction() as s:
            s.get(Job, queued).status, s.get(Job, queued).base_version = "running", 3
        out = c.post(f"/v1/models/{mid}/purge").json()
        assert [p["version"] for p in out["purged"]] == [2] and out["events"] is None
        assert _events_of(service, mid)[0] == second
        with service.db.transaction() as s:
            s.get(Job, queued).status = "succeeded"
        out = c.post(f"/v1/models/{mid}/purge").json()
        assert out["purged"] == [] and out["events"]["rows_redacted"] == 1
        assert out["events"]["purged_versions"] == [] and out["events"]["rows_redacted_total"] == 3
        # the events file goes, and so does the dataset's file of before row 7 was blanked in it (the
        # dataset's only model forgot it: tests/api/test_dataset_redaction.py)
        assert out["dataset"]["rows_redacted"] == 1 and not store.exists(second)
        assert sorted(out["blobs_removed"]) == sorted([second, out["dataset"]["previous_sha256"]])
        check_blank([3, 5, 7])
        assert c.post(f"/v1/models/{mid}/purge").json()["events"] is None  # nothing new to blank


def test_the_sweeper_blanks_events_but_keeps_a_file_another_model_uses(service, user_files):
    with service.client() as c:
        ds = register_dataset(c, user_files)
        mid = _register(service, c, user_files, ds["id"], "cnn", ok=True, policy={"retention": {"purge_after_days": 0}})
        other = _register(service, c, user_files, ds["id"], "other", ok=True)  # the same events: one blob
        shared, _ = _events_of(service, mid)
        assert _events_of(service, other)[0] == shared
        _publish(service, mid, [2])
        (p,) = retention.sweep(service.db, service.store, now=utcnow() + dt.timedelta(seconds=1))
        assert p["version"] == 1
        sha, now = _events_of(service, mid)
        assert sha != shared and service.store.exists(shared)  # model 'other' still uses the original
        assert (now["count"] == REDACTED).sum() == 1 and now["count"][list(now["ids"].astype(str)).index(ID[2])] == -1
        (e,) = [x for x in c.get("/v1/audit-log", params={"max_results": 1000}).json()["items"]
                if x["action"] == "model.events_redacted"]
        assert (e["actor"], e["details"]["trigger"], e["details"]["rows_redacted"]) == ("worker", "retention", 1)

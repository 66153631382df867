"""Deleting models and datasets that nothing depends on, over real HTTP on SQLite and PostgreSQL
(no worker runs here: version 1 is marked as the registration task marks it)."""

from __future__ import annotations

from sqlalchemy import func, select

from service.core.models import Job, Model, ModelAlias, ModelVersion, PolicyRevision, ProxyCacheEntry
from service.core.repo import models as model_repo
from tests.core.test_artifact_store import age
from tests.servicekit import register_dataset, register_model
from worker.engine.sample_data import digits_arrays

ID = [str(i) for i in digits_arrays()["ids_train"]]
WIDTH = "weights: fc.weight has shape (10, 64), expected (10, 128)"


def _register(service, c, user_files, dataset_id: int, name: str, *, ok: bool | None = None,
              reason: str | None = None, policy: dict | None = None) -> int:
    r = register_model(c, user_files, dataset_id, name, policy=policy)
    assert r.status_code == 201, r.text
    mid = r.json()["id"]
    if ok is not None:
        with service.db.transaction() as s:
            vid = s.scalar(select(ModelVersion.id).where(ModelVersion.model_id == mid))
            model_repo.finish_registration(s, vid, ok=ok, reason=reason,
                                           metrics={"test_accuracy": 0.9} if ok else None)
    return mid


def _problem(r, status: int, kind: str) -> dict:
    assert r.status_code == status and r.headers["content-type"] == "application/problem+json", r.text
    assert r.json()["type"] == f"urn:unlearnd:problem:{kind}", r.json()
    return r.json()


def _entries(c, action: str) -> list[dict]:
    return [e for e in c.get("/v1/audit-log", params={"max_results": 1000}).json()["items"] if e["action"] == action]


def test_an_invalid_model_says_so_and_deleting_it_frees_its_name(service, user_files):
    with service.client() as c:
        ds = register_dataset(c, user_files)
        mid = _register(service, c, user_files, ds["id"], "cnn", ok=False, reason=WIDTH)
        before = service.snapshot()
        for r in (c.post(f"/v1/models/{mid}/deletion-requests", json={"sample_ids": [ID[1]], "reason": "erasure"}),
                  c.post(f"/v1/models/{mid}/calibrations")):
            p = _problem(r, 409, "model-invalid")
            assert f"version 1 was found invalid ({WIDTH})" in p["detail"] and "register the model again" in p["detail"]
            assert (p["version_status"], p["status_reason"]) == ("invalid", WIDTH)
        assert service.snapshot() == before
        # a model whose version 1 is still pending is not ready yet, and says that
        pending = _register(service, c, user_files, ds["id"], "pending")
        for r in (c.post(f"/v1/models/{pending}/deletion-requests", json={"sample_ids": [ID[1]], "reason": "erasure"}),
                  c.post(f"/v1/models/{pending}/calibrations")):
            p = _problem(r, 409, "model-not-ready")
            assert "checked by a worker" in p["detail"]
        assert c.delete(f"/v1/models/{pending}").status_code == 204  # its check finds nothing left to mark

        ckpt = c.get(f"/v1/models/{mid}").json()["latest_version"]["checkpoint"]["sha256"]
        age(service.store, ckpt, 1)  # the lease model "pending"'s upload of the same weights took: over
        r = c.delete(f"/v1/models/{mid}")
        assert r.status_code == 204 and r.content == b""
        assert _problem(c.get(f"/v1/models/{mid}"), 404, "not-found")
        assert not service.store.exists(ckpt)  # nothing references the weights any more
        (entry,) = [e for e in _entries(c, "model.deleted") if e["resource"] == f"model:{mid}"]
        assert entry["details"]["checkpoints"] == [{"version": 1, "status": "invalid", "sha256": ckpt}]
        # the name is free: the corrected model is registered under it (under a new id: a deleted
        # model's id is never given again, on SQLite either, so model:<id> in the audit log names one)
        again = register_model(c, user_files, ds["id"], "cnn")
        assert again.status_code == 201 and again.json()["id"] > mid
        assert service.store.exists(ckpt)


def test_deleting_a_model_removes_its_rows_and_the_blobs_no_row_references(service, user_files):
    store = service.store
    with service.client() as c:
        ds = register_dataset(c, user_files)
        keep = _register(service, c, user_files, ds["id"], "keep", ok=True)  # the same weights and events
        mid = _register(service, c, user_files, ds["id"], "cnn", ok=True)
        # what a calibration leaves behind: a finished job with its report and page, a policy
        # revision; a proxy cache entry of version 1; and an alias
        report, page, proxy = (store.put_bytes(b) for b in (b'{"report": 1}', b"<html>page</html>", b"proxy"))
        with service.db.transaction() as s:
            m = s.get(Model, mid)
            job = Job(tenant_id=m.tenant_id, model_id=mid, kind="calibration", status="succeeded", policy=m.policy,
                      report_sha256=report, report_html_sha256=page)
            s.add(job)
            s.flush()
            job_id = job.id
            model_repo.add_revision(s, m, m.policy, source="calibration", job_id=job_id, apply=True)
            v1 = s.scalar(select(ModelVersion.id).where(ModelVersion.model_id == mid))
            s.add(ProxyCacheEntry(model_version_id=v1, proxy="confidence", sha256=proxy, source="computed",
                                  compute_seconds=0.1))
        assert c.put(f"/v1/models/{mid}/aliases/stable", json={"version": 1}).status_code == 200
        shown = c.get(f"/v1/models/{mid}").json()["latest_version"]["checkpoint"]["sha256"]

        with service.client("globex") as g:  # another tenant's model is not found, and stays
            before = service.snapshot()
            _problem(g.delete(f"/v1/models/{mid}"), 404, "not-found")
            _problem(g.delete(f"/v1/datasets/{ds['id']}"), 404, "not-found")
            assert service.snapshot() == before
        assert c.delete(f"/v1/models/{mid}").status_code == 204
        assert _problem(c.delete(f"/v1/models/{mid}"), 404, "not-found")
        with service.db.session() as s:
            for table in (ModelVersion, ModelAlias, PolicyRevision, Job):
                assert s.scalar(select(func.count()).select_from(table).where(table.model_id == mid)) == 0
            assert s.scalar(select(func.count()).select_from(ProxyCacheEntry)) == 0
        assert not any(store.exists(d) for d in (report, page, proxy))
        assert store.exists(shown)  # "keep" references the same weights
        (entry,) = _entries(c, "model.deleted")
        assert entry["resource"] == f"model:{mid}" and entry["details"]["jobs"] == [job_id]
        assert entry["details"]["checkpoints"] == [{"version": 1, "status": "ready", "sha256": shown}]
        assert entry["details"]["name"] == "cnn" and entry["details"]["events_sha256"]

        # the dataset goes once no model uses it, and every blob with the last reference to it
        p = _problem(c.delete(f"/v1/datasets/{ds['id']}"), 409, "dataset-in-use")
        assert p["model_ids"] == [keep]
        for sha in (shown, entry["details"]["events_sha256"]):  # leased by the second upload: over now
            age(store, sha, 1)
        assert c.delete(f"/v1/models/{keep}").status_code == 204
        assert not store.exists(shown)
        assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 204
        assert _problem(c.get(f"/v1/datasets/{ds['id']}"), 404, "not-found")
        assert service.files() == []
        counts = service.counts()
        assert (counts["datasets"], counts["dataset_samples"], counts["models"], counts["model_versions"]) == (0,) * 4
        (gone,) = _entries(c, "dataset.deleted")
        assert gone["details"]["sha256"] == ds["sha256"] and gone["resource"] == f"dataset:{ds['id']}"
        again = register_dataset(c, user_files)  # its name is free too; its id is not given again
        assert again["name"] == "digits" and again["id"] > ds["id"]


def test_a_model_with_an_active_job_or_deletion_requests_is_kept_and_so_is_its_dataset(service, user_files):
    with service.client() as c:
        ds = register_dataset(c, user_files)
        mid = _register(service, c, user_files, ds["id"], "cnn", ok=True,
                        policy={"batching": {"max_requests": 100, "max_wait_s": 3600}})
        cal = c.post(f"/v1/models/{mid}/calibrations")  # queued: no worker runs it
        assert cal.status_code == 202, cal.text
        before = service.snapshot()
        p = _problem(c.delete(f"/v1/models/{mid}"), 409, "model-busy")
        assert p["job_id"] == cal.json()["id"] and f"active job ({cal.json()['id']})" in p["detail"]
        assert _problem(c.delete(f"/v1/datasets/{ds['id']}"), 409, "dataset-in-use")["model_ids"] == [mid]
        assert service.snapshot() == before
        assert c.post(f"/v1/jobs/{cal.json()['id']}/cancel").status_code == 202
        # a deletion request, in any status, makes the model the record of an erasure
        assert c.post(f"/v1/models/{mid}/deletion-requests",
                      json={"sample_ids": [ID[1]], "reason": "erasure"}).status_code == 202
        before = service.snapshot()
        p = _problem(c.delete(f"/v1/models/{mid}"), 409, "model-has-deletion-requests")
        assert p["n_deletion_requests"] == 1 and "record of those erasures" in p["detail"]
        _problem(c.delete(f"/v1/datasets/{ds['id']}"), 409, "dataset-in-use")
        assert service.snapshot() == before
        assert c.get(f"/v1/models/{mid}").status_code == 200

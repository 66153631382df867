"""Deletion requests and batching over real HTTP, on SQLite and PostgreSQL (no worker runs here:
jobs stay queued, which is what lets these tests look at batching itself)."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from service.core.models import DatasetSample, DeletionRequest, ForgottenSample, Job, ModelVersion
from service.core.repo import models as model_repo
from tests.servicekit import fresh_postgres, make_settings, register_dataset, register_model, running_service
from worker.engine.sample_data import digits_arrays

ID = [str(i) for i in digits_arrays()["ids_train"]]  # the training ids of the digits file the tests upload


def _ready_model(service, user_files, c, name="cnn", policy=None, dataset_id=None) -> int:
    """Register a model and mark version 1 ready as the registration task would (no worker here)."""
    ds = dataset_id or register_dataset(c, user_files, name=f"ds-{name}")["id"]
    r = register_model(c, user_files, ds, name, policy=policy)
    assert r.status_code == 201, r.text
    mid = r.json()["id"]
    with service.db.transaction() as s:
        vid = s.scalar(select(ModelVersion.id).where(ModelVersion.model_id == mid))
        model_repo.finish_registration(s, vid, ok=True, reason=None, metrics={"test_accuracy": 0.99})
    return mid


def _post(c, mid, ids, reason="erasure", key=None, **extra):
    headers = {"Idempotency-Key": key} if key else {}
    return c.post(f"/v1/models/{mid}/deletion-requests", json={"sample_ids": ids, "reason": reason, **extra},
                  headers=headers)


def _jobs(service, mid):
    with service.db.session() as s:
        return list(s.scalars(select(Job).where(Job.model_id == mid).order_by(Job.id)))


def test_request_is_committed_and_answered_202(service, user_files):
    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 100, "max_wait_s": 3600}})
        r = _post(c, mid, [ID[1], ID[2], ID[2]], subject_ref="alice@example.com")
        assert r.status_code == 202, r.text
        body = r.json()
        assert r.headers["location"] == f"/v1/deletion-requests/{body['id']}"
        assert body["status"] == "received" and body["n_samples"] == 2 and body["n_new_samples"] == 2
        assert body["subject_hash"] != "alice@example.com" and len(body["subject_hash"]) == 64
        assert body["due_by"] > body["created_at"]
        assert c.get(body["links"]["self"]).json()["id"] == body["id"]
        with service.db.session() as s:  # stored before the answer, without the subject in clear
            row = s.get(DeletionRequest, body["id"])
            assert row.status == "received" and "alice" not in str(row.subject_hash)
        assert _jobs(service, mid) == []  # 1 of 100, waited 0 of 3600 s: not due


def test_bad_requests_are_422_and_change_nothing(service, user_files):
    with service.client() as c:
        mid = _ready_model(service, user_files, c)
        before = service.snapshot()
        unknown = _post(c, mid, [ID[1], "nope-1", "nope-2"])
        assert unknown.status_code == 422
        assert unknown.json()["unknown_sample_ids"] == ["nope-1", "nope-2"]
        assert unknown.json()["errors"][0]["field"] == "sample_ids"
        for body, field in (({"sample_ids": [], "reason": "erasure"}, "sample_ids"),
                            ({"sample_ids": [ID[1]], "reason": "because"}, "reason"),
                            ({"sample_ids": [ID[1]]}, "reason"),
                            ({"sample_ids": [ID[1]], "reason": "erasure", "extra": 1}, "extra"),
                            ({"sample_ids": [""], "reason": "erasure"}, "sample_ids")):
            r = c.post(f"/v1/models/{mid}/deletion-requests", json=body)
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
            assert any(e["field"] == field for e in r.json()["errors"]), r.json()
        assert _post(c, 9999, [ID[1]]).status_code == 404
        assert service.snapshot() == before


def test_a_model_without_a_ready_version_refuses_requests(service, user_files):
    with service.client() as c:
        ds = register_dataset(c, user_files)
        mid = register_model(c, user_files, ds["id"]).json()["id"]  # pending: no worker
        r = _post(c, mid, [ID[1]])
        assert r.status_code == 409 and "no ready version" in r.json()["detail"]


def test_idempotency_key(service, user_files):
    with service.client() as c:
        mid = _ready_model(service, user_files, c)
        first = _post(c, mid, [ID[1]], key="k-1")
        again = _post(c, mid, [ID[1]], key="k-1")
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
        other = _post(c, mid, [ID[2]], key="k-1")
        assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"
        with service.db.session() as s:
            assert len(list(s.scalars(select(DeletionRequest)))) == 1
        # keys are per tenant: another tenant may use the same key
        with service.client("globex") as g:
            gm = _ready_model(service, user_files, g, name="g")
            assert _post(g, gm, [ID[1]], key="k-1").json()["id"] != first.json()["id"]


def test_idempotency_key_in_flight_is_409(tmp_path, postgres_admin, user_files):
    """PostgreSQL only: SQLite serializes writers, so a request is never observed in flight there."""
    import psycopg

    from service.core.auth import authenticate

    with fresh_postgres(postgres_admin) as url, running_service(make_settings(tmp_path, url)) as service, \
            service.client() as c:
        mid = _ready_model(service, user_files, c)
        with service.db.transaction() as s:
            tenant = authenticate(s, f"Bearer {service.key()}").tenant_id
        lock = int.from_bytes(hashlib.sha256(f"{tenant}:k-busy".encode()).digest()[:8], "big", signed=True)
        # another request holding the key, mid-transaction
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
            busy = _post(c, mid, [ID[1]], key="k-busy")
            assert busy.status_code == 409 and busy.headers["retry-after"] == "1"
        assert _post(c, mid, [ID[1]], key="k-busy").status_code == 202


def test_duplicates_are_linked_to_earlier_work(service, user_files):
    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 100, "max_wait_s": 3600}})
        a = _post(c, mid, [ID[1], ID[2]]).json()
        b = _post(c, mid, [ID[2], ID[3]]).json()
        assert (b["n_samples"], b["n_new_samples"], b["linked_to"]) == (2, 1, [a["id"]])
        only_linked = _post(c, mid, [ID[1]]).json()
        assert only_linked["n_new_samples"] == 0 and only_linked["linked_to"] == [a["id"]]
        # a sample forgotten by an earlier job (written as the job pipeline writes it): a request
        # for it alone is complete at once, pointing at the version that forgot it
        ds_id = c.get(f"/v1/models/{mid}").json()["dataset_id"]
        with service.db.transaction() as s:
            sample5 = s.scalar(select(DatasetSample.sample_id).where(DatasetSample.dataset_id == ds_id,
                                                                    DatasetSample.row == 5))
            job = Job(tenant_id=s.get(DeletionRequest, a["id"]).tenant_id, model_id=mid, status="succeeded",
                      policy={}, result_version=2)
            s.add(job)
            s.flush()
            s.add(ForgottenSample(model_id=mid, row=5, sample_id=sample5, version=2, job_id=job.id,
                                  request_id=a["id"]))
        done = _post(c, mid, [sample5]).json()
        assert (done["status"], done["result_version"], done["n_new_samples"]) == ("completed", 2, 0)
        status = c.get(f"/v1/models/{mid}/samples/{sample5}").json()
        assert status["forgotten"] is True and status["forgotten_in_version"] == 2
        assert status["versions_containing"] == [1] and done["id"] in status["deletion_requests"]
        assert c.get(f"/v1/models/{mid}/samples/{ID[1]}").json()["forgotten"] is False
        assert c.get(f"/v1/models/{mid}/samples/nope").status_code == 404


def test_batching_by_count_by_flush_and_one_job_per_model(service, user_files):
    with service.client() as c:
        m1 = _ready_model(service, user_files, c, "m1", policy={"batching": {"max_requests": 3, "max_wait_s": 3600}})
        m2 = _ready_model(service, user_files, c, "m2", policy={"batching": {"max_requests": 3, "max_wait_s": 3600}})
        reqs = [_post(c, m1, [ID[i] for i in ids]).json() for ids in ((1, 2), (3,), (4, 5))]
        _post(c, m2, [ID[1]])
        j1 = _jobs(service, m1)
        assert len(j1) == 1 and j1[0].status == "queued" and j1[0].n_requests == 3 and j1[0].n_forget == 5
        assert all(c.get(r["links"]["self"]).json()["status"] == "batched" for r in reqs)
        assert c.get(reqs[0]["links"]["self"]).json()["job_id"] == j1[0].id
        assert _jobs(service, m2) == []  # models batch separately: m2 has 1 of 3
        # while m1's job is active, new requests wait for the next batch, even on flush
        late = [_post(c, m1, [ID[i]]).json() for i in (6, 7, 8)]
        assert len(_jobs(service, m1)) == 1 and all(r["status"] == "received" for r in late)
        busy = c.post(f"/v1/models/{m1}/flush").json()
        assert busy["created"] is False and busy["job"]["id"] == j1[0].id
        # flush batches what is pending now, whatever the count
        flushed = c.post(f"/v1/models/{m2}/flush")
        assert flushed.status_code == 202 and flushed.json()["created"] is True
        assert flushed.headers["location"] == f"/v1/jobs/{flushed.json()['job']['id']}"
        assert c.post(f"/v1/models/{m2}/flush").json()["created"] is False  # active
        job = c.get(f"/v1/jobs/{j1[0].id}").json()
        assert job["status"] == "queued" and job["n_requests"] == 3
        listed = c.get(f"/v1/models/{m1}/deletion-requests", params={"status": "received"}).json()["items"]
        assert [r["id"] for r in listed] == [r["id"] for r in late]


class Wakeups:
    """A dispatcher that records the wake-ups it would send (no worker runs here)."""

    def __init__(self):
        self.sent = []

    def send(self, task, *args):
        self.sent.append((task, *args))
        return True


def test_a_flush_while_a_job_runs_starts_the_next_batch_when_it_ends(service, user_files):
    """The flush is remembered (models.flush_requested_at): when the active job ends, the worker's
    next_job claims the pending requests at once, not when max_requests or max_wait_s say so."""
    from service.core import batching
    from service.core.models import Model
    from service.core.repo import requests as request_repo

    def flag():
        with service.db.session() as s:
            return s.get(Model, mid).flush_requested_at

    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 100, "max_wait_s": 3600}})
        _post(c, mid, [ID[1]])
        first = c.post(f"/v1/models/{mid}/flush").json()
        assert first["created"] is True
        idle = c.post(f"/v1/models/{mid}/flush").json()  # a job is active, nothing pending: nothing to remember
        assert idle["created"] is False and idle["detail"] == f"nothing pending (job {first['job']['id']} is active)"
        assert flag() is None
        late = [_post(c, mid, [ID[i]]).json() for i in (2, 3)]
        busy = c.post(f"/v1/models/{mid}/flush").json()
        assert busy["created"] is False and busy["job"]["id"] == first["job"]["id"]
        assert busy["detail"] == (f"job {first['job']['id']} is active: the pending requests are batched as soon "
                                  "as it ends")
        assert flag() is not None
        assert len(_jobs(service, mid)) == 1 and _post(c, mid, [ID[4]]).json()["status"] == "received"
        # the job ends as a worker ends it, then the worker starts what comes next
        with service.db.transaction() as s:
            job = s.get(Job, first["job"]["id"])
            job.status = "succeeded"
            request_repo.complete_job(s, job.id, 1)
        with service.db.session() as s:
            assert batching.maybe_due(s, mid)  # 3 of 100 pending, waited 0 of 3600 s: due by the flush
        wakeups = Wakeups()
        nxt = batching.next_job(service.db, wakeups, mid)
        assert nxt is not None and nxt.n_requests == 3 and wakeups.sent == [("unlearnd.run_job", nxt.id)]
        assert all(c.get(r["links"]["self"]).json()["job_id"] == nxt.id for r in late)
        assert flag() is None  # honoured once: the claim cleared it
        entry = c.get("/v1/audit-log").json()["items"][-1]
        assert (entry["action"], entry["details"]["trigger"]) == ("job.created", "remembered-flush")
        # a remembered flush whose requests went elsewhere meanwhile is dropped, not kept for later ones
        _post(c, mid, [ID[5]])
        assert c.post(f"/v1/models/{mid}/flush").json()["detail"].endswith("as soon as it ends")
        with service.db.transaction() as s:
            s.get(Job, nxt.id).status = "succeeded"
            request_repo.complete_job(s, nxt.id, 1)
            s.execute(DeletionRequest.__table__.update().where(DeletionRequest.status == "received")
                      .values(status="completed"))
        assert batching.next_job(service.db, wakeups, mid) is None and flag() is None


def test_cancel_a_queued_job_returns_its_requests(service, user_files):
    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 1, "max_wait_s": 3600}})
        req = _post(c, mid, [ID[1]]).json()
        job_id = c.get(req["links"]["self"]).json()["job_id"]
        assert job_id is not None
        canceled = c.post(f"/v1/jobs/{job_id}/cancel")
        assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
        back = c.get(req["links"]["self"]).json()
        assert back["status"] == "received" and back["job_id"] is None
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
        assert c.get(f"/v1/jobs/{job_id}/report").status_code == 404
        # the returned request is batched again by the next flush
        again = c.post(f"/v1/models/{mid}/flush").json()
        assert again["created"] is True and again["job"]["n_requests"] == 1
        actions = [e["action"] for e in c.get("/v1/audit-log").json()["items"]]
        assert actions.count("job.created") == 2 and "job.canceled" in actions


def test_other_tenants_see_nothing(service, user_files):
    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 1, "max_wait_s": 3600}})
        req = _post(c, mid, [ID[1]]).json()
        job_id = c.get(req["links"]["self"]).json()["job_id"]
    with service.client("globex") as g:
        for path in (req["links"]["self"], f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/report",
                     f"/v1/models/{mid}/deletion-requests", f"/v1/models/{mid}/jobs",
                     f"/v1/models/{mid}/samples/{ID[1]}"):
            assert g.get(path).status_code == 404, path
        assert g.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert g.post(f"/v1/models/{mid}/flush").status_code == 404
        assert _post(g, mid, [ID[1]]).status_code == 404

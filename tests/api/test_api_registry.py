"""The registry API over real HTTP, on SQLite and on PostgreSQL (no worker: versions stay pending)."""

from __future__ import annotations

import hashlib

from tests.servicekit import register_dataset, register_model


def test_dataset_register_get_list(service, user_files):
    with service.client() as c:
        r = c.post("/v1/datasets", data={"name": "digits", "mean": "[0.5]", "std": "[0.5]"},
                   files={"file": ("digits.npz", user_files.dataset.read_bytes())})
        assert r.status_code == 201, r.text
        body = r.json()
        assert r.headers["location"] == f"/v1/datasets/{body['id']}"
        assert body["sha256"] == hashlib.sha256(user_files.dataset.read_bytes()).hexdigest()
        assert (body["n_train"], body["n_test"], body["n_holdout"], body["num_classes"]) == (1197, 400, 200, 10)
        assert body["input_shape"] == [1, 8, 8] and body["dtype"] == "uint8"
        assert body["normalization"] == {"mean": [0.5], "std": [0.5]}
        assert c.get(f"/v1/datasets/{body['id']}").json() == body
        assert service.counts()["dataset_samples"] == 1197
        assert service.store.exists(body["sha256"])
        assert c.get("/v1/datasets", params={"name": "digits"}).json()["items"] == [body]


def test_pagination_is_a_stable_cursor(service, user_files):
    with service.client() as c:
        ids = [register_dataset(c, user_files, name=f"ds{i}")["id"] for i in range(5)]
        seen, token, pages = [], None, 0
        while True:
            params = {"max_results": 2} | ({"page_token": token} if token else {})
            page = c.get("/v1/datasets", params=params).json()
            seen += [d["id"] for d in page["items"]]
            pages += 1
            token = page["next_page_token"]
            if token is None:
                break
        assert seen == ids and pages == 3
        assert len(c.get("/v1/datasets").json()["items"]) == 5  # default page size holds all


def test_model_registration_is_pending_until_a_worker_checks_it(service, user_files):
    with service.client() as c:
        ds = register_dataset(c, user_files)
        r = register_model(c, user_files, ds["id"], policy={"method": "finetune", "hparams": {"epochs": 2}})
        assert r.status_code == 201, r.text
        model = r.json()
        assert r.headers["location"] == f"/v1/models/{model['id']}"
        assert model["has_events"] is True and model["dataset_id"] == ds["id"]
        assert model["policy"]["method"] == "finetune" and model["policy"]["batching"]["max_requests"] >= 1
        v1 = model["latest_version"]
        assert (v1["version"], v1["status"]) == (1, "pending")
        assert v1["checkpoint"]["sha256"] == hashlib.sha256(user_files.weights.read_bytes()).hexdigest()
        versions = c.get(f"/v1/models/{model['id']}/versions").json()
        assert [v["version"] for v in versions["items"]] == [1]
        assert c.get(f"/v1/models/{model['id']}/versions/1").json()["status"] == "pending"
        assert c.get(f"/v1/models/{model['id']}").json()["name"] == "cnn"
        # the same name twice is a conflict, and changes nothing
        before = service.snapshot()
        again = register_model(c, user_files, ds["id"])
        assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"
        assert again.json()["errors"][0]["field"] == "name"
        assert service.snapshot() == before


def test_checkpoint_download_etag_and_ranges(service, user_files):
    blob = user_files.weights.read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    with service.client() as c:
        ds = register_dataset(c, user_files)
        mid = register_model(c, user_files, ds["id"]).json()["id"]
        url = f"/v1/models/{mid}/versions/1/checkpoint"
        full = c.get(url)
        assert full.status_code == 200 and full.content == blob
        assert full.headers["etag"] == f'"{sha}"' and full.headers["accept-ranges"] == "bytes"
        assert full.headers["content-disposition"].endswith('.safetensors"')
        assert c.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
        part = c.get(url, headers={"Range": "bytes=10-109"})
        assert part.status_code == 206 and part.content == blob[10:110]
        assert part.headers["content-range"] == f"bytes 10-109/{len(blob)}"
        assert c.get(url, headers={"Range": "bytes=-16"}).content == blob[-16:]
        assert c.get(url, headers={"Range": f"bytes={len(blob) - 5}-"}).content == blob[-5:]
        bad = c.get(url, headers={"Range": f"bytes={len(blob)}-"})
        assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(blob)}"
        assert c.get(f"/v1/models/{mid}/versions/2/checkpoint").status_code == 404
        assert c.get(f"/v1/models/{mid}/versions/production/checkpoint").status_code == 404  # not ready yet


def test_health_readiness_metrics_docs(service):
    with service.client(tenant=None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
        assert {"/v1/datasets", "/v1/models", "/v1/models/{model_id}/versions/{ref}/checkpoint"} <= set(spec["paths"])
        text = c.get("/metrics").text
        assert 'unlearnd_http_requests_total{method="GET",route="/readyz",status="200"}' in text
        assert "unlearnd_model_versions" in text


def test_readyz_reports_an_unreachable_broker(tmp_path, db_url):
    from tests.servicekit import free_port, make_settings, running_service

    settings = make_settings(tmp_path, db_url, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with running_service(settings) as svc, svc.client(tenant=None) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("unreachable")


def test_audit_log_is_append_only_and_sequenced_into_a_signed_tree(service, user_files):
    import pytest
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from service.core.repo import transparency
    from service.core.signing import load_signer

    with service.client() as c:
        ds = register_dataset(c, user_files)
        register_model(c, user_files, ds["id"])
        log = c.get("/v1/audit-log").json()
        assert [e["action"] for e in log["items"]] == ["dataset.registered", "model.registered"]
        assert [e["leaf_index"] for e in log["items"]] == [None, None] and log["tree_head"] is None
        transparency.sequence(service.db, load_signer(service.settings))
        log = c.get("/v1/audit-log").json()
        assert [e["leaf_index"] for e in log["items"]] == [0, 1] and log["tree_head"]["tree_size"] == 2
    for stmt in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"), service.db.transaction() as s:
            s.execute(text(stmt))
    assert service.counts()["audit_log"] == 2

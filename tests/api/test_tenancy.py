"""Tenant isolation over real HTTP, on SQLite and PostgreSQL: a key of one tenant cannot list, read,
download or change anything of another. Another tenant's resource is a 404, like one that does
not exist; a missing, wrong or revoked key is a 401."""

from __future__ import annotations

import httpx
from sqlalchemy import update

from service.core.auth import create_key
from service.core.models import ApiKey, utcnow
from tests.servicekit import register_dataset, register_model

PROBLEM = "application/problem+json"


def assert_problem(r, status: int, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["type"] and body["title"]
    if field is not None:
        assert field in [e["field"] for e in body.get("errors") or []], body
    return body


def test_a_tenant_sees_and_changes_nothing_of_another(service, user_files):
    with service.client("acme") as acme, service.client("globex") as globex:
        ds = register_dataset(acme, user_files)
        r = register_model(acme, user_files, ds["id"])
        assert r.status_code == 201, r.text
        mid = r.json()["id"]
        acme_audit = acme.get("/v1/audit-log").json()["items"]
        assert [e["action"] for e in acme_audit] == ["dataset.registered", "model.registered"]
        before = service.snapshot()

        # lists are empty, whatever the filter or the page token
        for url in ("/v1/datasets", "/v1/models", "/v1/audit-log"):
            page = globex.get(url)
            assert page.status_code == 200, page.text
            assert page.json()["items"] == [] and page.json()["next_page_token"] is None, url
        assert globex.get("/v1/datasets", params={"name": "digits"}).json()["items"] == []
        assert globex.get("/v1/models", params={"name": "cnn"}).json()["items"] == []

        # reads, downloads and changes of acme's resources: 404, the same answer as for an id that does not exist
        missing = 999_999
        reads = [
            "/v1/datasets/{d}", "/v1/models/{m}", "/v1/models/{m}/versions", "/v1/models/{m}/versions/1",
            "/v1/models/{m}/versions/latest", "/v1/models/{m}/versions/1/checkpoint", "/v1/models/{m}/aliases",
        ]
        for url in reads:
            theirs = assert_problem(globex.get(url.format(d=ds["id"], m=mid)), 404)
            nobody = assert_problem(globex.get(url.format(d=missing, m=missing)), 404)
            assert (theirs["type"], theirs["title"]) == (nobody["type"], nobody["title"]), url
            assert "errors" not in theirs and "acme" not in str(theirs)
        ranged = globex.get(f"/v1/models/{mid}/versions/1/checkpoint", headers={"Range": "bytes=0-99"})
        assert_problem(ranged, 404)
        assert not ranged.content.startswith(user_files.weights.read_bytes()[:8])
        assert_problem(globex.put(f"/v1/models/{mid}/aliases/production", json={"version": 1}), 404)
        assert_problem(globex.delete(f"/v1/models/{mid}/aliases/production"), 404)
        assert_problem(globex.delete(f"/v1/models/{mid}/aliases/latest"), 404)
        # acme's dataset cannot back a model of globex
        r = register_model(globex, user_files, ds["id"])
        assert_problem(r, 422, "dataset_id")
        assert service.snapshot() == before

        # globex's own resources: the same names are free, ids are its own, its audit log is its own
        own = register_dataset(globex, user_files)
        assert own["id"] != ds["id"]
        r = register_model(globex, user_files, own["id"])
        assert r.status_code == 201, r.text
        own_mid = r.json()["id"]
        assert [d["id"] for d in globex.get("/v1/datasets").json()["items"]] == [own["id"]]
        assert [m["id"] for m in globex.get("/v1/models").json()["items"]] == [own_mid]
        log = globex.get("/v1/audit-log").json()
        assert [(e["action"], e["resource"]) for e in log["items"]] == [
            ("dataset.registered", f"dataset:{own['id']}"), ("model.registered", f"model:{own_mid}")]
        assert not {e["id"] for e in log["items"]} & {e["id"] for e in acme_audit}

        # and acme still sees exactly its own, unchanged
        assert [d["id"] for d in acme.get("/v1/datasets").json()["items"]] == [ds["id"]]
        assert [m["id"] for m in acme.get("/v1/models").json()["items"]] == [mid]
        assert acme.get(f"/v1/datasets/{ds['id']}").json() == ds
        assert_problem(acme.get(f"/v1/datasets/{own['id']}"), 404)
        assert_problem(acme.get(f"/v1/models/{own_mid}"), 404)
        assert acme.get(f"/v1/models/{mid}/versions/1/checkpoint").content == user_files.weights.read_bytes()
        assert acme.get("/v1/audit-log").json()["items"] == acme_audit


def test_missing_wrong_and_revoked_keys_are_401(service):
    with service.client("acme") as acme:
        assert acme.get("/v1/datasets").status_code == 200
    key = service.key("acme")
    prefix = key.split("_")[1]
    with service.db.transaction() as s:
        s.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(revoked_at=utcnow()))
    with service.client("acme") as revoked, service.client(None) as anonymous:
        for r in (revoked.get("/v1/datasets"), revoked.get("/v1/audit-log"), anonymous.get("/v1/models"),
                  anonymous.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"}),
                  anonymous.get("/v1/datasets", headers={"Authorization": f"Bearer {key[:-4]}AAAA"})):
            assert_problem(r, 401, "Authorization")
            assert r.headers["www-authenticate"].startswith("Bearer")
    # another key of the same tenant still works, and sees the tenant's resources
    with service.db.transaction() as s:
        fresh = create_key(s, "acme")[0]
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {fresh}"}) as c:
        assert c.get("/v1/datasets").status_code == 200

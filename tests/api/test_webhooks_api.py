"""The webhook endpoints over HTTP: registration (the secret shown once, or the caller's, and
stored encrypted), URLs refused as problem+json naming ``url``, tenancy, the delivery log and the
test message, changes (PATCH, checked as registration is), a new secret, removal; and a deployment
whose webhook key is missing (503, nothing stored)."""

from __future__ import annotations

import base64

import pytest

from service.core import webhooks as standard
from service.core.models import WebhookEndpoint
from tests.servicekit import Service, make_settings, running_service


def stored_secret(service: Service, hook_id: int) -> tuple[str, str]:
    """The endpoint's secret as the database holds it, and decrypted with the deployment's key."""
    with service.db.session() as s:
        row = s.get(WebhookEndpoint, hook_id)
        return row.encrypted_secret, standard.load_box(service.settings).open(row.encrypted_secret, row.tenant_id)


@pytest.fixture
def service(tmp_path, db_url):
    """The service, allowing private destinations: these tests register receivers on loopback."""
    with running_service(make_settings(tmp_path, db_url, webhook_allow_private=True)) as svc:
        yield svc


def test_register_list_test_and_remove_a_webhook(service: Service):
    with service.client() as c, service.client("other") as other:
        r = c.post("/v1/webhooks", json={"url": "https://hooks.example.com/unlearnd",
                                         "events": ["version.published", "job.finished", "job.finished"],
                                         "description": "ours"})
        assert r.status_code == 201, r.text
        hook = r.json()
        assert r.headers["location"] == f"/v1/webhooks/{hook['id']}"
        assert hook["secret"].startswith("whsec_") and len(base64.b64decode(hook["secret"][6:])) == 32
        assert r.headers["cache-control"] == "no-store"
        stored, opened = stored_secret(service, hook["id"])  # encrypted under the deployment's key
        assert stored.startswith("v1:") and hook["secret"][6:] not in stored and opened == hook["secret"]
        assert hook["events"] == ["version.published", "job.finished"]
        shown = c.get(f"/v1/webhooks/{hook['id']}").json()
        assert "secret" not in shown and shown["url"] == hook["url"] and shown["description"] == "ours"
        assert [h["id"] for h in c.get("/v1/webhooks").json()["items"]] == [hook["id"]]
        assert "secret" not in c.get("/v1/webhooks").json()["items"][0]

        # another tenant sees none of it
        assert other.get("/v1/webhooks").json()["items"] == []
        for answer in (other.get(f"/v1/webhooks/{hook['id']}"), other.get(f"/v1/webhooks/{hook['id']}/deliveries"),
                       other.post(f"/v1/webhooks/{hook['id']}/test"), other.delete(f"/v1/webhooks/{hook['id']}")):
            assert answer.status_code == 404, answer.text

        sent = c.post(f"/v1/webhooks/{hook['id']}/test")
        assert sent.status_code == 202, sent.text
        message = sent.json()
        assert (message["event"], message["status"], message["attempts"]) == ("webhook.test", "pending", 0)
        assert message["message_id"].startswith("msg_") and message["next_attempt_at"]
        assert message["payload"]["type"] == "webhook.test" and message["payload"]["data"]["webhook_id"] == hook["id"]
        log = c.get(f"/v1/webhooks/{hook['id']}/deliveries").json()
        assert [d["id"] for d in log["items"]] == [message["id"]] and log["next_page_token"] is None
        assert c.get(f"/v1/webhooks/{hook['id']}/deliveries?status=delivered").json()["items"] == []

        assert c.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
        assert c.get(f"/v1/webhooks/{hook['id']}").status_code == 404
        assert c.get("/v1/webhooks").json()["items"] == []


def test_a_secret_of_the_caller_is_taken(service: Service):
    secret = "whsec_" + base64.b64encode(b"s" * 24).decode()
    with service.client() as c:
        r = c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h", "events": ["version.purged"],
                                         "secret": secret})
        assert r.status_code == 201, r.text
        assert r.json()["secret"] == secret


def test_bad_webhooks_are_refused_naming_the_field(service: Service):
    with service.client() as c:
        for url in ("ftp://example.com/", "javascript:alert(1)", "http://", "http://u:p@example.com/", "example.com"):
            r = c.post("/v1/webhooks", json={"url": url, "events": ["job.finished"]})
            assert r.status_code == 422, (url, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert [e["field"] for e in r.json()["errors"]] == ["url"], r.json()
        for body, field in (({"url": "http://a.example/", "events": ["model.deleted"]}, "events"),
                            ({"url": "http://a.example/", "events": []}, "events"),
                            ({"url": "http://a.example/", "events": ["job.finished"], "secret": "whsec_c2hvcnQ="},
                             "secret"),
                            ({"url": "http://a.example/", "events": ["job.finished"], "extra": 1}, "extra")):
            r = c.post("/v1/webhooks", json=body)
            assert r.status_code == 422, (body, r.text)
            assert field in r.json()["errors"][0]["field"], r.json()
        assert c.get("/v1/webhooks").json()["items"] == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_purge_reports_version_purged(service: Service, user_files):
    from tests.api.test_delete_resources import _register
    from tests.api.test_retention import _publish
    from tests.servicekit import register_dataset

    with service.client() as c:
        hook = c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h", "events": ["version.purged"]}).json()
        mid = _register(service, c, user_files, register_dataset(c, user_files)["id"], "cnn", ok=True)
        _publish(service, mid, [3, 5])
        assert c.post(f"/v1/models/{mid}/purge").status_code == 200
        (message,) = c.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"]
    assert (message["event"], message["status"]) == ("version.purged", "pending")
    data = message["payload"]["data"]
    assert (data["model_id"], data["version"]) == (mid, 1) and data["audit_entry_id"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_tenant_has_at_most_max_webhooks_endpoints(service: Service):
    limit = service.settings.max_webhooks
    with service.client() as c, service.client("other") as other:
        for i in range(limit):
            assert c.post("/v1/webhooks", json={"url": f"http://127.0.0.1:9/{i}", "events": ["job.finished"]}
                          ).status_code == 201
        r = c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/more", "events": ["job.finished"]})
        assert r.status_code == 409 and r.json()["type"].endswith("too-many-webhooks"), r.text
        assert other.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/o", "events": ["job.finished"]}
                          ).status_code == 201  # another tenant's count is its own
        first = c.get("/v1/webhooks?max_results=1").json()["items"][0]["id"]
        assert c.delete(f"/v1/webhooks/{first}").status_code == 204
        assert c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/more", "events": ["job.finished"]}
                      ).status_code == 201


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_url_into_a_private_network_is_refused_unless_the_deployment_allows_it(tmp_path, db_url):
    urls = ("http://127.0.0.1:8080/h", "http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/h",
            "https://[::1]/h", "http://10.0.0.7/h", "http://[fd00::7]/h", "http://2130706433/h")
    with running_service(make_settings(tmp_path / "closed", db_url)) as closed, closed.client() as c:
        assert closed.settings.webhook_allow_private is False  # the default
        for url in urls:
            r = c.post("/v1/webhooks", json={"url": url, "events": ["job.finished"]})
            assert r.status_code == 422, (url, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert [e["field"] for e in r.json()["errors"]] == ["url"], r.json()
            assert "private network" in r.text and "UNLEARND_WEBHOOK_ALLOW_PRIVATE" in r.text
        # a name is not looked up on the request path: the worker checks what it resolves to
        assert c.post("/v1/webhooks", json={"url": "http://localhost:9/h", "events": ["job.finished"]}
                      ).status_code == 201
        assert len(c.get("/v1/webhooks").json()["items"]) == 1
    with (running_service(make_settings(tmp_path / "open", db_url, webhook_allow_private=True)) as open_,
          open_.client() as c):
        for url in urls:
            assert c.post("/v1/webhooks", json={"url": url, "events": ["job.finished"]}).status_code == 201, url


def test_a_webhook_is_changed_as_it_is_checked_at_registration(service: Service):
    with service.client() as c, service.client("other") as other:
        hook = c.post("/v1/webhooks", json={"url": "https://hooks.example.com/a", "events": ["job.finished"],
                                            "description": "ours"}).json()
        before = stored_secret(service, hook["id"])
        r = c.patch(f"/v1/webhooks/{hook['id']}", json={"url": "https://hooks.example.com/b?token=1",
                                                        "events": ["version.published", "job.finished",
                                                                   "version.published"]})
        assert r.status_code == 200, r.text
        changed = r.json()
        assert "secret" not in changed and changed["description"] == "ours"  # left out: kept
        assert (changed["url"], changed["events"]) == ("https://hooks.example.com/b?token=1",
                                                       ["version.published", "job.finished"])
        assert c.get(f"/v1/webhooks/{hook['id']}").json() == changed
        assert stored_secret(service, hook["id"]) == before  # the secret is not touched
        r = c.patch(f"/v1/webhooks/{hook['id']}", json={"description": None})
        assert r.status_code == 200 and r.json()["description"] is None and r.json()["url"] == changed["url"]
        assert c.patch(f"/v1/webhooks/{hook['id']}", json={}).json() == r.json()  # nothing to change

        for body, field in (({"url": "ftp://example.com/"}, "url"), ({"url": "http://u:p@example.com/"}, "url"),
                            ({"url": "http://example.com:99999/"}, "url"), ({"url": None}, "url"),
                            ({"events": []}, "events"), ({"events": ["model.deleted"]}, "events"),
                            ({"events": None}, "events"), ({"secret": standard.new_secret()}, "secret"),
                            ({"description": "x" * 201}, "description"), ({"enabled": False}, "enabled")):
            r = c.patch(f"/v1/webhooks/{hook['id']}", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert [e["field"].split(".")[0] for e in r.json()["errors"]] == [field], (body, r.json())  # events.0
        # a refused change changes nothing, not even the fields that were valid
        r = c.patch(f"/v1/webhooks/{hook['id']}", json={"events": ["version.purged"], "url": "http://a:0/"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "url"
        assert c.get(f"/v1/webhooks/{hook['id']}").json()["events"] == ["version.published", "job.finished"]

        for answer in (other.patch(f"/v1/webhooks/{hook['id']}", json={"url": "https://evil.example/"}),
                       other.post(f"/v1/webhooks/{hook['id']}/rotate-secret"),
                       c.patch("/v1/webhooks/999999", json={"description": "x"}),
                       c.post("/v1/webhooks/999999/rotate-secret")):
            assert answer.status_code == 404, answer.text
        assert c.get(f"/v1/webhooks/{hook['id']}").json()["url"] == changed["url"]


def test_a_webhooks_secret_is_rotated_and_shown_once(service: Service):
    with service.client() as c:
        hook = c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h", "events": ["job.finished"]}).json()
        r = c.post(f"/v1/webhooks/{hook['id']}/rotate-secret")
        assert r.status_code == 200, r.text
        rotated = r.json()
        assert r.headers["cache-control"] == "no-store"
        assert rotated["secret"].startswith("whsec_") and rotated["secret"] != hook["secret"]
        assert {k: v for k, v in rotated.items() if k != "secret"} == c.get(f"/v1/webhooks/{hook['id']}").json()
        stored, opened = stored_secret(service, hook["id"])
        assert opened == rotated["secret"] and rotated["secret"][6:] not in stored
        assert "secret" not in c.get(f"/v1/webhooks/{hook['id']}").json()
        assert all("secret" not in h for h in c.get("/v1/webhooks").json()["items"])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_url_into_a_private_network_is_not_patched_in_either(tmp_path, db_url):
    with running_service(make_settings(tmp_path, db_url)) as closed, closed.client() as c:
        hook = c.post("/v1/webhooks", json={"url": "https://hooks.example.com/a", "events": ["job.finished"]}).json()
        for url in ("http://127.0.0.1:8080/h", "http://169.254.169.254/latest/meta-data/", "http://[::ffff:10.0.0.1]/"):
            r = c.patch(f"/v1/webhooks/{hook['id']}", json={"url": url})
            assert r.status_code == 422, (url, r.text)
            assert [e["field"] for e in r.json()["errors"]] == ["url"] and "private network" in r.text
        assert c.get(f"/v1/webhooks/{hook['id']}").json()["url"] == "https://hooks.example.com/a"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_without_its_webhook_key_the_api_stores_no_secret(tmp_path, db_url):
    """A configured key that does not exist is never replaced by a new one: registering or rotating
    is 503 (the reason is in the log, not in the answer), and nothing else is affected."""
    missing = tmp_path / "keys" / "webhook-key"
    with (running_service(make_settings(tmp_path, db_url, webhook_encryption_key=missing,
                                        webhook_allow_private=True)) as svc, svc.client() as c):
        r = c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h", "events": ["job.finished"]})
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"].endswith("webhook-key-unavailable") and str(missing) not in r.text
        assert c.get("/v1/webhooks").json()["items"] == [] and not missing.exists()
        assert c.post("/v1/webhooks/1/rotate-secret").status_code == 503


def test_a_rotation_keeps_the_old_secret_signing_for_its_grace_period(service: Service):
    """No body: a day of grace, shown as previous_secret_expires_at (by GET too, never the secret);
    grace_seconds 0: none. A grace period out of range is 422 naming grace_seconds and changes nothing."""
    import datetime as dt

    def expires(answer: dict) -> float | None:
        at = answer["previous_secret_expires_at"]
        return None if at is None else (dt.datetime.fromisoformat(at) - dt.datetime.now(dt.UTC)).total_seconds()

    with service.client() as c:
        hook = c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h", "events": ["job.finished"]}).json()
        assert hook["previous_secret_expires_at"] is None
        assert c.get(f"/v1/webhooks/{hook['id']}").json()["previous_secret_expires_at"] is None
        r = c.post(f"/v1/webhooks/{hook['id']}/rotate-secret")
        assert r.status_code == 200, r.text
        assert 86_400 - 60 < expires(r.json()) <= 86_400  # the default
        shown = c.get(f"/v1/webhooks/{hook['id']}").json()
        assert shown["previous_secret_expires_at"] == r.json()["previous_secret_expires_at"] and "secret" not in shown
        assert all("secret" not in h for h in c.get("/v1/webhooks").json()["items"])
        with service.db.session() as s:
            row = s.get(WebhookEndpoint, hook["id"])
            previous = standard.load_box(service.settings).open(row.previous_encrypted_secret, row.tenant_id)
        assert previous == hook["secret"]  # sealed for the tenant like the current one

        r = c.post(f"/v1/webhooks/{hook['id']}/rotate-secret", json={"grace_seconds": 600})
        assert r.status_code == 200 and 540 < expires(r.json()) <= 600, r.text
        r = c.post(f"/v1/webhooks/{hook['id']}/rotate-secret", json={})  # an empty object: the default too
        assert r.status_code == 200 and expires(r.json()) > 86_000, r.text
        r = c.post(f"/v1/webhooks/{hook['id']}/rotate-secret", json={"grace_seconds": 604_800})
        assert r.status_code == 200 and expires(r.json()) > 604_000, r.text
        r = c.post(f"/v1/webhooks/{hook['id']}/rotate-secret", json={"grace_seconds": 0})
        assert r.status_code == 200 and r.json()["previous_secret_expires_at"] is None, r.text
        assert c.get(f"/v1/webhooks/{hook['id']}").json()["previous_secret_expires_at"] is None
        rotated = r.json()

        before = stored_secret(service, hook["id"])
        for grace in (-1, 604_801, 10**20, "60", 1.5, True, None, [60]):
            r = c.post(f"/v1/webhooks/{hook['id']}/rotate-secret", json={"grace_seconds": grace})
            assert r.status_code == 422, (grace, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert [e["field"] for e in r.json()["errors"]] == ["grace_seconds"], (grace, r.json())
        r = c.post(f"/v1/webhooks/{hook['id']}/rotate-secret", json={"grace": 60})
        assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["grace"], r.text
        assert stored_secret(service, hook["id"]) == before  # nothing changed
        assert c.get(f"/v1/webhooks/{hook['id']}").json() == {k: v for k, v in rotated.items() if k != "secret"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_real_worker_signs_with_both_secrets_during_the_grace_period(tmp_path, db_url):
    """rotate-secret with a grace period over HTTP, the message delivered by a worker process: the
    API stored both secrets encrypted, the worker (the embedded default key, found in the data
    directory the API made it in) opens both and signs with each, the new secret first. A receiver
    that still holds only the old secret accepts the message, and so would one with the new."""
    from tests.servicekit import wait_for, worker_process
    from tests.worker.test_webhooks import receiving, signatures, verifies

    settings = make_settings(tmp_path, db_url, webhook_allow_private=True)
    old = standard.new_secret()
    with (receiving(old, []) as receiver, running_service(settings) as service,
          worker_process(settings, tmp_path / "worker.log", beat=True, UNLEARND_WEBHOOK_INTERVAL_S="3600",
                         UNLEARND_WEBHOOK_ALLOW_PRIVATE="true"),
          service.client() as c):
        hook = c.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.finished"], "secret": old}).json()
        r = c.post(f"/v1/webhooks/{hook['id']}/rotate-secret", json={"grace_seconds": 3600})
        assert r.status_code == 200, r.text
        new = r.json()["secret"]
        queued = c.post(f"/v1/webhooks/{hook['id']}/test").json()
        wait_for(lambda: [d for d in c.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"]
                          if d["status"] == "delivered"], timeout=30, what="the test message delivered")
    (got,) = receiver.got
    assert got["valid"] and got["headers"]["webhook-id"] == queued["message_id"]
    first, then = signatures(got)
    assert verifies(new, got, first) and not verifies(old, got, first)
    assert verifies(old, got, then) and not verifies(new, got, then)

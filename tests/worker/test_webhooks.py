"""Webhooks: messages written in the transaction of their event (the outbox), sent by the worker
to a real HTTP receiver on loopback that checks each signature itself (HMAC-SHA256 from the
standard library, as the Standard Webhooks specification defines it, not service/core/webhooks.py),
retried with backoff while the receiver fails (500, then a timeout) with the same webhook-id until
it answers 2xx, given up after the last attempt; and the API's endpoints and delivery log. Secrets
are stored encrypted under the deployment's webhook key: a worker without it, or with another one,
gives the message up with an error that says so."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update

from service.core import webhooks as standard
from service.core.artifacts import LocalArtifactStore
from service.core.auth import Caller
from service.core.db import Database
from service.core.errors import Invalid
from service.core.models import Tenant, WebhookDelivery, WebhookEndpoint, utcnow
from service.core.repo import audit, webhooks
from service.core.settings import Settings
from worker.webhooks import deliver

# --------------------------------------------------------------------------- a receiver on loopback


def verify(secret: str, headers, body: bytes) -> bool:
    """The receiver's check, written from the specification."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{expected}", s) for s in headers["webhook-signature"].split())


class Receiver:
    """Answers each POST as the next step of ``script`` says (a status code, or 'hang' to answer
    after the sender's timeout), 200 once the script is used up; records what it got."""

    def __init__(self, secret: str, script: list):
        self.secret, self.script, self.got = secret, list(script), []
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                step = receiver.script.pop(0) if receiver.script else 200
                receiver.got.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                     "valid": verify(receiver.secret, self.headers, body), "answer": step})
                if step == "hang":
                    receiver.release.wait(10)
                    return
                self.send_response(step)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False  # server_close joins the handlers
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@contextmanager
def receiving(secret: str, script: list):
    r = Receiver(secret, script)
    r.thread.start()
    try:
        yield r
    finally:
        r.release.set()
        r.server.shutdown()
        r.server.server_close()
        r.thread.join(10)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def db(migrated_db):
    return migrated_db


@pytest.fixture(autouse=True)
def webhook_key(tmp_path, monkeypatch):
    """The deployment's webhook key for this test, in the environment: Settings() (the helpers
    below, a service started by the test) find it there."""
    path = tmp_path / "webhook-key"
    path.write_text(standard.new_key_text())
    monkeypatch.setenv("UNLEARND_WEBHOOK_ENCRYPTION_KEY", str(path))
    return path


def tenant(db: Database, name: str) -> Caller:
    with db.transaction() as s:
        row = Tenant(name=name)
        s.add(row)
        s.flush()
        return Caller(tenant_id=row.id, tenant=name, key_prefix="test")


def endpoint(db: Database, caller: Caller, url: str, events=("version.published",), secret=None):
    """A new endpoint: its id and its secret (in clear)."""
    with db.transaction() as s:
        row, secret = webhooks.create(s, caller, url=url, event_types=list(events), secret=secret, description=None,
                                      limit=20, box=standard.load_box(settings()),
                                      allow_private=True)  # the receivers are on loopback
        return row.id, secret


def publish(db: Database, caller: Caller, version: int = 2) -> None:
    with db.transaction() as s:
        audit.record(s, caller.tenant_id, "worker", "version.published", f"model:7/version:{version}",
                     {"job_id": 3, "base_version": version - 1, "new_version": version})


def rows(db: Database) -> list[WebhookDelivery]:
    with db.session() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def settings(**kw) -> Settings:
    return Settings(**{"webhook_timeout_s": 0.5, "webhook_retry_base_s": 10.0, "webhook_retry_max_s": 3600.0,
                       "webhook_max_attempts": 5, "webhook_allow_private": True, **kw})


def due_now(db: Database) -> None:
    """Time passes: every pending message is due."""
    with db.transaction() as s:
        s.execute(update(WebhookDelivery).where(WebhookDelivery.status == "pending")
                  .values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))


# --------------------------------------------------------------------------- signing and validation


def test_signature_is_the_specifications():
    # the reference vector of the Standard Webhooks libraries' tests
    secret, msg_id, ts, body = ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                                b'{"test": 2432232314}')
    assert standard.sign(secret, msg_id, ts, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    new = standard.new_secret()
    assert new.startswith("whsec_") and len(base64.b64decode(new[6:])) == 32
    assert verify(new, {"webhook-id": "msg_1", "webhook-timestamp": "5",
                        "webhook-signature": standard.sign(new, "msg_1", 5, b"{}")}, b"{}")
    for bad in ("secret", "whsec_", "whsec_!!!!", "whsec_" + base64.b64encode(b"x" * 8).decode(),
                "whsec_" + base64.b64encode(b"x" * 65).decode()):
        with pytest.raises(Invalid) as e:
            standard.secret_key(bad)
        assert e.value.field == "secret"


@pytest.mark.parametrize("url", ["ftp://example.com/x", "javascript:alert(1)", "file:///etc/passwd", "http://",
                                 "example.com/hook", "http://user:pw@example.com/", "http://example.com/#f",
                                 "http://example.com:99999/", "http://exa mple.com/", " http://example.com/"])
def test_only_plain_http_and_https_urls(url):
    with pytest.raises(Invalid) as e:
        standard.check_url(url)
    assert e.value.field == "url"


def test_http_and_https_urls_are_taken():
    for url in ("http://127.0.0.1:8080/hook", "https://hooks.example.com/unlearnd?x=1", "HTTPS://[::1]/h"):
        assert standard.check_url(url, allow_private=True) == url


# --------------------------------------------------------------------------- the outbox


def test_messages_are_written_in_the_events_transaction(db):
    acme, other = tenant(db, "acme"), tenant(db, "other")
    wanted, _ = endpoint(db, acme, "http://127.0.0.1:9/a", ("version.published", "job.finished"))
    endpoint(db, acme, "http://127.0.0.1:9/b", ("deletion_request.completed",))  # not subscribed
    endpoint(db, other, "http://127.0.0.1:9/c", ("version.published",))  # another tenant
    with pytest.raises(RuntimeError), db.transaction() as s:  # rolled back: nothing is sent
        audit.record(s, acme.tenant_id, "worker", "version.published", "model:7/version:2", {"job_id": 3})
        raise RuntimeError("the publication failed")
    assert rows(db) == []
    publish(db, acme)
    with db.transaction() as s:  # entries that report no event write nothing
        audit.record(s, acme.tenant_id, "api", "deletion_request.received", "deletion_request:4", {})
    (row,) = rows(db)
    assert (row.endpoint_id, row.tenant_id, row.event_type, row.status, row.attempts) == (
        wanted, acme.tenant_id, "version.published", "pending", 0)
    message = json.loads(row.body)
    assert message["type"] == "version.published" and message["timestamp"].endswith("Z")
    assert message["data"]["model_id"] == 7 and message["data"]["version"] == 2 and message["data"]["job_id"] == 3
    assert row.message_id.startswith("msg_")


def test_a_failed_job_reports_itself_and_each_failed_request(db):
    acme = tenant(db, "acme")
    endpoint(db, acme, "http://127.0.0.1:9/a", ("job.finished", "deletion_request.failed"))
    with db.transaction() as s:
        audit.record(s, acme.tenant_id, "worker", "job.failed", "job:12", {
            "model_id": 7, "error": {"type": "RuntimeError", "message": "boom", "stage": "unlearning"},
            "requests_failed": [21, 22], "requests_requeued": [23]})
    got = [(r.event_type, json.loads(r.body)["data"]) for r in rows(db)]
    assert [t for t, _ in got] == ["job.finished", "deletion_request.failed", "deletion_request.failed"]
    assert got[0][1]["status"] == "failed" and got[0][1]["job_id"] == 12 and got[0][1]["model_id"] == 7
    assert [d["request_id"] for _, d in got[1:]] == [21, 22]
    assert got[1][1]["error"]["message"] == "boom" and got[1][1]["job_id"] == 12


def test_a_commit_that_wrote_messages_sends_the_delivery_task(db):
    acme = tenant(db, "acme")
    endpoint(db, acme, "http://127.0.0.1:9/a")
    woken = []
    webhooks.wake_after_commit(db, lambda: woken.append(1))
    with pytest.raises(RuntimeError), db.transaction() as s:
        audit.record(s, acme.tenant_id, "worker", "version.published", "model:7/version:2", {})
        raise RuntimeError("rolled back")
    with db.transaction() as s:  # reports no event
        audit.record(s, acme.tenant_id, "worker", "job.created", "job:1", {})
    assert woken == []
    publish(db, acme)
    assert woken == [1]


# --------------------------------------------------------------------------- delivery


def test_a_failing_receiver_gets_the_same_message_until_it_answers(db):
    acme = tenant(db, "acme")
    secret = standard.new_secret()
    with receiving(secret, [500, "hang", 204]) as receiver:
        endpoint(db, acme, receiver.url, secret=secret)
        publish(db, acme)
        s = settings()
        before = utcnow()
        assert deliver(db, s) == {"sent": 1, "delivered": 0, "failed": 0}
        (row,) = rows(db)
        assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, 500)
        wait = (_aware(row.next_attempt_at) - before).total_seconds()
        assert 10 <= wait < 12  # the first backoff
        assert deliver(db, s)["sent"] == 0  # not due yet
        due_now(db)
        deliver(db, s)  # the receiver hangs past the timeout
        (row,) = rows(db)
        assert (row.status, row.attempts, row.last_status_code) == ("pending", 2, None)
        assert "timed out" in row.last_error
        assert 20 <= (row.next_attempt_at - row.last_attempt_at).total_seconds() < 22  # doubled
        due_now(db)
        assert deliver(db, s) == {"sent": 1, "delivered": 1, "failed": 0}
        due_now(db)
        assert deliver(db, s)["sent"] == 0  # delivered: never again
    (row,) = rows(db)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("delivered", 3, 204, None)
    assert row.delivered_at is not None and row.next_attempt_at is None
    assert [g["answer"] for g in receiver.got] == [500, "hang", 204]
    assert all(g["valid"] for g in receiver.got)
    assert {g["headers"]["webhook-id"] for g in receiver.got} == {row.message_id}
    assert {g["body"] for g in receiver.got} == {row.body.encode()}
    assert receiver.got[0]["headers"]["content-type"] == "application/json"


def test_a_receiver_that_never_recovers_is_given_up(db):
    acme = tenant(db, "acme")
    with receiving("whsec_" + base64.b64encode(b"k" * 24).decode(), [500] * 10) as receiver:
        _, secret = endpoint(db, acme, receiver.url, secret=receiver.secret)
        publish(db, acme)
        s = settings(webhook_max_attempts=3)
        outcomes = []
        for _ in range(5):
            outcomes.append(deliver(db, s))
            due_now(db)
    assert outcomes[2] == {"sent": 1, "delivered": 0, "failed": 1}
    assert [o["sent"] for o in outcomes] == [1, 1, 1, 0, 0]
    (row,) = rows(db)
    assert (row.status, row.attempts, row.last_status_code, row.next_attempt_at) == ("failed", 3, 500, None)
    assert len(receiver.got) == 3 and all(g["valid"] for g in receiver.got)


def test_a_refused_connection_or_a_redirect_is_a_failed_attempt(db):
    acme = tenant(db, "acme")
    with receiving(standard.new_secret(), [302]) as receiver:
        endpoint(db, acme, receiver.url, secret=receiver.secret)
        endpoint(db, acme, "http://127.0.0.1:9/nothing-listens-here")
        publish(db, acme)
        deliver(db, settings())
    redirected, refused = rows(db)
    assert (redirected.status, redirected.last_status_code) == ("pending", 302)
    assert (refused.status, refused.last_status_code) == ("pending", None) and refused.last_error
    assert redirected.message_id != refused.message_id


def test_a_message_claimed_twice_is_recorded_once(db):
    """A worker that took longer than its lease: the message was claimed again meanwhile, and the
    late result does not overwrite the newer attempt's."""
    acme = tenant(db, "acme")
    endpoint(db, acme, "http://127.0.0.1:9/a")
    publish(db, acme)
    (first,) = webhooks.claim(db, utcnow(), 10, 0.0)
    (second,) = webhooks.claim(db, utcnow() + dt.timedelta(seconds=1), 10, 60.0)
    assert second.attempt == first.attempt + 1 and second.message_id == first.message_id
    with db.transaction() as s:
        assert webhooks.record_attempt(s, first, 200, None, utcnow(), max_attempts=5, retry_base_s=1,
                                       retry_max_s=1) is None
        assert webhooks.record_attempt(s, second, 200, None, utcnow(), max_attempts=5, retry_base_s=1,
                                       retry_max_s=1) == "delivered"


def test_the_sweeper_prunes_finished_messages_past_their_retention(db, monkeypatch, tmp_path):
    """Delivered and given-up messages whose last attempt is older than
    webhook_delivery_retention_days leave the delivery log; recent ones and pending ones stay."""
    from types import SimpleNamespace

    from worker import tasks

    acme = tenant(db, "acme")
    endpoint(db, acme, "http://127.0.0.1:9/a")
    for version in range(2, 7):
        publish(db, acme, version)
    now = utcnow()
    old, recent = now - dt.timedelta(days=31), now - dt.timedelta(days=29)
    ids = [r.id for r in rows(db)]
    with db.transaction() as s:
        for i, (status, last) in zip(ids, [("delivered", old), ("failed", old), ("delivered", recent),
                                           ("pending", old), ("failed", None)], strict=True):
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == i).values(
                status=status, last_attempt_at=last, created_at=old))
    ctx = SimpleNamespace(db=db, settings=settings(webhook_delivery_retention_days=30), dispatcher=None,
                          store=LocalArtifactStore(tmp_path / "artifacts"))
    monkeypatch.setattr(tasks, "worker_context", lambda: ctx)
    assert tasks.sweep()["webhook_deliveries_pruned"] == 3
    assert [(r.id, r.status) for r in rows(db)] == [(ids[2], "delivered"), (ids[3], "pending")]
    assert tasks.sweep()["webhook_deliveries_pruned"] == 0
    assert webhooks.prune(db, utcnow()) == 1  # retention 0: every finished message goes
    assert [r.status for r in rows(db)] == ["pending"]


def test_backoff_doubles_up_to_its_cap():
    assert [webhooks.backoff(n, 10, 100) for n in range(1, 7)] == [10, 20, 40, 80, 100, 100]
    assert webhooks.backoff(10_000, 10, 3600) == 3600


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


# --------------------------------------------------------------------------- secrets at rest


def stored_secret(db: Database, endpoint_id: int) -> str:
    with db.session() as s:
        return s.get(WebhookEndpoint, endpoint_id).encrypted_secret


def test_a_secret_is_stored_encrypted_and_signs_once_decrypted(db):
    acme = tenant(db, "acme")
    secret = standard.new_secret()
    with receiving(secret, []) as receiver:
        hook, _ = endpoint(db, acme, receiver.url, secret=secret)
        stored = stored_secret(db, hook)
        assert stored.startswith(f"v1:{standard.load_box(settings()).key_id}:")
        assert secret not in stored and secret.removeprefix("whsec_") not in stored
        assert stored != stored_secret(db, endpoint(db, acme, "http://127.0.0.1:9/b", secret=secret)[0])  # a new nonce
        publish(db, acme)
        assert deliver(db, settings())["delivered"] == 1
    assert [g["valid"] for g in receiver.got] == [True]
    attempt = webhooks.Attempt(1, 1, receiver.url, acme.tenant_id, stored, "msg_1", "{}")
    assert stored not in repr(attempt)  # an attempt never prints the secret, not even encrypted


def test_the_secret_box_refuses_what_it_cannot_open(tmp_path):
    box = standard.load_box(settings())
    sealed = box.seal("whsec_" + base64.b64encode(b"k" * 32).decode(), 1)
    assert box.open(sealed, 1).startswith("whsec_")
    other = tmp_path / "other-key"
    other.write_text(standard.new_key_text())
    i = len(sealed) - 10
    altered = sealed[:i] + ("B" if sealed[i] == "A" else "A") + sealed[i + 1:]
    for stored, tenant_id, why in ((sealed, 2, "another tenant"),  # moved to another tenant's endpoint
                                   (altered, 1, "altered"),
                                   ("whsec_" + base64.b64encode(b"k" * 32).decode(), 1, "unlearnd migrate"),
                                   ("v9:abc:def", 1, "not in a form")):
        with pytest.raises(standard.SecretKeyError, match=why):
            box.open(stored, tenant_id)
    with pytest.raises(standard.SecretKeyError) as e:
        standard.load_box(settings(webhook_encryption_key=other)).open(sealed, 1)
    assert box.key_id in str(e.value) and "UNLEARND_WEBHOOK_ENCRYPTION_KEY" in str(e.value)
    key_text = base64.b64encode(standard.key_bytes(settings())).decode()
    assert repr(box) == f"SecretBox(key_id={box.key_id})" and key_text not in repr(box)


def test_the_embedded_default_creates_its_key_once_and_a_configured_one_is_never_made(tmp_path, monkeypatch):
    monkeypatch.delenv("UNLEARND_WEBHOOK_ENCRYPTION_KEY")
    embedded = Settings(data_dir=tmp_path / "data")
    first = standard.load_box(embedded)
    path = tmp_path / "data" / "webhook-key"
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    assert standard.load_box(embedded).key_id == first.key_id  # read, not replaced
    missing = tmp_path / "elsewhere" / "key"
    with pytest.raises(standard.SecretKeyError, match="which does not exist"):
        standard.load_box(Settings(data_dir=tmp_path / "data", webhook_encryption_key=missing))
    assert not missing.exists()
    bad = tmp_path / "bad-key"
    bad.write_text("not a key\n")
    with pytest.raises(standard.SecretKeyError, match="is not a webhook key"):
        standard.load_box(Settings(webhook_encryption_key=bad))


@pytest.mark.parametrize("key", ["another", "missing"])
def test_a_worker_without_the_key_gives_the_message_up_saying_why(db, tmp_path, key):
    """Another key (the API and the worker were given different ones) or none at all: nothing is
    sent, the message is failed at once with the reason, and the run goes on (no crash, no retry)."""
    acme = tenant(db, "acme")
    with receiving(standard.new_secret(), []) as receiver:
        endpoint(db, acme, receiver.url, secret=receiver.secret)
        publish(db, acme)
        path = tmp_path / "worker-key"
        if key == "another":
            path.write_text(standard.new_key_text())
        worker = settings(webhook_encryption_key=path)
        assert deliver(db, worker) == {"sent": 1, "delivered": 0, "failed": 1}
        due_now(db)
        assert deliver(db, worker)["sent"] == 0
    assert receiver.got == []
    (row,) = rows(db)
    assert (row.status, row.attempts, row.last_status_code, row.next_attempt_at) == ("failed", 1, None, None)
    assert row.last_error.startswith("not sent: ")
    if key == "another":
        assert standard.load_box(worker).key_id in row.last_error and "encrypted under webhook key" in row.last_error
    else:
        assert "which does not exist" in row.last_error and not path.exists()


def test_a_rotated_secret_signs_the_next_attempts(db):
    acme = tenant(db, "acme")
    with receiving(standard.new_secret(), [500]) as receiver:
        hook, old = endpoint(db, acme, receiver.url, secret=receiver.secret)
        publish(db, acme)
        assert deliver(db, settings())["sent"] == 1  # signed with the old secret, answered 500
        with db.transaction() as s:  # no grace period: the old secret stops signing at once
            _, new = webhooks.rotate_secret(s, acme, hook, box=standard.load_box(settings()), grace_seconds=0)
        assert new != old and standard.load_box(settings()).open(stored_secret(db, hook), acme.tenant_id) == new
        receiver.secret = new
        due_now(db)
        assert deliver(db, settings())["delivered"] == 1  # the retry: the new secret
    assert [g["valid"] for g in receiver.got] == [True, True]  # each checked with the secret of its time
    assert not verify(old, receiver.got[1]["headers"], receiver.got[1]["body"])


# --------------------------------------------------------------------------- through the real pipeline


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_reports_its_events_and_they_arrive_signed(service, user_files):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from service.core.repo import transparency
    from service.core.signing import Signer
    from tests.worker.test_job_pipeline import NEGGRAD, Setup, random_rows
    from worker import pipeline

    s = Setup(service, user_files)
    caller = Caller(tenant_id=s.tenant_id, tenant="acme", key_prefix="test")
    secret = standard.new_secret()
    with receiving(secret, []) as receiver:
        hook, _ = endpoint(s.db, caller, receiver.url, standard.EVENT_TYPES, secret)
        request = s.request(random_rows(s.n_train, 4, seed=11))
        job = s.job([request], NEGGRAD)
        assert pipeline.run_job(s.ctx, job) == "succeeded"
        assert [r.event_type for r in rows(s.db)] == ["version.published", "job.finished"]
        transparency.sequence(s.db, Signer(Ed25519PrivateKey.generate()))  # records the completion: its message follows
        assert deliver(s.db, settings()) == {"sent": 3, "delivered": 3, "failed": 0}
    got = {json.loads(g["body"])["type"]: json.loads(g["body"])["data"] for g in receiver.got}
    assert all(g["valid"] for g in receiver.got) and len(receiver.got) == 3
    assert got["version.published"]["model_id"] == s.model_id and got["version.published"]["version"] == 2
    assert got["version.published"]["job_id"] == job
    assert (got["job.finished"]["job_id"], got["job.finished"]["status"], got["job.finished"]["kind"]) == (
        job, "succeeded", "deletion")
    completed = got["deletion_request.completed"]
    assert (completed["request_id"], completed["model_id"]) == (request, s.model_id)
    assert completed["subject_hash"] and completed["sample_ids_sha256"]
    assert {r.endpoint_id for r in rows(s.db)} == {hook}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_sends_a_message_as_soon_as_its_transaction_commits(tmp_path, db_url, webhook_key):
    """A real worker whose beat would not run the delivery task for an hour: the message goes out
    because the API's commit sent the task. The worker has the API's webhook key (it decrypts the
    secret the API encrypted)."""
    from tests.servicekit import make_settings, running_service, wait_for, worker_process

    settings = make_settings(tmp_path, db_url, webhook_allow_private=True)
    secret = standard.new_secret()
    with (receiving(secret, []) as receiver, running_service(settings) as service,
          worker_process(settings, tmp_path / "worker.log", beat=True, UNLEARND_WEBHOOK_INTERVAL_S="3600",
                         UNLEARND_WEBHOOK_ALLOW_PRIVATE="true", UNLEARND_WEBHOOK_ENCRYPTION_KEY=str(webhook_key)),
          service.client() as c):
        hook = c.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.finished"], "secret": secret}).json()
        queued = c.post(f"/v1/webhooks/{hook['id']}/test").json()
        log = wait_for(lambda: [d for d in c.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"]
                                if d["status"] == "delivered"], timeout=30, what="the test message delivered")
    assert [d["message_id"] for d in log] == [queued["message_id"]] and log[0]["attempts"] == 1
    (got,) = receiver.got
    assert got["valid"] and got["headers"]["webhook-id"] == queued["message_id"]
    assert json.loads(got["body"])["type"] == "webhook.test"


# --------------------------------------------------------------------------- rotation with a grace period


def signatures(got: dict) -> list[str]:
    return got["headers"]["webhook-signature"].split()


def verifies(secret: str, got: dict, signature: str | None = None) -> bool:
    """``verify`` over what the receiver got, or over one of its signatures alone."""
    headers = dict(got["headers"])
    if signature is not None:
        headers["webhook-signature"] = signature
    return verify(secret, headers, got["body"])


def rotate(db: Database, caller: Caller, hook: int, grace_seconds: int) -> str:
    with db.transaction() as s:
        return webhooks.rotate_secret(s, caller, hook, box=standard.load_box(settings()),
                                      grace_seconds=grace_seconds)[1]


def previous_secret(db: Database, hook: int) -> tuple[str | None, dt.datetime | None]:
    with db.session() as s:
        row = s.get(WebhookEndpoint, hook)
        return row.previous_encrypted_secret, row.previous_secret_expires_at


def test_sign_all_puts_each_signature_in_one_header():
    secrets = [standard.new_secret(), standard.new_secret()]
    header = standard.sign_all(secrets, "msg_1", 5, b"{}")
    assert header.split() == [standard.sign(s, "msg_1", 5, b"{}") for s in secrets]
    with pytest.raises(ValueError):
        standard.sign_all([], "msg_1", 5, b"{}")


def test_during_the_grace_period_the_old_and_the_new_secret_both_sign(db):
    """A receiver that knows only the old secret keeps accepting the retries of a message after a
    rotation, and one that has the new secret accepts them too: two signatures, the new one first.
    A second rotation during the grace period keeps only the secret it superseded."""
    acme = tenant(db, "acme")
    with receiving(standard.new_secret(), [500, 500, 500]) as receiver:  # knows the old secret only
        hook, old = endpoint(db, acme, receiver.url, secret=receiver.secret)
        publish(db, acme)
        assert deliver(db, settings())["sent"] == 1  # before the rotation: one signature
        new = rotate(db, acme, hook, 3600)
        due_now(db)
        deliver(db, settings())
        newer = rotate(db, acme, hook, 600)  # the second rotation, during the grace period
        due_now(db)
        deliver(db, settings())
        receiver.secret = newer
        due_now(db)
        assert deliver(db, settings())["delivered"] == 1
    before, during, second, last = receiver.got
    assert len(signatures(before)) == 1 and verifies(old, before)
    assert during["valid"]  # the receiver with the old secret only
    assert verifies(new, during)  # a receiver with the new one
    first, then = signatures(during)
    assert verifies(new, during, first) and not verifies(old, during, first)  # the new secret signs first
    assert verifies(old, during, then) and not verifies(new, during, then)
    assert {g["headers"]["webhook-id"] for g in receiver.got} == {before["headers"]["webhook-id"]}
    # after the second rotation: the newest secret and the one it superseded; the oldest no longer
    assert len(signatures(second)) == 2 and verifies(newer, second) and verifies(new, second)
    assert not verifies(old, second)
    assert last["valid"] and len(signatures(last)) == 2


def test_after_the_grace_period_only_the_new_secret_signs(db):
    acme = tenant(db, "acme")
    with receiving(standard.new_secret(), []) as receiver:
        hook, old = endpoint(db, acme, receiver.url, secret=receiver.secret)
        new = rotate(db, acme, hook, 3600)
        stored, ends = previous_secret(db, hook)
        assert stored is not None and 3590 <= (_aware(ends) - utcnow()).total_seconds() <= 3600
        with db.transaction() as s:  # the grace period is over
            s.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == hook)
                      .values(previous_secret_expires_at=utcnow() - dt.timedelta(seconds=1)))
        publish(db, acme)
        receiver.secret = new
        assert deliver(db, settings())["delivered"] == 1
    (got,) = receiver.got
    assert signatures(got) == [got["headers"]["webhook-signature"]] and got["valid"]
    assert not verifies(old, got)
    with db.session() as s:
        assert webhooks.render(s.get(WebhookEndpoint, hook))["previous_secret_expires_at"] is None
    assert webhooks.drop_expired_secrets(db, utcnow()) == 1  # the sweeper forgets it
    assert previous_secret(db, hook) == (None, None)
    assert webhooks.drop_expired_secrets(db, utcnow()) == 0


def test_a_rotation_without_grace_drops_the_old_secret_at_once(db):
    acme = tenant(db, "acme")
    with receiving(standard.new_secret(), []) as receiver:
        hook, old = endpoint(db, acme, receiver.url, secret=receiver.secret)
        rotate(db, acme, hook, 3600)
        receiver.secret = rotate(db, acme, hook, 0)  # also ends the grace period of the rotation before
        assert previous_secret(db, hook) == (None, None)
        publish(db, acme)
        assert deliver(db, settings())["delivered"] == 1
    (got,) = receiver.got
    assert len(signatures(got)) == 1 and got["valid"] and not verifies(old, got)


@pytest.mark.parametrize("grace", [-1, standard.MAX_GRACE_S + 1, 10**12, True, 1.5, "60", None])
def test_a_grace_period_out_of_range_is_refused_and_changes_nothing(db, grace):
    acme = tenant(db, "acme")
    hook, _ = endpoint(db, acme, "http://127.0.0.1:9/a")
    before = stored_secret(db, hook)
    with pytest.raises(Invalid) as e, db.transaction() as s:
        webhooks.rotate_secret(s, acme, hook, box=standard.load_box(settings()), grace_seconds=grace)
    assert e.value.field == "grace_seconds" and str(standard.MAX_GRACE_S) in str(e.value)
    assert stored_secret(db, hook) == before and previous_secret(db, hook) == (None, None)


def test_a_previous_secret_that_does_not_open_is_left_out(db, caplog):
    """A previous secret altered in the database: the current secret still signs, alone."""
    acme = tenant(db, "acme")
    with receiving(standard.new_secret(), []) as receiver:
        hook, _ = endpoint(db, acme, receiver.url, secret=receiver.secret)
        receiver.secret = rotate(db, acme, hook, 3600)
        with db.transaction() as s:
            s.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == hook)
                      .values(previous_encrypted_secret="v1:0000000000000000:AAAA"))
        publish(db, acme)
        assert deliver(db, settings())["delivered"] == 1
    (got,) = receiver.got
    assert len(signatures(got)) == 1 and got["valid"]
    assert "signed without the previous secret" in caplog.text


def test_a_secret_the_key_cannot_open_is_not_kept_for_a_grace_period(db, tmp_path):
    """Rotating mends an endpoint whose secret was encrypted under another key: that secret could
    not sign, so it is not kept, whatever the grace period."""
    acme = tenant(db, "acme")
    hook, _ = endpoint(db, acme, "http://127.0.0.1:9/a")
    other = tmp_path / "other-key"
    other.write_text(standard.new_key_text())
    with db.transaction() as s:
        row, new = webhooks.rotate_secret(s, acme, hook, box=standard.load_box(settings(webhook_encryption_key=other)),
                                          grace_seconds=3600)
        assert webhooks.render(row)["previous_secret_expires_at"] is None
    assert previous_secret(db, hook) == (None, None)
    assert standard.load_box(settings(webhook_encryption_key=other)).open(stored_secret(db, hook),
                                                                          acme.tenant_id) == new

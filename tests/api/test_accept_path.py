"""Accepting a deletion request, the hot path of the service (bench/service.py): authenticated in
the transaction that writes it, on one pooled connection, in a fixed number of SQL statements
whatever the number of samples or links."""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import Pool

from service.core.errors import Conflict
from service.core.models import ApiKey, AuditEntry, DeletionRequest, DeletionRequestSample, LogPending, utcnow
from service.core.repo import deletions
from tests.api.test_deletions_api import ID, Wakeups, _post, _ready_model
from tests.api.test_list_queries import statements
from tests.api.test_tenancy import assert_problem


@contextlib.contextmanager
def checkouts():
    """Counts the connections every pool of this process hands out meanwhile."""
    taken: list[int] = []

    def count(*_args):
        taken.append(1)

    event.listen(Pool, "checkout", count)
    try:
        yield taken
    finally:
        event.remove(Pool, "checkout", count)


def test_an_accepted_request_takes_one_connection_and_a_fixed_number_of_statements(service, user_files):
    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 1000, "max_wait_s": 3600}})
        assert _post(c, mid, [ID[0]]).status_code == 202  # warm: the key's use is recorded (at most every 5 min)
        seen = []
        for ids in ([ID[1]], ID[2:52], [ID[1], ID[52]]):  # one sample, 50, one of them linked to a pending request
            with statements() as sent, checkouts() as taken:
                r = _post(c, mid, ids)
            assert r.status_code == 202, r.text
            seen.append((len(sent), len(taken)))
        assert r.json()["linked_to"] and r.json()["n_new_samples"] == 1
    # the key with the model, its ready version, what is known of the samples and (PostgreSQL) the
    # model's batching backlog (one query); the request, its samples, its audit-log entry and that
    # entry's place in the sequencer's queue (one statement on PostgreSQL, four INSERTs on SQLite,
    # which has no data-modifying CTEs); on SQLite, after the commit, whether a batch is due (on
    # PostgreSQL only when the backlog says this request may complete one: 1 of 1000 does not).
    # SQLite also sends its BEGIN IMMEDIATE for both transactions.
    expected = 8 if service.settings.db_url.startswith("sqlite") else 2
    assert seen == [(expected, 1)] * 3, seen


def test_the_key_is_checked_before_the_model_is_looked_up(service, user_files):
    """The key is read with the model in one query: a missing, malformed, wrong or revoked key is
    still a 401 whatever the model (one of another tenant, none, an id out of range) and whatever
    the body; a valid key gets 404 for a model that is not its tenant's."""
    with service.client("acme") as acme, service.client("globex") as globex, service.client(None) as anonymous:
        mid = _ready_model(service, user_files, acme)
        theirs = _ready_model(service, user_files, globex, name="theirs")
        key = service.key("acme")
        prefix = key.split("_")[1]
        body = {"sample_ids": [ID[0]], "reason": "erasure"}
        malformed = ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer ulk_nope"})
        wrong = ({"Authorization": f"Bearer {key[:-4]}AAAA"},  # the prefix of a key, not its secret
                 {"Authorization": f"Bearer ulk_{prefix}0_{key.split('_', 2)[2]}"})  # no key has this prefix
        for model in (mid, theirs, 999_999, 2**40):
            url = f"/v1/models/{model}/deletion-requests"
            for headers, sent in ([(h, b) for h in malformed for b in (body, {"sample_ids": "not a list"})]
                                  + [(h, body) for h in wrong]):
                r = anonymous.post(url, json=sent, headers=headers)
                assert_problem(r, 401, "Authorization")
                assert r.headers["www-authenticate"].startswith("Bearer")
        for model in (theirs, 999_999, 0, 2**40):
            assert_problem(acme.post(f"/v1/models/{model}/deletion-requests", json=body), 404)
        assert acme.post(f"/v1/models/{mid}/deletion-requests", json=body).status_code == 202
        with service.db.transaction() as s:
            s.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(revoked_at=utcnow()))
        assert_problem(acme.post(f"/v1/models/{mid}/deletion-requests", json=body), 401, "Authorization")
        with service.db.session() as s:  # nothing was written for the refused requests
            assert s.scalar(select(func.count()).select_from(DeletionRequest)) == 1


def test_the_request_its_samples_and_its_audit_entry_are_written_together(service, user_files):
    """On PostgreSQL in one statement, on SQLite in four: the same rows either way, the entry queued
    for the sequencer, and the key's use recorded."""
    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 1000, "max_wait_s": 3600}})
        first = _post(c, mid, [ID[3], ID[4]], subject_ref="subject-1").json()
        second = _post(c, mid, [ID[4], ID[5], ID[4]]).json()  # one sample pending in the first, one repeated
    prefix = service.key().split("_")[1]
    with service.db.session() as s:
        assert s.scalar(select(ApiKey.last_used_at).where(ApiKey.prefix == prefix)) is not None
        rows = {rid: sorted(s.execute(select(DeletionRequestSample.sample_id, DeletionRequestSample.linked_request_id)
                                      .where(DeletionRequestSample.request_id == rid)).all())
                for rid in (first["id"], second["id"])}
        assert rows[first["id"]] == sorted([(ID[3], None), (ID[4], None)])
        assert rows[second["id"]] == sorted([(ID[4], first["id"]), (ID[5], None)])
        stored = s.get(DeletionRequest, second["id"])
        assert (stored.n_samples, stored.status, stored.tenant_id) == (2, "received", stored.tenant_id)
        entries = {e.resource: e for e in s.scalars(select(AuditEntry).where(
            AuditEntry.action == "deletion_request.received"))}
        assert set(entries) == {f"deletion_request:{first['id']}", f"deletion_request:{second['id']}"}
        one, two = entries[f"deletion_request:{first['id']}"], entries[f"deletion_request:{second['id']}"]
        assert one.details == {"model_id": mid, "reason": "erasure", "subject_hash": first["subject_hash"],
                               "n_samples": 2, "n_new": 2, "linked_to": []}
        assert two.details == {"model_id": mid, "reason": "erasure", "subject_hash": None, "n_samples": 2,
                               "n_new": 1, "linked_to": [first["id"]]}
        assert one.actor == two.actor == f"key:{prefix}" and one.tenant_id == stored.tenant_id
        queued = set(s.scalars(select(LogPending.entry_id).where(LogPending.tenant_id == stored.tenant_id)))
        assert {one.id, two.id} <= queued
    assert (first["n_new_samples"], second["n_new_samples"], second["linked_to"]) == (2, 1, [first["id"]])


def test_a_key_committed_meanwhile_is_409_and_other_integrity_errors_are_not(service, user_files):
    """The unique (tenant, Idempotency-Key) index refuses a request whose key another process
    committed after this one looked (409, retry for the answer); any other integrity error is not
    mistaken for it."""
    with service.client() as c:
        mid = _ready_model(service, user_files, c)
        assert _post(c, mid, [ID[6]], key="k-taken").status_code == 202
    key = service.key()
    prefix = key.split("_")[1]
    with service.db.transaction() as s:
        caller, target = deletions.caller_and_target(s, key, prefix, mid, [ID[7]])
    args = {"sample_ids": [ID[7]], "reason": "erasure", "subject_ref": None, "fp": "x"}
    with pytest.raises(Conflict) as refused, service.db.transaction() as s:
        deletions.create(s, caller, target, idempotency_key="k-taken", **args)
    assert refused.value.kind == "idempotency-key-in-flight"
    row = target.rows[ID[7]]
    target.pending[row] = 10**9  # a link to a request that does not exist: a foreign key error, not a 409
    with pytest.raises(IntegrityError), service.db.transaction() as s:
        deletions.create(s, caller, target, idempotency_key="k-new", **args)
    with service.db.session() as s:
        assert s.scalar(select(func.count()).select_from(DeletionRequest)) == 1


def test_whether_a_batch_is_due_is_read_without_counting_the_backlog(service, user_files):
    """``batching.maybe_due`` bounds the number of received requests by their ids (one statement
    whatever the backlog) and counts those with new samples, at most ``max_requests`` of them, only
    when that bound, their age or a flush says a batch may be due; a model with an active job is
    never due (its end claims what waits)."""
    from service.core import batching
    from service.core.models import Job

    def look() -> tuple[bool, int]:
        with service.db.session() as s, statements() as sent:
            due = batching.maybe_due(s, mid)
        return due, sum(1 for q in sent if q.lstrip().upper().startswith("SELECT"))  # SQLite adds its BEGIN

    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 4, "max_wait_s": 3600}})
        assert look() == (False, 1)  # nothing received
        first = _post(c, mid, [ID[1]]).json()
        for i in (2, 3):
            _post(c, mid, [ID[i]])
        assert look() == (False, 1)  # 3 of 4 by their ids: not due, nothing counted
        _post(c, mid, [ID[1]])  # a fourth request, its one sample linked to the first: nothing new
        assert look() == (False, 2)  # the ids say 4, the count of those with new samples 3
        # another model's requests between them widen the bound, not the count
        other = _ready_model(service, user_files, c, name="other",
                             policy={"batching": {"max_requests": 100, "max_wait_s": 3600}})
        for i in range(4, 8):
            _post(c, other, [ID[i]])
        assert look() == (False, 2)
        with service.db.transaction() as s:  # the answer to the last request of `mid` claimed no batch
            assert s.scalar(select(func.count()).select_from(Job).where(Job.model_id == mid)) == 0
        r = _post(c, mid, [ID[9]])  # the fourth with a new sample: due, claimed by the accept path itself
        assert r.status_code == 202 and r.json()["status"] == "batched", r.text
        assert c.get(first["links"]["self"]).json()["status"] == "batched"
        for i in (10, 11, 12, 13):  # a job is active: four more received are not due until it ends
            _post(c, mid, [ID[i]])
        assert look() == (False, 1)
        with service.db.transaction() as s:
            s.execute(update(Job).where(Job.model_id == mid).values(status="succeeded"))
        assert look() == (True, 2)


def test_the_api_plans_its_prepared_statements_once_on_postgresql(tmp_path, postgres_admin):
    """The API's engine asks PostgreSQL for generic plans (service/core/db.py GENERIC_PLANS): a
    prepared statement is planned once per connection, not on every call; other processes keep the
    server's default. A statement the API runs only now and then is never prepared by psycopg, and
    is planned with its values as before."""
    from sqlalchemy import text

    from service.api.app import create_app
    from service.core.db import Database
    from tests.servicekit import fresh_postgres, make_settings

    with fresh_postgres(postgres_admin) as url:
        app = create_app(make_settings(tmp_path, url))
        plain = Database(url)
        try:
            for db, mode in ((app.state.ctx.db, "force_generic_plan"), (plain, "auto")):
                with db.engine.connect() as conn:
                    assert conn.execute(text("SHOW plan_cache_mode")).scalar() == mode
        finally:
            app.state.ctx.db.engine.dispose()
            plain.engine.dispose()


def test_a_driver_statement_fails_as_sqlalchemy_would(postgres_admin):
    """The accept path's statements run on psycopg directly (service/core/db.py DriverStatement): their
    rows are named as the statement's columns, in a session as on a connection; a constraint broken
    is SQLAlchemy's IntegrityError (the accept path tells a reused Idempotency-Key by it), and a
    connection the server dropped is SQLAlchemy's OperationalError (the API's 503) and is
    invalidated, so that the pool never hands it out again."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from service.core.db import Database, DriverStatement
    from tests.servicekit import fresh_postgres

    insert = DriverStatement(text("INSERT INTO t (k) VALUES (:k) RETURNING k AS key, 100 % 7 AS rest"))
    with fresh_postgres(postgres_admin) as url:
        db = Database(url)
        try:
            with db.engine.begin() as conn:
                conn.execute(text("CREATE TABLE t (k integer PRIMARY KEY)"))
            with db.connect() as conn:
                auto = db.autocommit(conn)
                assert [tuple(r) for r in insert.rows(auto, {"k": 1})] == [(1, 2)]
                assert insert.rows(auto, {"k": 2})[0].key == 2
                with pytest.raises(IntegrityError) as caught:
                    insert.rows(auto, {"k": 1})
                assert caught.value.orig.sqlstate == "23505"
                assert insert.rows(auto, {"k": 3})[0].key == 3  # still usable: autocommit, nothing to roll back
            with db.transaction() as session:
                assert insert.rows(session, {"k": 4})[0].rest == 2
            with db.connect() as conn:
                auto = db.autocommit(conn)
                pid = auto.execute(text("SELECT pg_backend_pid()")).scalar()
                with db.engine.connect() as other:
                    other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                with pytest.raises(OperationalError) as caught:
                    insert.rows(auto, {"k": 5})
                assert caught.value.connection_invalidated and conn.invalidated
            with db.engine.connect() as conn:
                assert conn.execute(text("SELECT array_agg(k ORDER BY k) FROM t")).scalar() == [1, 2, 3, 4]
        finally:
            db.dispose()


def test_two_requests_that_complete_a_batch_at_once_are_claimed_by_the_sweeper(service, user_files):
    """Each of two requests read the model's backlog before the other was written (they arrived at
    the same instant): neither saw a batch complete, so neither looked again after its commit
    (batching.may_complete_a_batch); the batch is due all the same and the sweeper's claim takes it."""
    from service.core import batching
    from service.core.models import Job

    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 2, "max_wait_s": 3600}})
    key = service.key()
    prefix = key.split("_")[1]
    with service.db.session() as s:
        seen = [deletions.caller_and_target(s, key, prefix, mid, [sample]) for sample in (ID[1], ID[2])]
    with service.db.transaction() as s:
        for (caller, target), sample in zip(seen, (ID[1], ID[2]), strict=True):
            deletions.create(s, caller, target, sample_ids=[sample], reason="erasure", subject_ref=None,
                             idempotency_key=None, fp=sample)
    with service.db.session() as s:
        assert batching.maybe_due(s, mid)  # two of two received
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    if service.settings.db_url.startswith("sqlite"):  # no backlog read with the key: SQLite always looks
        assert all(t.backlog is None and batching.may_complete_a_batch(t.backlog) for _, t in seen)
    else:
        assert [batching.may_complete_a_batch(t.backlog) for _, t in seen] == [False, False]
    with service.db.session() as s:
        assert batching.models_with_pending(s) == [mid]  # what the sweeper claims from
    wakeups = Wakeups()
    job = batching.claim_and_dispatch(service.db, wakeups, mid)
    assert job is not None and job.n_requests == 2 and wakeups.sent == [("unlearnd.run_job", job.id)]

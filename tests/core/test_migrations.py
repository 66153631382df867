"""Alembic is the only way the schema is made: the migrations build exactly the models' schema,
on SQLite and on PostgreSQL, and come back down cleanly."""

from __future__ import annotations

import json

from alembic import command
from sqlalchemy import create_engine, inspect

from service.core.migrate import alembic_config, current_revision, head_revision, upgrade
from service.core.models import Base


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_matches_the_models_and_downgrades(db_url):
    assert _tables(db_url) == set()
    upgrade(db_url)
    assert _tables(db_url) == set(Base.metadata.tables) | {"alembic_version"}
    engine = create_engine(db_url)
    assert current_revision(engine) == head_revision(db_url)
    engine.dispose()
    command.check(alembic_config(db_url))  # raises if the models and the migrations disagree
    upgrade(db_url)  # idempotent
    command.downgrade(alembic_config(db_url), "base")
    assert _tables(db_url) == {"alembic_version"}


def test_0003_gives_existing_models_policy_revision_1(db_url):
    """Models registered before policy revisions get revision 1 = their policy (pinned when it names a
    plain method); jobs become deletions."""
    from sqlalchemy import text

    from service.core.migrate import upgrade as up

    up(db_url, "0002")
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES (1, 't', CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO datasets (id, tenant_id, name, sha256, size_bytes, num_classes, "
                              "input_shape, dtype, n_train, n_test, n_holdout, created_at) VALUES (1, 1, 'd', 'x', 1, "
                              "2, '[1]', 'uint8', 10, 2, 0, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO models (id, tenant_id, name, dataset_id, architecture, policy, created_at) "
                              "VALUES (1, 1, 'm', 1, '{}', '{\"method\": \"scrub\"}', CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO jobs (id, tenant_id, model_id, status, progress, policy, "
                              "cancel_requested, attempts, created_at) VALUES (1, 1, 1, 'succeeded', 1.0, '{}', "
                              "false, 1, CURRENT_TIMESTAMP)"))
        up(db_url)
        with engine.connect() as conn:
            rev = conn.execute(text("SELECT model_id, revision, source, job_id, applied, policy "
                                    "FROM policy_revisions")).one()
            assert tuple(rev[:5]) == (1, 1, "registration", None, True)
            assert (rev[5] if isinstance(rev[5], dict) else json.loads(rev[5])) == {"method": "scrub"}
            assert tuple(conn.execute(text("SELECT policy_revision, policy_pinned, recipe FROM models")).one()) == (
                1, True, None)
            assert conn.execute(text("SELECT kind FROM jobs")).scalar() == "deletion"
    finally:
        engine.dispose()
    command.downgrade(alembic_config(db_url), "0002")


def test_0006_carries_the_hash_chain_into_the_transparency_log(db_url):
    """The chain's entries become the first leaves in their order, followed by one entry that records
    the chain's last hash; downgrading gives back the same chain, hash for hash."""
    import datetime as dt
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from sqlalchemy import text

    from service.core.db import Database
    from service.core.migrate import upgrade as up
    from service.core.repo import transparency
    from service.core.signing import Signer

    def chained(prev: str, tenant_id: int, created_at: dt.datetime, action: str, details: dict) -> str:
        body = json.dumps({"tenant_id": tenant_id, "created_at": created_at.isoformat(timespec="microseconds"),
                           "actor": "a", "action": action, "resource": "r", "details": details},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256((prev + body).encode()).hexdigest()

    up(db_url, "0005")
    engine = create_engine(db_url)
    chain: dict[int, list[tuple[str, str]]] = {1: [], 2: []}
    try:
        with engine.begin() as conn:
            for t in (1, 2):
                conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES (:t, :n, CURRENT_TIMESTAMP)"),
                             {"t": t, "n": f"t{t}"})
            for i, t in enumerate((1, 2, 1, 1, 2)):
                ts = dt.datetime(2026, 11, 1, 12, 0, i, 1000 * i)
                prev = chain[t][-1][1] if chain[t] else "0" * 64
                h = chained(prev, t, ts, f"act{i}", {"i": i})
                conn.execute(text("INSERT INTO audit_log (tenant_id, created_at, actor, action, resource, details, "
                                  "prev_hash, hash) VALUES (:t, :ts, 'a', :act, 'r', :d, :p, :h)"),
                             {"t": t, "ts": ts, "act": f"act{i}", "d": json.dumps({"i": i}), "p": prev, "h": h})
                chain[t].append((prev, h))
        up(db_url)
        db = Database(db_url)
        try:
            transparency.sequence(db, Signer(Ed25519PrivateKey.generate()))
            with db.session() as s:
                for t, actions in ((1, ["act0", "act2", "act3"]), (2, ["act1", "act4"])):
                    head = transparency.tree_head(s, t)
                    assert head["tree_size"] == len(actions) + 1
                    entries = sorted((transparency.inclusion_proof(s, t, e) for e in s.scalars(
                        text("SELECT id FROM audit_log WHERE tenant_id = :t").bindparams(t=t))),
                        key=lambda p: p["leaf_index"])
                    assert [p["entry"]["action"] for p in entries] == actions + ["audit_log.migrated"]
                    migrated = entries[-1]["entry"]["details"]
                    assert (migrated["entries"], migrated["chain_head"]) == (len(actions), chain[t][-1][1])
        finally:
            db.dispose()
        command.downgrade(alembic_config(db_url), "0005")
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT tenant_id, action, prev_hash, hash FROM audit_log ORDER BY id")).all()
        for t in (1, 2):
            assert [(r.prev_hash, r.hash) for r in rows if r.tenant_id == t][:len(chain[t])] == chain[t]
        assert [r.action for r in rows][-2:] == ["audit_log.migrated"] * 2  # kept, and chained after
    finally:
        engine.dispose()


def _at_0009_with_clear_webhook_secrets(db_url: str) -> dict[int, tuple[int, str]]:
    """Two tenants' endpoints as 0008 stored them (secrets in clear), with deliveries; endpoint id →
    (tenant id, secret)."""
    import base64

    from sqlalchemy import text

    from service.core.migrate import upgrade as up

    up(db_url, "0009")
    secrets = {1: (1, "whsec_" + base64.b64encode(b"a" * 32).decode()),
               2: (2, "whsec_" + base64.b64encode(b"b" * 64).decode()),
               3: (1, "whsec_" + base64.b64encode(b"c" * 24).decode())}
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            for t in (1, 2):
                conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES (:t, :n, CURRENT_TIMESTAMP)"),
                             {"t": t, "n": f"t{t}"})
            for i, (t, secret) in secrets.items():
                conn.execute(text("INSERT INTO webhook_endpoints (id, tenant_id, url, secret, event_types, created_at) "
                                  "VALUES (:i, :t, 'https://hooks.example.com/h', :s, '[\"job.finished\"]', "
                                  "CURRENT_TIMESTAMP)"), {"i": i, "t": t, "s": secret})
                conn.execute(text("INSERT INTO webhook_deliveries (tenant_id, endpoint_id, message_id, event_type, "
                                  "body, status, attempts, created_at) VALUES (:t, :i, :m, 'job.finished', '{}', "
                                  "'pending', 0, CURRENT_TIMESTAMP)"), {"t": t, "i": i, "m": f"msg_{i}"})
    finally:
        engine.dispose()
    return secrets


def test_0010_encrypts_the_webhook_secrets_and_keeps_their_deliveries(db_url, tmp_path, monkeypatch):
    """The secrets in clear are encrypted under the deployment's webhook key (what the code opens),
    the deliveries stay (SQLite rebuilds the table), and downgrading gives the same secrets back."""
    from sqlalchemy import text

    from service.core import webhooks
    from service.core.migrate import upgrade as up
    from service.core.settings import Settings

    key = tmp_path / "webhook-key"
    key.write_text(webhooks.new_key_text())
    monkeypatch.setenv("UNLEARND_WEBHOOK_ENCRYPTION_KEY", str(key))
    secrets = _at_0009_with_clear_webhook_secrets(db_url)
    up(db_url)
    box = webhooks.load_box(Settings())
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = {i: (t, s) for i, t, s in conn.execute(text(
                "SELECT id, tenant_id, encrypted_secret FROM webhook_endpoints"))}
            assert conn.execute(text("SELECT endpoint_id, message_id FROM webhook_deliveries ORDER BY endpoint_id")
                                ).all() == [(i, f"msg_{i}") for i in secrets]
        assert set(stored) == set(secrets)
        for i, (t, secret) in secrets.items():
            assert stored[i][1].startswith(f"v1:{box.key_id}:") and secret[6:] not in stored[i][1]
            assert box.open(stored[i][1], t) == secret
        command.downgrade(alembic_config(db_url), "0009")
        with engine.connect() as conn:
            assert {i: (t, s) for i, t, s in conn.execute(text("SELECT id, tenant_id, secret FROM webhook_endpoints"))
                    } == secrets
            assert conn.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar() == len(secrets)
    finally:
        engine.dispose()


def test_0010_without_the_key_fails_clearly_and_changes_nothing(db_url, tmp_path, monkeypatch):
    """A configured key that does not exist: the upgrade stops before any change (never a new key
    that the API and the workers would not share)."""
    import pytest
    from sqlalchemy import text

    from service.core.migrate import upgrade as up

    missing = tmp_path / "no" / "webhook-key"
    monkeypatch.setenv("UNLEARND_WEBHOOK_ENCRYPTION_KEY", str(missing))
    secrets = _at_0009_with_clear_webhook_secrets(db_url)
    with pytest.raises(RuntimeError, match="webhook secrets cannot be encrypted.*which does not exist"):
        up(db_url)
    assert not missing.exists()
    engine = create_engine(db_url)
    try:
        assert current_revision(engine) == "0009"
        with engine.connect() as conn:
            assert {i: (t, s) for i, t, s in conn.execute(text("SELECT id, tenant_id, secret FROM webhook_endpoints"))
                    } == secrets
    finally:
        engine.dispose()


def test_0011_adds_the_previous_secret_and_drops_it_keeping_the_endpoints_and_deliveries(db_url, tmp_path,
                                                                                         monkeypatch):
    """Upgrading adds the two nullable columns (null for every endpoint); downgrading drops them,
    with the endpoints and their deliveries left as they were (SQLite rebuilds the table)."""
    import datetime as dt

    from sqlalchemy import text

    from service.core import webhooks
    from service.core.migrate import upgrade as up

    key = tmp_path / "webhook-key"
    key.write_text(webhooks.new_key_text())
    monkeypatch.setenv("UNLEARND_WEBHOOK_ENCRYPTION_KEY", str(key))
    secrets = _at_0009_with_clear_webhook_secrets(db_url)
    up(db_url, "0010")
    engine = create_engine(db_url)

    def columns() -> set[str]:
        return {c["name"] for c in inspect(engine).get_columns("webhook_endpoints")}

    def endpoints() -> list:
        with engine.connect() as conn:
            return conn.execute(text("SELECT id, tenant_id, encrypted_secret FROM webhook_endpoints ORDER BY id")).all()

    try:
        assert not columns() & {"previous_encrypted_secret", "previous_secret_expires_at"}
        before = endpoints()
        up(db_url, "0011")
        assert {"previous_encrypted_secret", "previous_secret_expires_at"} <= columns()
        with engine.begin() as conn:
            assert conn.execute(text("SELECT previous_encrypted_secret, previous_secret_expires_at "
                                     "FROM webhook_endpoints")).all() == [(None, None)] * len(secrets)
            conn.execute(text("UPDATE webhook_endpoints SET previous_encrypted_secret = encrypted_secret, "
                              "previous_secret_expires_at = :t WHERE id = 1"),
                         {"t": dt.datetime(2026, 12, 2, tzinfo=dt.UTC)})
        assert endpoints() == before
        command.downgrade(alembic_config(db_url), "0010")
        assert not columns() & {"previous_encrypted_secret", "previous_secret_expires_at"}
        assert endpoints() == before
        with engine.connect() as conn:
            assert conn.execute(text("SELECT endpoint_id, message_id FROM webhook_deliveries ORDER BY endpoint_id")
                                ).all() == [(i, f"msg_{i}") for i in secrets]
    finally:
        engine.dispose()

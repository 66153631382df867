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

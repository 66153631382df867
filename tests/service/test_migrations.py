"""Alembic is the only way the schema is made: the migrations build exactly the models' schema,
on SQLite and on PostgreSQL, and come back down cleanly."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, inspect

from service.migrate import alembic_config, current_revision, head_revision, upgrade
from service.models import Base


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

"""Small helpers shared by the repositories."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from service.core.db import is_postgres
from service.core.models import RetiredId


def iso(ts: dt.datetime | None) -> str | None:
    """RFC 3339 in UTC. SQLite hands back naive datetimes: they were written in UTC."""
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def aware(ts: dt.datetime) -> dt.datetime:
    """A timestamp read back from the database, in UTC (SQLite hands back naive ones)."""
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


def retire(session: Session, table_name: str, ids: list[int]) -> None:
    """Keep deleted ids of ``table_name`` from being given to new rows (SQLite; ``RetiredId``). The
    caller deletes under a write lock (SQLite has one writer)."""
    if not ids or is_postgres(session):
        return
    row = session.get(RetiredId, table_name)
    if row is None:
        session.add(RetiredId(table_name=table_name, max_id=max(ids)))
    elif row.max_id < max(ids):
        row.max_id = max(ids)

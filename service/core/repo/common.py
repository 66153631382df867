"""Small helpers shared by the repositories."""

from __future__ import annotations

import datetime as dt


def iso(ts: dt.datetime | None) -> str | None:
    """RFC 3339 in UTC. SQLite hands back naive datetimes: they were written in UTC."""
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")

"""The audit log: every action of a tenant, appended to its transparency log (docs/transparency.md).

An append is two INSERTs in the caller's transaction (the entry, and its place in the sequencer's
queue) and takes no lock: writers of a tenant no longer wait for each other. The sequencer
(service/core/repo/transparency.py) later gives each entry its leaf in the tenant's Merkle tree and
signs a tree head. The database refuses UPDATE and DELETE on the table (triggers in the initial
migration). Subject references are stored only as hashes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import AuditEntry, LogLeaf, LogPending, utcnow
from service.core.repo import webhooks

INSERT_ENTRY = AuditEntry.__table__.insert().returning(AuditEntry.__table__.c.id)
INSERT_PENDING = LogPending.__table__.insert()


def record(session: Session, tenant_id: int, actor: str, action: str, resource: str,
           details: dict[str, Any] | None = None) -> AuditEntry:
    """Append one entry in the caller's transaction (after what the session has pending: an entry
    follows the changes it records). The entry returned is as stored, not in the session."""
    session.flush()
    values = {"tenant_id": tenant_id, "created_at": utcnow(), "actor": actor, "action": action,
              "resource": resource, "details": json.loads(json.dumps(details or {}, default=str))}
    entry = AuditEntry(id=session.execute(INSERT_ENTRY, values).scalar_one(), **values)
    session.execute(INSERT_PENDING, {"entry_id": entry.id, "tenant_id": tenant_id})
    webhooks.emit_for_entry(session, entry)  # the event's webhook messages, in the same transaction
    return entry


def timestamp(ts: dt.datetime) -> str:
    """RFC 3339 in UTC with microseconds, always the same length (SQLite hands back naive UTC)."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(dt.UTC).replace(tzinfo=None)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def document(e: AuditEntry) -> dict:
    """The entry as its leaf commits to it: the leaf is SHA-256(0x00 || canonical JSON of this)."""
    return {"id": e.id, "tenant_id": e.tenant_id, "created_at": timestamp(e.created_at), "actor": e.actor,
            "action": e.action, "resource": e.resource, "details": e.details}


def render_page(session: Session, entries: Sequence[AuditEntry]) -> list[dict]:
    """Entries as the API lists them, with their leaf index (null until sequenced): one query a page."""
    ids = [e.id for e in entries]
    leaves = {entry_id: index for entry_id, index in session.execute(
        select(LogLeaf.entry_id, LogLeaf.leaf_index).where(LogLeaf.entry_id.in_(ids)))} if ids else {}
    return [{**document(e), "leaf_index": leaves.get(e.id)} for e in entries]

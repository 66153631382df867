"""The append-only audit log, hash-chained per tenant (tamper evidence for erasure records).

Each entry's hash is sha256 over the previous entry's hash and the entry's canonical JSON; the
database refuses UPDATE and DELETE on the table (triggers in the initial migration). Appends of
one tenant are serialized by an advisory lock (PostgreSQL) or by SQLite's single writer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.core.db import is_postgres
from service.core.models import AuditEntry, utcnow
from service.core.repo.common import iso

GENESIS = "0" * 64
AUDIT_LOCK_BASE = 0x61756474 << 32  # "audt": advisory-lock ids of the per-tenant chains


def _digest(prev: str, tenant_id: int, created_at: str, actor: str, action: str, resource: str,
            details: dict) -> str:
    body = json.dumps({"tenant_id": tenant_id, "created_at": created_at, "actor": actor, "action": action,
                       "resource": resource, "details": details}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + body).encode()).hexdigest()


def _iso(ts: dt.datetime) -> str:
    if ts.tzinfo is not None:
        ts = ts.astimezone(dt.UTC).replace(tzinfo=None)
    return ts.isoformat(timespec="microseconds")


def record(session: Session, tenant_id: int, actor: str, action: str, resource: str,
           details: dict[str, Any] | None = None) -> AuditEntry:
    """Append one entry in the caller's transaction."""
    if is_postgres(session):
        # An advisory lock, not a row lock on the tenant: the inserts before this one already hold
        # a key-share lock on that row (foreign keys), and upgrading it would deadlock two writers.
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK_BASE + tenant_id})
    prev = session.scalar(select(AuditEntry.hash).where(AuditEntry.tenant_id == tenant_id)
                          .order_by(AuditEntry.id.desc()).limit(1)) or GENESIS
    details = json.loads(json.dumps(details or {}, default=str))
    now = utcnow()
    entry = AuditEntry(tenant_id=tenant_id, created_at=now, actor=actor, action=action, resource=resource,
                       details=details, prev_hash=prev,
                       hash=_digest(prev, tenant_id, _iso(now), actor, action, resource, details))
    session.add(entry)
    session.flush()
    return entry


def verify(session: Session, tenant_id: int) -> tuple[bool, int | None]:
    """Walk the tenant's chain; return (intact, id of the first bad entry)."""
    prev = GENESIS
    for e in session.scalars(select(AuditEntry).where(AuditEntry.tenant_id == tenant_id).order_by(AuditEntry.id)):
        if e.prev_hash != prev or e.hash != _digest(prev, e.tenant_id, _iso(e.created_at), e.actor, e.action,
                                                   e.resource, e.details):
            return False, e.id
        prev = e.hash
    return True, None


def render(e: AuditEntry) -> dict:
    return {"id": e.id, "created_at": iso(e.created_at), "actor": e.actor, "action": e.action,
            "resource": e.resource, "details": e.details, "prev_hash": e.prev_hash, "hash": e.hash}

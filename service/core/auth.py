"""Bearer API keys: ``ulk_<prefix>_<secret>``. Only the key's sha256 is stored; the prefix finds
the row. The key is random (192 bits), so a fast hash is enough (no password stretching needed)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session

from service.core.errors import Unauthorized
from service.core.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "ulk"


@dataclass(frozen=True)
class Caller:
    tenant_id: int
    tenant: str
    key_prefix: str

    @property
    def actor(self) -> str:
        return f"key:{self.key_prefix}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str, name: str | None = None) -> tuple[str, ApiKey]:
    """Create a key for ``tenant_name`` (creating the tenant on first use); return the key in clear
    (shown once) and its row."""
    tenant_name = tenant_name.strip()
    if not tenant_name or len(tenant_name) > 200:
        raise ValueError("tenant: a name of 1 to 200 characters is needed")
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(4)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(24)}"
    row = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key), name=name)
    session.add(row)
    session.flush()
    return key, row


# built once: SQLAlchemy caches their compiled form, and building them anew costs more than running them
_keys, _tenants = ApiKey.__table__, Tenant.__table__
# What :func:`caller_of` needs of a key, as columns of a query that selects from ``api_keys``
# joined with ``tenants`` (:data:`KEY`, and the accept path's query of the key and the model).
KEY_COLUMNS = (_keys.c.id.label("key_id"), _keys.c.tenant_id, _keys.c.key_hash, _keys.c.revoked_at,
               _keys.c.last_used_at, _tenants.c.name.label("tenant"))
KEY = (select(*KEY_COLUMNS).join(_tenants, _tenants.c.id == _keys.c.tenant_id)
       .where(_keys.c.prefix == bindparam("prefix")))
USED = _keys.update().where(_keys.c.id == bindparam("key_id"))


def _unauthorized(detail: str) -> Unauthorized:
    return Unauthorized(detail, field="Authorization")


def bearer_key(authorization: str | None) -> tuple[str, str]:
    """The key of an ``Authorization: Bearer ulk_<prefix>_<secret>`` header and its prefix, or 401
    when the header is missing or malformed (no database needed to tell)."""
    if not authorization:
        raise _unauthorized("Authorization: a bearer API key is required ('Authorization: Bearer ulk_…')")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("Authorization: expected 'Bearer <key>'")
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != KEY_PREFIX:
        raise _unauthorized("Authorization: the API key is not valid")
    return key, parts[1]


def caller_of(session: Session | Connection, row, key: str, prefix: str) -> Caller:
    """The caller of ``key`` given its row as :data:`KEY` reads it (``None``: no key of that prefix),
    or 401 when there is none, it is revoked or the key does not match; in the caller's transaction,
    at most every 5 minutes a key, an UPDATE of its ``last_used_at``. For a route that reads the key
    in a query of its own (the accept path reads it with the model: service/core/repo/deletions.py)."""
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, hash_key(key)):
        raise _unauthorized("Authorization: the API key is not valid")
    now = utcnow()
    last = row.last_used_at
    if last is None or (now - (last if last.tzinfo else last.replace(tzinfo=now.tzinfo))).total_seconds() > 300:
        # coarse, so that reads do not all write
        session.execute(USED, {"key_id": row.key_id, "last_used_at": now})
    return Caller(tenant_id=row.tenant_id, tenant=row.tenant, key_prefix=prefix)


def authenticate(session: Session, authorization: str | None) -> Caller:
    """The caller of a valid, unrevoked key, in the caller's transaction: one query (and, at most
    every 5 minutes a key, an UPDATE of its ``last_used_at``)."""
    key, prefix = bearer_key(authorization)
    return caller_of(session, session.execute(KEY, {"prefix": prefix}).one_or_none(), key, prefix)

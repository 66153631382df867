"""Bearer API keys: ``ulk_<prefix>_<secret>``. Only the key's sha256 is stored; the prefix finds
the row. The key is random (192 bits), so a fast hash is enough (no password stretching needed)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
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


def _unauthorized(detail: str) -> Unauthorized:
    return Unauthorized(detail, field="Authorization")


def authenticate(session: Session, authorization: str | None) -> Caller:
    if not authorization:
        raise _unauthorized("Authorization: a bearer API key is required ('Authorization: Bearer ulk_…')")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("Authorization: expected 'Bearer <key>'")
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != KEY_PREFIX:
        raise _unauthorized("Authorization: the API key is not valid")
    row, tenant_name = session.execute(select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
                                       .where(ApiKey.prefix == parts[1])).one_or_none() or (None, None)
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, hash_key(key)):
        raise _unauthorized("Authorization: the API key is not valid")
    now = utcnow()
    last = row.last_used_at
    if last is None or (now - (last if last.tzinfo else last.replace(tzinfo=now.tzinfo))).total_seconds() > 300:
        row.last_used_at = now  # coarse, so that reads do not all write
    return Caller(tenant_id=row.tenant_id, tenant=tenant_name, key_prefix=row.prefix)

"""webhook secrets encrypted at rest: ``webhook_endpoints.secret`` (the secret in clear) becomes
``encrypted_secret``, the secret encrypted with AES-256-GCM under the deployment's webhook key
(``UNLEARND_WEBHOOK_ENCRYPTION_KEY``, or the embedded default's ``<data dir>/webhook-key``, created
here if there are secrets to encrypt and it does not exist yet; service/core/webhooks.py). The
column widens to hold the nonce, the tag and the key id. Downgrading decrypts them again (it needs
the same key).

The stored form is repeated here so that this migration stays fixed whatever the code becomes:
``v1:<key id>:<base64 of the 12-byte nonce and the ciphertext>``, the associated data naming the
endpoint's tenant.

On SQLite, changing the column rebuilds the table (batch mode), and dropping the old table deletes
its endpoints' deliveries (foreign keys are on, ON DELETE CASCADE): they are kept aside in a
temporary table and put back.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import base64
import hashlib
import os

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

CLEAR_PREFIX = "whsec_"
VERSION = "v1"
NONCE_BYTES = 12


def _aead():
    """The AES-GCM cipher of the deployment's key and the key's id (as service/core/webhooks.py names it)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from service.core.settings import Settings
    from service.core.webhooks import SecretKeyError, key_bytes

    try:
        key = key_bytes(Settings())
    except SecretKeyError as exc:
        raise RuntimeError(f"webhook secrets cannot be encrypted or decrypted: {exc}") from None
    return AESGCM(key), hashlib.sha256(b"unlearnd webhook key\0" + key).hexdigest()[:16]


def _bound_to(tenant_id: int) -> bytes:
    return f"unlearnd webhook secret, tenant {tenant_id}".encode()


def _rows(column: str) -> list:
    return list(op.get_bind().execute(sa.text(f"SELECT id, tenant_id, {column} FROM webhook_endpoints")))


def _rebuild(old: str, new: str, old_length: int, length: int) -> None:
    """Rename and resize the secret's column, keeping the deliveries on SQLite (see above)."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute("CREATE TEMPORARY TABLE _kept_webhook_deliveries AS SELECT * FROM webhook_deliveries")
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.alter_column(old, new_column_name=new, existing_type=sa.String(length=old_length),
                              type_=sa.String(length=length), existing_nullable=False)
    if sqlite:
        op.execute("INSERT INTO webhook_deliveries SELECT * FROM _kept_webhook_deliveries "
                   "WHERE id NOT IN (SELECT id FROM webhook_deliveries)")
        op.execute("DROP TABLE _kept_webhook_deliveries")


def upgrade() -> None:
    clear = [(i, t, s) for i, t, s in _rows("secret") if s.startswith(CLEAR_PREFIX)]
    # the key first: without it nothing changes (no key is needed when there is nothing to encrypt)
    aead, key_id = _aead() if clear else (None, None)
    _rebuild("secret", "encrypted_secret", 128, 512)
    for endpoint_id, tenant_id, secret in clear:
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + aead.encrypt(nonce, secret.encode(), _bound_to(tenant_id))
        op.get_bind().execute(sa.text("UPDATE webhook_endpoints SET encrypted_secret = :s WHERE id = :i"),
                              {"s": f"{VERSION}:{key_id}:{base64.b64encode(sealed).decode()}", "i": endpoint_id})


def downgrade() -> None:
    sealed = [(i, t, s) for i, t, s in _rows("encrypted_secret") if not s.startswith(CLEAR_PREFIX)]
    if sealed:
        aead, key_id = _aead()
        for endpoint_id, tenant_id, stored in sealed:
            version, stored_key_id, blob = stored.split(":", 2)
            if (version, stored_key_id) != (VERSION, key_id):
                raise RuntimeError(f"webhook endpoint {endpoint_id}'s secret is not encrypted under this deployment's "
                                   f"webhook key {key_id} (its key: {stored_key_id}); nothing was downgraded")
            raw = base64.b64decode(blob)
            secret = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _bound_to(tenant_id)).decode()
            op.get_bind().execute(sa.text("UPDATE webhook_endpoints SET encrypted_secret = :s WHERE id = :i"),
                                  {"s": secret, "i": endpoint_id})
    _rebuild("encrypted_secret", "secret", 512, 128)

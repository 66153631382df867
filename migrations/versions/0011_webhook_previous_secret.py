"""a grace period for webhook secret rotation: ``webhook_endpoints.previous_encrypted_secret``, the
secret a rotation superseded (encrypted as ``encrypted_secret`` is: AES-256-GCM under the
deployment's webhook key, bound to the tenant), which signs each message next to the new one
until ``previous_secret_expires_at``. Both are null when the endpoint has no previous secret, as
every endpoint has after this upgrade.

Downgrading drops them: a grace period under way ends at once (the new secret alone signs).

Adding a nullable column does not rebuild the table on SQLite; dropping one does (batch mode), and
dropping the old table deletes its endpoints' deliveries (foreign keys are on, ON DELETE CASCADE):
they are kept aside in a temporary table and put back, as in 0010.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

COLUMNS = ("previous_encrypted_secret", "previous_secret_expires_at")


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_encrypted_secret", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute("CREATE TEMPORARY TABLE _kept_webhook_deliveries AS SELECT * FROM webhook_deliveries")
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        for column in reversed(COLUMNS):
            batch_op.drop_column(column)
    if sqlite:
        op.execute("INSERT INTO webhook_deliveries SELECT * FROM _kept_webhook_deliveries "
                   "WHERE id NOT IN (SELECT id FROM webhook_deliveries)")
        op.execute("DROP TABLE _kept_webhook_deliveries")

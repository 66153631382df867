"""retention of superseded versions: a version whose samples were since erased is purged once the
model's ``retention.purge_after_days`` ran out (or on ``POST /v1/models/{id}/purge``): its
checkpoint and proxy cache entries leave the artifact store, and the row stays as a tombstone with
status ``purged``, its sha256, ``purged_at`` and ``purge_reason`` (service/core/repo/retention.py).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("purge_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("purge_reason")
        batch_op.drop_column("purged_at")

"""``dataset_samples.redacted_at``: when a sample's row was blanked in its dataset's file, once every
model of the dataset had forgotten it and no kept version held it (service/core/repo/redaction.py).
NULL for every existing sample: nothing was blanked before.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dataset_samples") as batch_op:
        batch_op.add_column(sa.Column("redacted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dataset_samples") as batch_op:
        batch_op.drop_column("redacted_at")

"""a remembered flush: ``POST /v1/models/{id}/flush`` while a job of the model is active sets
``models.flush_requested_at``; the claim that honours it (the next batch, claimed as soon as the
active job ends) clears it (service/core/batching.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("flush_requested_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("flush_requested_at")

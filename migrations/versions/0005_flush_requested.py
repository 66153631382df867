"""a remembered flush: ``POST /v1/models/{id}/flush`` while a job of the model is active sets
``models.flush_requested_at``; the claim that honours it (the next batch, claimed as soon as the
active job ends) clears it (service/core/batching.py). And ``retired_ids``: the highest id deleted
from models, datasets and jobs (models and datasets can be deleted from this revision on), which
SQLite would otherwise give to the next row (service/core/models.py ``RetiredId``).

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
    op.create_table("retired_ids",
                    sa.Column("table_name", sa.String(length=64), nullable=False),
                    sa.Column("max_id", sa.Integer(), nullable=False),
                    sa.PrimaryKeyConstraint("table_name", name=op.f("pk_retired_ids")))


def downgrade() -> None:
    op.drop_table("retired_ids")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("flush_requested_at")

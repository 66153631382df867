"""deletion pipeline columns: job sizes and dispatch time, request completion time, and the
request that made a sample forgotten.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("forgotten_samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_forgotten_samples_request_id_deletion_requests"), "deletion_requests", ["request_id"], ["id"]
        )

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("n_requests", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("n_forget", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_jobs_model_status", ["model_id", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_model_status")
        batch_op.drop_column("dispatched_at")
        batch_op.drop_column("n_forget")
        batch_op.drop_column("n_requests")

    with op.batch_alter_table("forgotten_samples", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_forgotten_samples_request_id_deletion_requests"), type_="foreignkey")
        batch_op.drop_column("request_id")

    with op.batch_alter_table("deletion_requests", schema=None) as batch_op:
        batch_op.drop_column("completed_at")

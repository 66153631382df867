"""the indexes of ``deletion_requests`` for the accept path: ``(model_id, status)`` becomes
``(model_id, status, id)``, so that whether a batch may be due is read from the ids of a model's
oldest and newest received requests (two index probes) instead of a count of every request it has
received (service/core/batching.py ``maybe_due``: that count grew with the backlog, 0.6 ms at
1,000 received requests). The index on ``tenant_id`` goes: the unique ``(tenant_id,
idempotency_key)`` constraint's index starts with it and serves the same look-ups, and each index
is one more write for every accepted request.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_requests") as batch_op:
        batch_op.create_index("ix_deletion_requests_model_status_id", ["model_id", "status", "id"], unique=False)
        batch_op.drop_index("ix_deletion_requests_model_status")
        batch_op.drop_index("ix_deletion_requests_tenant_id")


def downgrade() -> None:
    with op.batch_alter_table("deletion_requests") as batch_op:
        batch_op.create_index("ix_deletion_requests_tenant_id", ["tenant_id"], unique=False)
        batch_op.create_index("ix_deletion_requests_model_status", ["model_id", "status"], unique=False)
        batch_op.drop_index("ix_deletion_requests_model_status_id")

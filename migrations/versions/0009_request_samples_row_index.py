"""an index on ``deletion_request_samples.row``: a new deletion request looks up, by row, whether a
request still pending already names its samples (service/core/repo/deletions.py); without it that
lookup read every sample of every active request of the model, a cost that grew with the backlog.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deletion_request_samples_row", "deletion_request_samples", ["row"])


def downgrade() -> None:
    op.drop_index("ix_deletion_request_samples_row", table_name="deletion_request_samples")

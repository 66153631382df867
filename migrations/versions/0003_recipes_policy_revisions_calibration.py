"""recipes, policy revisions and calibration jobs: the model's training recipe, its current policy
revision and whether the user pinned it; the revisions table (revision 1 of every existing model
is its registered policy); job kinds (deletion | calibration), their parameters and the policy
revision a job ran with.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("policy_revision", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("policy_pinned", sa.Boolean(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("recipe", sa.JSON(), nullable=True))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="deletion"))
        batch_op.add_column(sa.Column("params", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("policy_revision", sa.Integer(), nullable=True))

    op.create_table(
        "policy_revisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_policy_revisions_job_id_jobs")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_policy_revisions_model_id_models"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_revisions")),
        sa.UniqueConstraint("model_id", "revision", name=op.f("uq_policy_revisions_model_id")),
    )
    with op.batch_alter_table("policy_revisions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_policy_revisions_model_id"), ["model_id"], unique=False)

    # Revision 1 of every model registered before: its policy as registered. A model whose policy
    # says how to unlearn (a plain method, hparams, RUM bins or cut points) is pinned
    # (service/core/policy.py, is_pinned: the rule is repeated here so that the migration stays fixed).
    op.execute(sa.text("INSERT INTO policy_revisions (model_id, revision, policy, source, applied, created_at) "
                       "SELECT id, 1, policy, 'registration', :applied, created_at FROM models")
               .bindparams(sa.bindparam("applied", True, type_=sa.Boolean())))
    models = sa.table("models", sa.column("id", sa.Integer()), sa.column("policy", sa.JSON()),
                      sa.column("policy_pinned", sa.Boolean()))
    conn = op.get_bind()
    for model_id, policy in conn.execute(sa.select(models.c.id, models.c.policy)).all():
        policy = policy if isinstance(policy, dict) else {}
        pinned = policy.get("method", "rum") != "rum" or any(
            policy.get(k) is not None for k in ("hparams", "bins", "quantiles", "thresholds"))
        if pinned:
            conn.execute(sa.update(models).where(models.c.id == model_id).values(policy_pinned=True))


def downgrade() -> None:
    with op.batch_alter_table("policy_revisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_policy_revisions_model_id"))
    op.drop_table("policy_revisions")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("policy_revision")
        batch_op.drop_column("params")
        batch_op.drop_column("kind")

    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("recipe")
        batch_op.drop_column("policy_pinned")
        batch_op.drop_column("policy_revision")

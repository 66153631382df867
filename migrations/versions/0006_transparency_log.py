"""the transparency log replaces the per-tenant hash chain: entries are appended without a lock and
queued (log_pending); the sequencer puts them into each tenant's Merkle tree (log_leaves, log_nodes)
and signs tree heads (tree_heads, with the public keys in signing_keys); erasure certificates of
completed deletion requests (erasure_certificates). The new tables are append-only like audit_log
(log_pending and erasure_certificates excepted: the sequencer's queue and its work list).

The existing chain is carried over: every entry is queued in id order, so the sequencer makes them
the first leaves in the order the chain had them, followed by one entry per tenant,
``audit_log.migrated``, that records the chain's last hash and length (the chain's own commitment,
now inside the tree). Then the chain's columns go. Downgrading recomputes the chain.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

APPEND_ONLY = ("audit_log", "log_leaves", "log_nodes", "tree_heads", "signing_keys")

audit_log = sa.table("audit_log", sa.column("id", sa.Integer), sa.column("tenant_id", sa.Integer),
                     sa.column("created_at", sa.DateTime(timezone=True)), sa.column("actor", sa.String),
                     sa.column("action", sa.String), sa.column("resource", sa.String),
                     sa.column("details", sa.JSON), sa.column("prev_hash", sa.String), sa.column("hash", sa.String))
log_pending = sa.table("log_pending", sa.column("entry_id", sa.Integer), sa.column("tenant_id", sa.Integer))


def upgrade() -> None:
    bind = op.get_bind()
    heads = {}
    per_tenant = sa.select(audit_log.c.tenant_id, sa.func.count(), sa.func.max(audit_log.c.id))
    for tenant_id, n, last_id in bind.execute(per_tenant.group_by(audit_log.c.tenant_id)).all():
        heads[tenant_id] = {"entries": n, "last_entry_id": last_id, "chain_head": bind.scalar(
            sa.select(audit_log.c.hash).where(audit_log.c.id == last_id))}

    _drop_append_only("audit_log")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_audit_log_hash"), type_="unique")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("hash")

    op.create_table(
        "signing_keys",
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("public_key_pem", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_signing_keys")),
    )
    op.create_table(
        "log_nodes",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_log_nodes_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "level", "idx", name=op.f("pk_log_nodes")),
    )
    op.create_table(
        "tree_heads",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("tree_size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["signing_keys.key_id"], name=op.f("fk_tree_heads_key_id_signing_keys")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_tree_heads_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "tree_size", name=op.f("pk_tree_heads")),
    )
    op.create_table(
        "log_leaves",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("leaf_index", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("entry_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["entry_id"], ["audit_log.id"], name=op.f("fk_log_leaves_entry_id_audit_log")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_log_leaves_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "leaf_index", name=op.f("pk_log_leaves")),
        sa.UniqueConstraint("entry_id", name=op.f("uq_log_leaves_entry_id")),
    )
    op.create_table(
        "log_pending",
        sa.Column("entry_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["entry_id"], ["audit_log.id"], name=op.f("fk_log_pending_entry_id_audit_log")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_log_pending_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("entry_id", name=op.f("pk_log_pending")),
    )
    with op.batch_alter_table("log_pending", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_log_pending_tenant_id"), ["tenant_id"], unique=False)
    op.create_table(
        "erasure_certificates",
        sa.Column("request_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("entry_id", sa.Integer(), nullable=False),
        sa.Column("certificate", sa.JSON(), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["entry_id"], ["audit_log.id"],
                                name=op.f("fk_erasure_certificates_entry_id_audit_log")),
        sa.ForeignKeyConstraint(["request_id"], ["deletion_requests.id"],
                                name=op.f("fk_erasure_certificates_request_id_deletion_requests"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_erasure_certificates_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_erasure_certificates")),
        sa.UniqueConstraint("entry_id", name=op.f("uq_erasure_certificates_entry_id")),
    )
    with op.batch_alter_table("erasure_certificates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_erasure_certificates_issued_at"), ["issued_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_erasure_certificates_tenant_id"), ["tenant_id"], unique=False)

    now = dt.datetime.now(dt.UTC)
    for tenant_id, head in sorted(heads.items()):
        bind.execute(audit_log.insert().values(tenant_id=tenant_id, created_at=now, actor="migration",
                                               action="audit_log.migrated", resource=f"tenant:{tenant_id}",
                                               details={"from": "sha256 hash chain (revision 0005)", **head}))
    bind.execute(log_pending.insert().from_select(["entry_id", "tenant_id"], sa.select(
        audit_log.c.id, audit_log.c.tenant_id).order_by(audit_log.c.id)))
    for table in APPEND_ONLY:
        _append_only(table)


def downgrade() -> None:
    for table in APPEND_ONLY:
        _drop_append_only(table)
    with op.batch_alter_table("erasure_certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_erasure_certificates_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_erasure_certificates_issued_at"))
    op.drop_table("erasure_certificates")
    with op.batch_alter_table("log_pending", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_log_pending_tenant_id"))
    op.drop_table("log_pending")
    op.drop_table("log_leaves")
    op.drop_table("tree_heads")
    op.drop_table("log_nodes")
    op.drop_table("signing_keys")

    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
    bind = op.get_bind()
    prev: dict[int, str] = {}
    rows = bind.execute(sa.select(audit_log.c.id, audit_log.c.tenant_id, audit_log.c.created_at, audit_log.c.actor,
                                  audit_log.c.action, audit_log.c.resource, audit_log.c.details)
                        .order_by(audit_log.c.id)).all()
    for row in rows:
        before = prev.get(row.tenant_id, "0" * 64)
        prev[row.tenant_id] = _chain_digest(before, row)
        bind.execute(audit_log.update().where(audit_log.c.id == row.id)
                     .values(prev_hash=before, hash=prev[row.tenant_id]))
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_audit_log_hash"), ["hash"])
    _append_only("audit_log")


def _chain_digest(prev: str, row) -> str:
    """The hash chain of revisions 0001 to 0005 (service/core/repo/audit.py as it was then)."""
    ts = row.created_at
    if ts.tzinfo is not None:
        ts = ts.astimezone(dt.UTC).replace(tzinfo=None)
    details = row.details if isinstance(row.details, dict) else json.loads(row.details)
    body = json.dumps({"tenant_id": row.tenant_id, "created_at": ts.isoformat(timespec="microseconds"),
                       "actor": row.actor, "action": row.action, "resource": row.resource, "details": details},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + body).encode()).hexdigest()


# Append-only at the database level: UPDATE and DELETE raise, whoever issues them. audit_log keeps
# the trigger names of revision 0001 (SQLite drops a table's triggers when a batch operation copies it).
def _append_only(table: str) -> None:
    if op.get_context().dialect.name == "postgresql":
        if table == "audit_log":
            op.execute("""CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
                          FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()""")
            return
        op.execute(f"""
            CREATE FUNCTION {table}_append_only() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION '{table} is append-only'; END; $$ LANGUAGE plpgsql""")
        op.execute(f"""CREATE TRIGGER {table}_no_update BEFORE UPDATE OR DELETE ON {table}
                       FOR EACH ROW EXECUTE FUNCTION {table}_append_only()""")
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"""CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table}
                           BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END""")


def _drop_append_only(table: str) -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update ON {table}")
        if table != "audit_log":
            op.execute(f"DROP FUNCTION IF EXISTS {table}_append_only()")
    else:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")

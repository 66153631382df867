"""Database models (SQLAlchemy 2). The schema itself is made by the Alembic migrations in
``migrations/``; a test checks that the two agree.

Every resource row carries ``tenant_id`` and every query filters on it (``service.core.repo``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.core.statuses import DeliveryStatus, JobStatus, RequestStatus, VersionStatus

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: DateTime(timezone=True)}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A bearer key. Only its sha256 is stored; ``prefix`` (shown to users) finds the row."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_classes: Mapped[int]
    input_shape: Mapped[list[Any]]
    dtype: Mapped[str] = mapped_column(String(16))
    n_train: Mapped[int]
    n_test: Mapped[int]
    n_holdout: Mapped[int] = mapped_column(default=0)
    mean: Mapped[list[Any] | None]
    std: Mapped[list[Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DatasetSample(Base):
    """One row per training sample: deletion requests name samples by ``sample_id``.
    ``redacted_at``: when the sample's row was blanked in the dataset file, once every model of the
    dataset had forgotten it and no kept version held it (service/core/repo/redaction.py)."""

    __tablename__ = "dataset_samples"
    __table_args__ = (UniqueConstraint("dataset_id", "sample_id"),)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    row: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sample_id: Mapped[str] = mapped_column(String(256))
    redacted_at: Mapped[dt.datetime | None]


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    architecture: Mapped[dict[str, Any]]
    policy: Mapped[dict[str, Any]]  # the current policy revision's policy (``policy_revisions``)
    # The number of the current policy revision, and whether the user pinned the unlearning part
    # (a calibration then records its revision without applying it; see service/core/policy.py).
    policy_revision: Mapped[int] = mapped_column(default=1, server_default="1")
    policy_pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # How the original was trained (worker/engine/recipe.py, ``Recipe.to_dict``); None: inferred.
    recipe: Mapped[dict[str, Any] | None]
    events_sha256: Mapped[str | None] = mapped_column(String(64))
    # A flush that found a job of the model active (migration 0005): the next batch is due as soon
    # as that job ends; the claim that honours it clears it (service/core/batching.py).
    flush_requested_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    dataset: Mapped[Dataset] = relationship(lazy="joined")


class PolicyRevision(Base):
    """One revision of a model's policy: 1 is what was registered; calibrations and users add more.
    ``models.policy_revision`` says which one is current."""

    __tablename__ = "policy_revisions"
    __table_args__ = (UniqueConstraint("model_id", "revision"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int]
    policy: Mapped[dict[str, Any]]
    source: Mapped[str] = mapped_column(String(16))  # registration | calibration | user
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    # calibration: scores on the search and check sets, the uncalibrated default on the check set, cost
    scores: Mapped[dict[str, Any] | None]
    applied: Mapped[bool] = mapped_column(Boolean, default=True)  # made current when it was created
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """An immutable version: ``pending`` until a worker validated it, then ``ready`` or ``invalid``;
    a ready version whose samples were since erased is ``purged`` once its retention ran out
    (service/core/repo/retention.py): the row stays as a tombstone, its checkpoint's blob goes."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.PENDING.value)
    status_reason: Mapped[str | None] = mapped_column(Text)
    parent_version: Mapped[int | None]
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    checkpoint_size: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[str | None] = mapped_column(String(64))
    config: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any] | None]
    seconds: Mapped[float | None] = mapped_column(Float)
    n_forgotten: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    dispatched_at: Mapped[dt.datetime | None]
    # the tombstone of a purged version (migration 0007): when, and why
    purged_at: Mapped[dt.datetime | None]
    purge_reason: Mapped[str | None] = mapped_column(Text)


class ModelAlias(Base):
    __tablename__ = "model_aliases"
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Job(Base):
    """One run on one model, ``queued → running → succeeded | failed | canceled``: a batched
    deletion job (``kind = deletion``) or a policy calibration (``kind = calibration``). At most
    one job of a model runs at a time (service/core/batching.py)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_model_status", "model_id", "status"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="deletion", server_default="deletion")
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # calibration: the request (settings, apply); deletion: None
    params: Mapped[dict[str, Any] | None]
    # the policy revision the job ran with (deletion) or started from (calibration)
    policy_revision: Mapped[int | None]
    base_version: Mapped[int | None]
    result_version: Mapped[int | None]
    policy: Mapped[dict[str, Any]]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[dict[str, Any] | None]
    timings: Mapped[dict[str, Any] | None]
    report_sha256: Mapped[str | None] = mapped_column(String(64))
    # the report page, rendered by the worker when the job published (migration 0004; none before it)
    report_html_sha256: Mapped[str | None] = mapped_column(String(64))
    n_requests: Mapped[int] = mapped_column(default=0, server_default="0")
    n_forget: Mapped[int] = mapped_column(default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[dt.datetime | None]
    dispatched_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]


class DeletionRequest(Base):
    """``received → batched → processing → completed | failed`` (service/core/statuses.py). The
    subject is stored only as a hash."""

    __tablename__ = "deletion_requests"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        # a model's requests by status, oldest first (batching.maybe_due reads the oldest and
        # newest received by it); the unique constraint above serves look-ups by tenant
        Index("ix_deletion_requests_model_status_id", "model_id", "status", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.RECEIVED.value)
    reason: Mapped[str] = mapped_column(String(32))
    subject_hash: Mapped[str | None] = mapped_column(String(64))
    n_samples: Mapped[int]
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    result_version: Mapped[int | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    completed_at: Mapped[dt.datetime | None]


class DeletionRequestSample(Base):
    """A sample named by a request; ``linked_request_id`` points at earlier work that already
    covers it (pending or forgotten), so it is not unlearned twice."""

    __tablename__ = "deletion_request_samples"
    __table_args__ = (Index("ix_deletion_request_samples_row", "row"),)  # dedupe of new requests by row
    request_id: Mapped[int] = mapped_column(ForeignKey("deletion_requests.id", ondelete="CASCADE"),
                                            primary_key=True)
    row: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sample_id: Mapped[str] = mapped_column(String(256))
    linked_request_id: Mapped[int | None] = mapped_column(ForeignKey("deletion_requests.id"))


class ForgottenSample(Base):
    """A sample a model no longer contains from ``version`` on (versions before it still do)."""

    __tablename__ = "forgotten_samples"
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    row: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sample_id: Mapped[str] = mapped_column(String(256))
    version: Mapped[int]
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    request_id: Mapped[int | None] = mapped_column(ForeignKey("deletion_requests.id"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ProxyCacheEntry(Base):
    """A memorization proxy computed once per model version, stored as an artifact."""

    __tablename__ = "proxy_cache"
    __table_args__ = (UniqueConstraint("model_version_id", "proxy"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    proxy: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))  # computed | carried
    compute_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RetiredId(Base):
    """The highest id deleted from a table whose ids users hold (models, datasets, jobs; migration
    0005). SQLite gives a new row the largest id + 1, so without this the next model would take the
    id of a model just deleted, and the audit log's ``model:<id>`` would name two models; a new row
    of these tables gets an id above it (``_above_retired``). PostgreSQL's sequences never go back,
    so it is written on SQLite only (service/core/repo/common.py ``retire``)."""

    __tablename__ = "retired_ids"
    table_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    max_id: Mapped[int]


def _above_retired(mapper, connection, target) -> None:
    if target.id is not None or connection.dialect.name != "sqlite":
        return
    table = mapper.local_table
    floor = connection.scalar(select(RetiredId.max_id).where(RetiredId.table_name == table.name))
    if floor is not None and floor >= (connection.scalar(select(func.max(table.c.id))) or 0):
        target.id = floor + 1


for _cls in (Dataset, Model, Job):
    event.listen(_cls, "before_insert", _above_retired)


class AuditEntry(Base):
    """One entry of a tenant's transparency log: append-only (the migration adds triggers refusing
    UPDATE and DELETE). Appended without a lock; the sequencer gives it its place in the tenant's
    Merkle tree later (``LogLeaf``; service/core/repo/transparency.py)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(200))
    details: Mapped[dict[str, Any]]


class LogPending(Base):
    """An entry the sequencer has not integrated yet (deleted when it is)."""

    __tablename__ = "log_pending"
    entry_id: Mapped[int] = mapped_column(ForeignKey("audit_log.id"), primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)


class LogLeaf(Base):
    """The place of an entry in its tenant's tree (append-only)."""

    __tablename__ = "log_leaves"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    leaf_index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    entry_id: Mapped[int] = mapped_column(ForeignKey("audit_log.id"), unique=True)


class LogNode(Base):
    """A perfect subtree of a tenant's tree: level 0 are the leaf hashes, level l covers the 2**l
    leaves from ``idx * 2**l`` (append-only). Every root and proof is folded from these."""

    __tablename__ = "log_nodes"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(64))


class TreeHead(Base):
    """A signed tree head, one per sequencer batch of a tenant (append-only)."""

    __tablename__ = "tree_heads"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    tree_size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root_hash: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(ForeignKey("signing_keys.key_id"))
    document: Mapped[dict[str, Any]]  # the signed head exactly as served
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class SigningKey(Base):
    """A public key the deployment signed with (the API serves the newest)."""

    __tablename__ = "signing_keys"
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ErasureCertificate(Base):
    """The signed certificate of a completed deletion request: its log entry is recorded by the
    sequencer when it finds the request completed, the certificate once that entry is in a tree."""

    __tablename__ = "erasure_certificates"
    request_id: Mapped[int] = mapped_column(ForeignKey("deletion_requests.id", ondelete="CASCADE"),
                                            primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("audit_log.id"), unique=True)
    certificate: Mapped[dict[str, Any] | None]
    issued_at: Mapped[dt.datetime | None] = mapped_column(index=True)


class WebhookEndpoint(Base):
    """Where a tenant wants its events sent (service/core/repo/webhooks.py): a URL, the secret that
    signs each message, and the event types. The secret is kept encrypted under the deployment's
    webhook key (service/core/webhooks.py SecretBox): the worker decrypts it to sign. After a
    rotation with a grace period, the superseded secret (encrypted the same way) signs too until
    ``previous_secret_expires_at``; both are null when there is none."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    encrypted_secret: Mapped[str] = mapped_column(String(512))
    previous_encrypted_secret: Mapped[str | None] = mapped_column(String(512))
    previous_secret_expires_at: Mapped[dt.datetime | None]
    event_types: Mapped[list[Any]]
    description: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """The outbox and the delivery log: one message to one endpoint, written in the transaction of
    the event it reports. ``message_id`` is the ``webhook-id`` of every attempt; ``body`` the exact
    bytes sent each time. ``pending`` until a 2xx (``delivered``) or ``max_attempts`` failures
    (``failed``); ``next_attempt_at`` is when the worker tries next."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime | None]
    last_attempt_at: Mapped[dt.datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[dt.datetime | None]


# a client holds endpoint ids: a deleted endpoint's id is never given to another (SQLite)
event.listen(WebhookEndpoint, "before_insert", _above_retired)

"""What each route answers on success, as pydantic models: the OpenAPI document's response schemas.

The repositories render rows to dicts (service/core/repo/); these models describe those dicts for
clients and for the schemathesis test that checks every answer against them
(tests/api/test_openapi.py). Objects the service passes through as given (a policy, a recipe, an
architecture's keyword arguments, metrics and configurations whose keys depend on the method) are
typed as JSON objects here; their own documents describe them (docs/api.md, docs/report.md).
Timestamps are ISO 8601 strings in UTC. Fields a newer version adds are allowed
(``additionalProperties``), so a client keeps working when one appears.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from service.core.statuses import DeliveryStatus, JobStatus, RequestStatus, VersionStatus


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- datasets


class Normalization(_Out):
    mean: list[float]
    std: list[float]


class DatasetOut(_Out):
    id: int
    name: str
    sha256: str
    size_bytes: int
    num_classes: int
    input_shape: list[int]
    dtype: str
    n_train: int
    n_test: int
    n_holdout: int | None
    normalization: Normalization | None
    created_at: str


class DatasetPage(_Out):
    items: list[DatasetOut]
    next_page_token: str | None


# --------------------------------------------------------------------------- models and versions


class CheckpointRef(_Out):
    sha256: str
    size_bytes: int | None
    url: str


class VersionOut(_Out):
    model_id: int
    version: int
    status: VersionStatus
    status_reason: str | None
    parent_version: int | None
    job_id: int | None
    recipe: dict[str, Any] | None
    aliases: list[str]
    checkpoint: CheckpointRef
    method: str | None
    config: dict[str, Any] | None
    metrics: dict[str, Any] | None
    seconds: float | None
    n_forgotten: int | None
    created_at: str
    updated_at: str | None
    purged_at: str | None = None  # a purged version's tombstone: when, and why
    purge_reason: str | None = None


class VersionPage(_Out):
    items: list[VersionOut]
    next_page_token: str | None


class ModelOut(_Out):
    id: int
    name: str
    dataset_id: int
    architecture: dict[str, Any]
    recipe: dict[str, Any] | None
    policy: dict[str, Any]
    policy_revision: int
    policy_pinned: bool
    has_events: bool
    aliases: dict[str, int]
    latest_version: VersionOut | None
    created_at: str
    links: dict[str, str]


class ModelPage(_Out):
    items: list[ModelOut]
    next_page_token: str | None


class PurgedVersionOut(_Out):
    version: int
    checkpoint_sha256: str
    purged_at: str
    reason: str
    trigger: str
    erased_in: list[int]
    n_erased: int
    n_proxy_cache_entries: int
    aliases_moved: dict[str, int]
    aliases_removed: list[str]


class EventsRedactedOut(_Out):
    rows_redacted: int
    rows_redacted_total: int
    sha256: str
    previous_sha256: str
    trigger: str
    purged_versions: list[int]
    proxy_cache_dropped: list[str]


class DatasetRedactedOut(_Out):
    rows_redacted: int
    rows_redacted_total: int
    sha256: str
    previous_sha256: str
    size_bytes: int
    trigger: str
    models: list[int]


class PurgeOut(_Out):
    model_id: int
    purged: list[PurgedVersionOut]
    events: EventsRedactedOut | None
    dataset: DatasetRedactedOut | None
    blobs_removed: list[str]


class AliasesOut(_Out):
    aliases: dict[str, int]


class AliasOut(_Out):
    alias: str
    version: int


class RevisionOut(_Out):
    revision: int
    current: bool
    source: str
    job_id: int | None
    applied: bool
    scores: dict[str, Any] | None
    created_at: str
    links: dict[str, str | None]
    policy: dict[str, Any]


class PolicyOut(_Out):
    model_id: int
    revision: int
    pinned: bool
    policy: dict[str, Any]
    n_revisions: int
    revisions: list[RevisionOut]
    calibration_job: str | None


# --------------------------------------------------------------------------- deletion requests and jobs


class DeletionRequestOut(_Out):
    id: int
    model_id: int
    status: RequestStatus
    reason: str
    subject_hash: str | None
    n_samples: int
    n_new_samples: int
    linked_to: list[int]
    job_id: int | None
    result_version: int | None
    attempts: int
    error: dict[str, Any] | None
    created_at: str
    due_by: str
    completed_at: str | None
    updated_at: str | None
    links: dict[str, str | None]


class DeletionRequestPage(_Out):
    items: list[DeletionRequestOut]
    next_page_token: str | None


class JobOut(_Out):
    id: int
    kind: str
    model_id: int
    status: JobStatus
    stage: str | None
    progress: float | None
    policy_revision: int | None
    params: dict[str, Any] | None
    base_version: int | None
    result_version: int | None
    n_requests: int | None
    n_forget: int | None
    cancel_requested: bool
    attempts: int
    error: dict[str, Any] | None
    timings: dict[str, float] | None
    worker: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    heartbeat_at: str | None
    links: dict[str, str | None]


class JobPage(_Out):
    items: list[JobOut]
    next_page_token: str | None


class FlushOut(_Out):
    job: JobOut | None
    created: bool


class HoldingVersionOut(_Out):
    version: int
    status: VersionStatus
    purge_due_at: str | None  # None: no later version erased any of its samples (yet)


class PurgedRefOut(_Out):
    version: int
    purged_at: str | None


class SampleFileOut(_Out):
    """The sample's row in the stored dataset file: blanked at ``redacted_at``, or kept because
    the models in ``held_by_models`` (this one or others of the dataset) still hold it."""

    dataset_id: int
    redacted_at: str | None
    held_by_models: list[int]


class SampleStatusOut(_Out):
    model_id: int
    sample_id: str
    forgotten: bool
    forgotten_in_version: int | None
    forgotten_by_job: int | None
    versions_containing: list[int]
    holding: list[HoldingVersionOut]
    purged_versions: list[PurgedRefOut]
    deletion_requests: list[int]
    dataset_file: SampleFileOut


# --------------------------------------------------------------------------- health


class HealthOut(_Out):
    status: str


class ReadyOut(_Out):
    status: str
    checks: dict[str, str]


# --------------------------------------------------------------------------- webhooks


class WebhookLinks(_Out):
    self: str
    deliveries: str


class WebhookOut(_Out):
    id: int
    url: str
    events: list[str]
    description: str | None
    created_at: str
    previous_secret_expires_at: str | None  # while a rotated-out secret still signs (grace period)
    links: WebhookLinks


class WebhookCreatedOut(WebhookOut):
    secret: str  # shown only in the answer that sets it: registration, rotate-secret


class WebhookPage(_Out):
    items: list[WebhookOut]
    next_page_token: str | None


class WebhookDeliveryOut(_Out):
    id: int
    webhook_id: int
    message_id: str  # the webhook-id header of every attempt
    event: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: str | None
    next_attempt_at: str | None
    created_at: str
    delivered_at: str | None
    payload: dict[str, Any]


class WebhookDeliveryPage(_Out):
    items: list[WebhookDeliveryOut]
    next_page_token: str | None

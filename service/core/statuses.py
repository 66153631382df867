"""The lifecycles of deletion requests, jobs and model versions, with their active and terminal
sets defined once (the database stores the values as plain strings).

Deletion request: ``received → batched → processing → completed | failed``; a request whose job
is canceled, or fails while it has attempts left, goes back to ``received``
(service/core/repo/requests.py makes every transition). Job:
``queued → running → succeeded | failed | canceled``. Model version: ``pending → ready | invalid``,
and ``ready → purged`` once a later version erased some of its samples and its retention ran out
(service/core/repo/retention.py: the row is a tombstone, the checkpoint is gone).
"""

from __future__ import annotations

from enum import StrEnum, nonmember


class RequestStatus(StrEnum):
    RECEIVED = "received"  # pending: waits for a batch
    BATCHED = "batched"  # taken into a queued job
    PROCESSING = "processing"  # its job runs
    COMPLETED = "completed"
    FAILED = "failed"  # its jobs failed max_request_attempts times

    # Waiting or in a job (the API links a new request's samples to these).
    ACTIVE = nonmember((RECEIVED, BATCHED, PROCESSING))
    # In a job that has not ended.
    IN_JOB = nonmember((BATCHED, PROCESSING))
    TERMINAL = nonmember((COMPLETED, FAILED))


def sql_list(statuses) -> str:
    """``statuses`` as the inside of an SQL ``IN (...)`` written into a statement's text: our own
    values (identifiers), nothing to escape."""
    return ", ".join(f"'{s}'" for s in statuses)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    ACTIVE = nonmember((QUEUED, RUNNING))
    TERMINAL = nonmember((SUCCEEDED, FAILED, CANCELED))


class VersionStatus(StrEnum):
    PENDING = "pending"  # registered, not yet checked by a worker
    READY = "ready"
    INVALID = "invalid"
    PURGED = "purged"  # a tombstone: its checkpoint held erased samples and left the artifact store

    ACTIVE = nonmember((PENDING,))
    TERMINAL = nonmember((READY, INVALID, PURGED))


class DeliveryStatus(StrEnum):
    """A webhook message to one endpoint (service/core/repo/webhooks.py)."""

    PENDING = "pending"  # waits for its next attempt
    DELIVERED = "delivered"  # the endpoint answered 2xx
    FAILED = "failed"  # given up: after max_attempts attempts, or at once for a refused destination

    TERMINAL = nonmember((DELIVERED, FAILED))


__all__ = ["DeliveryStatus", "JobStatus", "RequestStatus", "VersionStatus"]

"""Erasure from the stored dataset file (docs/architecture.md#retention-of-superseded-versions).

Retention (service/core/repo/retention.py) purges the versions that hold an erased sample and
blanks the sample's learning events. The dataset file the user uploaded still holds the sample's
features and label. Once no copy of a model needs it, it goes too: a training row is blanked in
the file when **every** model of the dataset has forgotten it and no kept version of any of them
holds it (every version before the one that forgot it is purged). A model of the dataset that has
not forgotten the sample (one that took no request for it, or was registered later) keeps it in
the file: its jobs still need the row to forget it.

Blanking rewrites the file with the row's features zero and its label 0 (same rows, same ids,
same order: worker/engine/datafile.py ``blank_train_rows``), stores it as a new blob, points the
dataset at it, stamps ``dataset_samples.redacted_at`` and records ``dataset.redacted`` in the
audit log. The old file leaves the store when no row references it. The worker keeps blank rows
out of every retain, calibration and reference set (:func:`redacted_rows`, with the model's own
forgotten rows), and a deletion request that names a blank row for a model that never forgot it is
refused with 409: the data it would have to unlearn from is gone (service/core/repo/deletions.py).

While a job or a registration check of any model of the dataset runs, the rewrite waits (its
worker may be reading the file): the worker does it when that job ends (worker/tasks.py), else the
next purge or ``POST …/purge`` does. The dataset
row is locked for the rewrite, and registering a model on the dataset or claiming a job of one of
its models takes the same lock shared (:func:`share_file`), so a model registered meanwhile is seen
(it holds every row: nothing of it is blanked) and a job claimed meanwhile reads the new file, or
holds the rewrite off until it ends.
"""

from __future__ import annotations

import logging
from functools import reduce

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.core.models import Dataset, DatasetSample, ForgottenSample, Job, Model, ModelVersion, utcnow
from service.core.repo import audit
from service.core.repo.common import iso
from service.core.statuses import JobStatus, VersionStatus
from worker.engine.datafile import blank_train_rows
from worker.engine.errors import DatasetError

log = logging.getLogger("unlearnd.retention")
CHUNK = 5000  # rows an UPDATE names at most


def unheld(session: Session, model_id: int, rows: list[int] | None = None) -> dict[int, str]:
    """The model's forgotten samples that no kept version holds (forgotten in version ``w`` and no
    ready version before ``w`` is left), as ``{row: sample_id}``; ``rows``: only among these."""
    oldest_kept = session.scalar(select(func.min(ModelVersion.version)).where(
        ModelVersion.model_id == model_id, ModelVersion.status == VersionStatus.READY))
    if oldest_kept is None:
        return {}
    q = select(ForgottenSample.row, ForgottenSample.sample_id).where(
        ForgottenSample.model_id == model_id, ForgottenSample.version <= oldest_kept)
    return dict(session.execute(q if rows is None else q.where(ForgottenSample.row.in_(rows))).all())


def redacted_rows(session: Session, dataset_id: int) -> list[int]:
    """The dataset's blank training rows, sorted."""
    return list(session.scalars(select(DatasetSample.row).where(
        DatasetSample.dataset_id == dataset_id, DatasetSample.redacted_at.is_not(None)).order_by(DatasetSample.row)))


def file_status(session: Session, dataset_id: int, row: int) -> dict:
    """For the sample status: when the row was blanked in the dataset file, or which models of the
    dataset still hold it (:func:`unheld` does not list it for them)."""
    redacted_at = session.scalar(select(DatasetSample.redacted_at).where(DatasetSample.dataset_id == dataset_id,
                                                                         DatasetSample.row == row))
    holding = [] if redacted_at is not None else [
        m for m in session.scalars(select(Model.id).where(Model.dataset_id == dataset_id).order_by(Model.id))
        if row not in unheld(session, m, [row])]
    return {"dataset_id": dataset_id, "redacted_at": iso(redacted_at), "held_by_models": holding}


def share_file(session: Session, dataset_id) -> None:
    """Take the dataset row shared, in the caller's transaction: what starts to use the dataset file
    (registering a model on it, a worker claiming a job of one of its models) waits for a rewrite in
    progress and holds one off until it committed. So the rewrite never misses a model that still
    holds the rows, and never prunes the file under a job that has just started to read it (the
    rewrite sees the job running and waits for it). ``dataset_id`` may be a scalar subquery."""
    session.execute(select(Dataset.id).where(Dataset.id == dataset_id).with_for_update(read=True))


def share_file_of_job(session: Session, job_id: int) -> None:
    """:func:`share_file` for the dataset of the job's model."""
    model_id = select(Job.model_id).where(Job.id == job_id).scalar_subquery()
    share_file(session, select(Model.dataset_id).where(Model.id == model_id).scalar_subquery())


def redact_dataset(session: Session, store, dataset_id: int, *, actor: str,
                   trigger: str) -> tuple[dict | None, set[str]]:
    """Blank the dataset's training rows that no model of it holds any more, in the caller's
    transaction. Returns what it did (None when there was nothing to blank, or the file is in use)
    and the artifacts to prune after the commit (the old file)."""
    dataset = session.scalar(select(Dataset).where(Dataset.id == dataset_id).with_for_update(of=Dataset))
    if dataset is None:
        return None, set()
    model_ids = list(session.scalars(select(Model.id).where(Model.dataset_id == dataset_id).order_by(Model.id)))
    if not model_ids:
        return None, set()
    busy = session.scalar(select(Job.id).where(Job.model_id.in_(model_ids), Job.status == JobStatus.RUNNING).limit(1))
    checking = session.scalar(select(ModelVersion.id).where(ModelVersion.model_id.in_(model_ids),
                                                            ModelVersion.status == VersionStatus.PENDING).limit(1))
    if busy is not None or checking is not None:  # a worker may be reading the file: a later purge does it
        return None, set()
    common = reduce(lambda a, b: a & b, (set(unheld(session, m)) for m in model_ids))
    already = set(redacted_rows(session, dataset_id))
    rows = sorted(common - already)
    if not rows:
        return None, set()
    old = dataset.sha256
    try:
        with store.open(old) as f:
            data = blank_train_rows(f, rows)
    except (OSError, DatasetError) as exc:
        log.warning("dataset %s: file %s not redacted, unreadable (%s)", dataset_id, old, exc)
        return None, set()
    new = store.put_bytes(data)
    now = utcnow()
    dataset.sha256, dataset.size_bytes = new, len(data)
    for start in range(0, len(rows), CHUNK):
        session.execute(update(DatasetSample).where(DatasetSample.dataset_id == dataset_id,
                                                    DatasetSample.row.in_(rows[start:start + CHUNK]))
                        .values(redacted_at=now))
    details = {"rows_redacted": len(rows), "rows_redacted_total": len(already) + len(rows), "sha256": new,
               "previous_sha256": old, "size_bytes": len(data), "trigger": trigger, "models": model_ids}
    audit.record(session, dataset.tenant_id, actor, "dataset.redacted", f"dataset:{dataset_id}", details)
    session.flush()
    return details, {old}

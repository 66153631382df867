"""Datasets and their training samples."""

from __future__ import annotations

import numpy as np
from sqlalchemy import delete as sql_delete
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.auth import Caller
from service.core.errors import Conflict, conflict, not_found
from service.core.models import Dataset, DatasetSample, Model
from service.core.repo import audit
from service.core.repo.common import iso, retire

INSERT_CHUNK = 5000
MAX_ID = 2**31 - 1  # ids and version numbers are INTEGER columns (int4 on PostgreSQL): a larger one matches nothing


def get(session: Session, caller: Caller, dataset_id: int) -> Dataset:
    row = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == caller.tenant_id)
                         ) if 0 < dataset_id <= MAX_ID else None
    if row is None:
        raise not_found(f"dataset {dataset_id}")
    return row


def query(caller: Caller, name: str | None = None):
    q = select(Dataset).where(Dataset.tenant_id == caller.tenant_id)
    return q.where(Dataset.name == name) if name else q


def create(session: Session, caller: Caller, *, name: str, sha256: str, size_bytes: int, summary: dict,
           ids_train: np.ndarray, mean, std) -> Dataset:
    """Insert the dataset and one row per training sample (id → row), in the caller's transaction."""
    if session.scalar(select(Dataset.id).where(Dataset.tenant_id == caller.tenant_id, Dataset.name == name)):
        raise conflict(f"name: a dataset named {name!r} exists already", field="name")
    row = Dataset(tenant_id=caller.tenant_id, name=name, sha256=sha256, size_bytes=size_bytes,
                  num_classes=summary["num_classes"], input_shape=summary["input_shape"], dtype=summary["dtype"],
                  n_train=summary["n_train"], n_test=summary["n_test"], n_holdout=summary.get("n_holdout", 0),
                  mean=mean, std=std)
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # a concurrent upload of the same name won the race
        raise conflict(f"name: a dataset named {name!r} exists already", field="name") from None
    ids = [str(s) for s in ids_train.tolist()]
    for start in range(0, len(ids), INSERT_CHUNK):
        chunk = ids[start:start + INSERT_CHUNK]
        session.execute(insert(DatasetSample),
                        [{"dataset_id": row.id, "row": start + i, "sample_id": s} for i, s in enumerate(chunk)])
    audit.record(session, caller.tenant_id, caller.actor, "dataset.registered", f"dataset:{row.id}",
                 {"name": name, "sha256": sha256, "n_train": row.n_train})
    return row


def delete(session: Session, caller: Caller, dataset_id: int) -> set[str]:
    """Delete a dataset no model uses, with its samples, in the caller's transaction; the audit log
    records it. Returns its artifact (the caller removes it once committed, if no other row shares
    it: service/core/repo/blobs.py)."""
    row = get(session, caller, dataset_id)
    users = list(session.scalars(select(Model.id).where(Model.dataset_id == row.id).order_by(Model.id)))
    if users:
        raise Conflict(f"dataset {dataset_id} is used by model(s) {users}: delete those first (a model that took "
                       "deletion requests is kept, and so is its dataset)", title="Dataset in use",
                       kind="dataset-in-use", model_ids=users)
    details = {"name": row.name, "sha256": row.sha256, "n_train": row.n_train}
    session.execute(sql_delete(DatasetSample).where(DatasetSample.dataset_id == row.id))
    session.delete(row)
    try:
        session.flush()
    except IntegrityError:  # a model registered on it meanwhile (PostgreSQL; SQLite serializes writers)
        raise Conflict(f"dataset {dataset_id} is used by a model registered just now: delete that first",
                       title="Dataset in use", kind="dataset-in-use") from None
    retire(session, "datasets", [dataset_id])
    audit.record(session, caller.tenant_id, caller.actor, "dataset.deleted", f"dataset:{dataset_id}", details)
    return {details["sha256"]}


def sample_ids(session: Session, dataset_id: int) -> np.ndarray:
    """The training ids in row order."""
    ids = session.scalars(select(DatasetSample.sample_id).where(DatasetSample.dataset_id == dataset_id)
                          .order_by(DatasetSample.row)).all()
    return np.asarray(ids, dtype=str)


def render(d: Dataset) -> dict:
    return {"id": d.id, "name": d.name, "sha256": d.sha256, "size_bytes": d.size_bytes,
            "num_classes": d.num_classes, "input_shape": d.input_shape, "dtype": d.dtype,
            "n_train": d.n_train, "n_test": d.n_test, "n_holdout": d.n_holdout,
            "normalization": {"mean": d.mean, "std": d.std} if d.mean is not None else None,
            "created_at": iso(d.created_at)}


def sample_row(session: Session, dataset_id: int, sample_id: str) -> int | None:
    return session.scalar(select(DatasetSample.row).where(DatasetSample.dataset_id == dataset_id,
                                                          DatasetSample.sample_id == sample_id))

"""The ``loading`` stage: what a job reads from the database, and the engine's inputs.

``read_job`` reads the claimed job, its model, dataset and requests, fixes its base version and
computes its forget set (fenced, in one transaction); ``load`` then parses the job's policy and
loads the dataset and the base version's weights on the worker's device. The forget set is
cumulative: rows forgotten by earlier jobs of the model stay out of every retain set
(``ForgetSet.excluded``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core.models import (
    Dataset,
    DeletionRequest,
    DeletionRequestSample,
    ForgottenSample,
    Job,
    Model,
    ModelAlias,
    ModelVersion,
)
from service.core.policy import Policy
from service.core.repo import redaction
from service.core.statuses import VersionStatus

from .. import registration
from ..context import WorkerContext
from .lease import Lease


@dataclass(frozen=True)
class RequestSample:
    """A sample named by one of the job's requests (``linked_request_id``: earlier work covers it)."""

    request_id: int
    row: int
    sample_id: str
    linked_request_id: int | None


@dataclass(frozen=True)
class ForgetEntry:
    """A training row this job forgets, and the first of its requests that named it."""

    row: int
    sample_id: str
    request_id: int


@dataclass
class ForgetSet:
    samples: list[RequestSample]  # every sample of the job's requests, by row then request
    entries: list[ForgetEntry]  # unlinked rows, deduplicated, minus rows earlier jobs forgot; by row
    excluded: list[int]  # rows forgotten by earlier jobs of the model (cumulative), sorted
    already_forgotten: int  # unlinked rows of this job that earlier jobs forgot already (dropped)

    @property
    def rows(self) -> list[int]:
        return [e.row for e in self.entries]


@dataclass
class JobRecord:
    """The job as read at the start of its run."""

    job: Job
    model: Model
    dataset: Dataset
    base: ModelVersion  # the version it starts from
    requests: list[DeletionRequest]
    forget_set: ForgetSet
    next_version: int  # the version number it publishes

    def corrective_rows(self, reasons: list[str]) -> list[int]:
        """The forget set's rows that a request whose reason is in ``reasons`` named (their labels
        are wrong: the policy's ``corrective`` step takes them), by row."""
        wrong = {r.id for r in self.requests if r.reason in reasons}
        named = {s.row for s in self.forget_set.samples if s.request_id in wrong}
        return [row for row in self.forget_set.rows if row in named]


@dataclass
class EngineInputs:
    """What the engine needs of a model: the runtime, the dataset, the base version's weights, the
    learning events' path and the training recipe (n_train = the dataset's)."""

    runtime: Any
    data: Any
    base: Any
    events: Path | None
    recipe: Any
    n_train: int


@dataclass
class Loaded:
    """The output of the ``loading`` stage: the job, its policy (as stored and as the engine takes
    it) and the engine's inputs."""

    record: JobRecord
    policy: Policy
    engine_policy: Any  # worker.engine.rum's parsed policy
    inputs: EngineInputs


def forget_set(session: Session, job_id: int, model_id: int) -> ForgetSet:
    """The job's samples, its forget set, the cumulative excluded rows (those earlier jobs forgot, and
    the dataset file's blank rows: service/core/repo/redaction.py), and how many unlinked rows were
    dropped as already forgotten."""
    samples = [RequestSample(*r) for r in session.execute(
        select(DeletionRequestSample.request_id, DeletionRequestSample.row, DeletionRequestSample.sample_id,
               DeletionRequestSample.linked_request_id)
        .join(DeletionRequest, DeletionRequest.id == DeletionRequestSample.request_id)
        .where(DeletionRequest.job_id == job_id)
        .order_by(DeletionRequestSample.row, DeletionRequestSample.request_id))]
    forgotten = session.execute(select(ForgottenSample.row, ForgottenSample.job_id)
                                .where(ForgottenSample.model_id == model_id)).all()
    blank = redaction.redacted_rows(session, session.scalar(select(Model.dataset_id).where(Model.id == model_id)))
    excluded = sorted({r.row for r in forgotten if r.job_id != job_id} | set(blank))
    excluded_set = set(excluded)
    entries: dict[int, ForgetEntry] = {}
    dropped = set()
    for sample in samples:
        if sample.linked_request_id is not None or sample.row in entries:
            continue
        if sample.row in excluded_set:
            dropped.add(sample.row)
            continue
        entries[sample.row] = ForgetEntry(sample.row, sample.sample_id, sample.request_id)
    return ForgetSet(samples, sorted(entries.values(), key=lambda e: e.row), excluded, len(dropped))


def base_version(session: Session, job: Job, model: Model) -> ModelVersion:
    """The version a job starts from, fixed on the job at its first attempt: the model's ``latest``
    (else its newest ready version)."""
    if job.base_version is not None:
        base = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id,
                                                         ModelVersion.version == job.base_version))
    else:
        alias = session.get(ModelAlias, (model.id, "latest"))
        base = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id,
                                                         ModelVersion.version == alias.version)) if alias else None
        if base is None or base.status != VersionStatus.READY:
            base = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id,
                                                             ModelVersion.status == VersionStatus.READY)
                                  .order_by(ModelVersion.version.desc()).limit(1))
    if base is None or base.status != VersionStatus.READY:
        raise RuntimeError(f"model {model.id} has no ready version to unlearn from")
    job.base_version = base.version
    return base


def read_job(ctx: WorkerContext, lease: Lease) -> JobRecord:
    """Read what the job needs and fix its base version (the model's ``latest``), fenced."""
    with ctx.db.transaction() as session:
        job = lease.lock_job(session)
        model = session.get(Model, job.model_id)
        dataset = session.get(Dataset, model.dataset_id)
        base = base_version(session, job, model)
        requests = list(session.scalars(select(DeletionRequest).where(DeletionRequest.job_id == job.id)
                                        .order_by(DeletionRequest.id)))
        forget = forget_set(session, job.id, model.id)
        next_version = (session.scalar(select(func.max(ModelVersion.version))
                                       .where(ModelVersion.model_id == model.id)) or 0) + 1
    return JobRecord(job, model, dataset, base, requests, forget, next_version)


def recipe_of(model: Model, dataset: Dataset):
    """The model's recipe (worker/engine/recipe.py) on the dataset's training rows; the fields the
    registration inferred stay marked ``inferred``."""
    from worker.engine.recipe import Recipe

    recipe = Recipe.from_dict(model.recipe, n_train=dataset.n_train)
    inferred = (model.recipe or {}).get("inferred")
    return dataclasses.replace(recipe, inferred=tuple(inferred)) if inferred is not None else recipe


def load_inputs(ctx: WorkerContext, model: Model, dataset: Dataset, base: ModelVersion,
                rows: list[int] = ()) -> EngineInputs:
    """Load the dataset and the base version's weights on the worker's device (the ``loading``
    stage of deletion and calibration jobs); ``rows`` (forget, excluded) must be training rows."""
    from worker.engine import architectures
    from worker.engine.data import load_dataset
    from worker.engine.errors import DatasetError
    from worker.engine.runtime import Runtime

    runtime = Runtime.auto()
    data = load_dataset(ctx.store.local_path(dataset.sha256), dataset.mean, dataset.std,
                        num_classes=dataset.num_classes).to(runtime.device)
    n_train = len(data.train)
    bad = [r for r in rows if r >= n_train]
    if bad:
        raise DatasetError(f"rows: {len(bad)} row(s) past the {n_train} training rows, e.g. {bad[:5]}")
    net = runtime.prepare(architectures.load_model(model.architecture,
                                                   ctx.store.local_path(base.checkpoint_sha256))).eval()
    events = ctx.store.local_path(model.events_sha256) if model.events_sha256 else None
    return EngineInputs(runtime, data, net, events, recipe_of(model, dataset), n_train)


def load(ctx: WorkerContext, record: JobRecord) -> Loaded:
    """The job's policy (stored and as the engine takes it) and the engine's inputs, on the device."""
    from worker.engine import rum

    policy = Policy.model_validate(record.job.policy)
    engine_policy = rum.parse_policy(registration.engine_policy(policy))
    inputs = load_inputs(ctx, record.model, record.dataset, record.base,
                         record.forget_set.rows + record.forget_set.excluded)
    return Loaded(record, policy, engine_policy, inputs)


__all__ = ["EngineInputs", "ForgetEntry", "ForgetSet", "JobRecord", "Loaded", "RequestSample", "base_version",
           "forget_set", "load", "load_inputs", "read_job", "recipe_of"]

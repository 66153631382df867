"""The job report: one typed, versioned contract that the worker builds and the API serves.

A deletion job's report is a :class:`JobReport` (schema ``unlearnd.report/2``); a calibration
job's is a :class:`CalibrationReport` (schema ``unlearnd.calibration/1``). The worker builds the
model, stores ``model_dump_json()`` as an artifact (``Job.report_sha256``) and renders the page
from the same model (worker/report/). Every model forbids unknown fields and every field the worker
writes is required (a value that may be absent is ``X | None`` with no default): a report that does
not match the contract fails in the worker, before it is published.

Reports stored before this contract (schema ``unlearnd.report/1``, the same shape written without a
model) are read by :func:`load_job_report`, which fills in the fields older writers did not have yet
(``recipe``, ``job.policy_revision``, each bin's ``run``) as null before validating.

Numbers a metric could not produce (an accuracy over an empty set: NaN in the engine) are stored
as null. No torch and no HTTP here: the API layer imports this module too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from service.core.policy import CALIBRATION_SCHEMA
from worker.engine.catalog import GuardOutcome

REPORT_SCHEMA = "unlearnd.report/2"
REPORT_SCHEMA_V1 = "unlearnd.report/1"  # read, never written

__all__ = ["CALIBRATION_SCHEMA", "REPORT_SCHEMA", "REPORT_SCHEMA_V1", "Accuracies", "BinEntry", "BinGuard",
           "BinRun", "CalibrationReport", "JobReport", "load_job_report", "load_report"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Timestamp = AwareDatetime
Fraction = float | None  # an accuracy or a share in [0, 1]; null when it could not be measured


# --------------------------------------------------------------------------- shared parts


class Accuracies(_Strict):
    """The audit of one model on the job's sets (worker/engine/metrics.py): accuracies on the forget,
    retain and test sets, and the membership-inference attack's efficacy on the forget set."""

    acc_forget: Fraction
    acc_retain: Fraction
    acc_test: Fraction
    mia: Fraction
    mia_entropy: Fraction


class DatasetInfo(_Strict):
    id: int
    name: str
    sha256: str
    n_train: int
    n_test: int


class ProxyInfo(_Strict):
    """The memorization proxy (a derived cache of the training data) and where its values came from."""

    name: str
    params: dict[str, Any]
    source: str  # computed, cached or carried (worker/proxy_cache.py)
    compute_seconds: float | None


# --------------------------------------------------------------------------- deletion job


class JobInfo(_Strict):
    id: int
    model_id: int
    model_name: str
    status: str
    base_version: int
    new_version: int | None
    attempts: int
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    timings: dict[str, float | None]  # seconds per stage, and "total"
    device: str | None
    worker: str | None
    policy_revision: int | None


class RequestEntry(_Strict):
    id: int
    reason: str
    subject_hash: str | None  # sha256 of the pseudonymous subject reference; never the reference itself
    received_at: Timestamp
    due_by: Timestamp
    n_samples: int
    n_new_samples: int
    linked_to: list[int]  # earlier requests that already cover some of its samples


class ForgetSet(_Strict):
    n: int
    n_excluded_before: int
    sample_ids_sha256: str


class JobProxy(ProxyInfo):
    thresholds: list[float] | None  # cut points between bins on the proxy's training-set distribution
    forget_values: list[float | None]


class BinGuard(BaseModel):
    """What the unlearner's accuracy guard did in one bin (docs/unlearning.md); the engine reports more
    detail (probe accuracies), kept as it is."""

    model_config = ConfigDict(extra="allow", frozen=True)

    outcome: GuardOutcome | None = None


class BinRun(BaseModel):
    """What the unlearner reported about its run (steps, learning rates tried, the guard): the
    engine's own record, kept as it is, with the two values the page reads typed."""

    model_config = ConfigDict(extra="allow", frozen=True)

    cost_share: float | None = None  # work, as a share of the original's training steps
    guard: BinGuard | None = None


class BinMetrics(_Strict):
    acc_forget: Fraction
    mia: Fraction


class BinEntry(_Strict):
    index: int
    level: str
    n: int
    method: str
    hparams: dict[str, Any]
    seconds: float | None
    before: BinMetrics
    after: BinMetrics
    run: BinRun | None


class Metrics(_Strict):
    before: Accuracies
    after: Accuracies
    reference: Accuracies | None  # the model retrained without the forget set, when the policy asks for it
    tow: float | None
    tow_mia: float | None
    tow_before: float | None


class PerClassAccuracy(_Strict):
    classes: list[int]
    before: list[Fraction]
    after: list[Fraction]
    reference: list[Fraction] | None


class Confidence(_Strict):
    """Each example's confidence in its true label, on the forget set and on (a sample of) the test set."""

    forget_before: list[float]
    forget_after: list[float]
    test_before: list[float]
    test_after: list[float]


class Guardrails(_Strict):
    max_test_drop: float
    max_retain_drop: float
    test_drop: float | None
    retain_drop: float | None
    passed: bool


class Checkpoint(_Strict):
    sha256: str
    size_bytes: int


class JobReport(_Strict):
    """A deletion job's report: the erasure record and the evidence of effect."""

    schema_: Literal["unlearnd.report/2"] = Field(alias="schema")
    job: JobInfo
    dataset: DatasetInfo
    requests: list[RequestEntry]
    forget_set: ForgetSet
    method: str
    config: dict[str, Any]
    config_sha256: str
    seed: int
    proxy: JobProxy
    bins: list[BinEntry]
    metrics: Metrics
    per_class_accuracy: PerClassAccuracy
    confidence: Confidence
    guardrails: Guardrails
    aliases_moved: list[str]
    checkpoint: Checkpoint
    mia_attack: str
    recipe: dict[str, Any] | None  # the model's training recipe (worker/engine/recipe.py)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        """What the worker stores (and the API serves as it is stored)."""
        return self.model_dump_json(by_alias=True)


# --------------------------------------------------------------------------- calibration job


class CalibrationJobInfo(_Strict):
    id: int
    kind: Literal["calibration"]
    model_id: int
    model_name: str
    status: str
    base_version: int
    attempts: int
    trigger: str | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    timings: dict[str, float | None]
    device: str | None
    worker: str | None
    study: str


class Score(_Strict):
    """One policy on one calibration set against its retrain reference (worker/engine/calibration.py)."""

    score: float | None
    tow: float | None
    tow_mia: float | None
    cost_share: float | None
    seconds_share: float | None
    audit: dict[str, float | None]


class Trial(_Strict):
    number: int
    state: str
    score: float | None
    tow: float | None
    tow_mia: float | None
    planned_cost: float | None
    cost_share: float | None
    seconds_share: float | None
    policy: dict[str, Any] | None
    seconds: float | None


class Payback(_Strict):
    calibration_retrains: float | None
    default_job_share: float | None
    calibrated_job_share: float | None
    saving_per_job: float | None
    jobs: int | None
    summary: str


class Revision(_Strict):
    number: int
    previous: int | None
    applied: bool
    pinned: bool
    current: int | None
    policy: dict[str, Any]


class CalibrationReport(_Strict):
    """A calibration job's report: the searched policy, its scores and cost, and the revision made."""

    schema_: Literal["unlearnd.calibration/1"] = Field(alias="schema")
    job: CalibrationJobInfo
    dataset: DatasetInfo
    proxy: ProxyInfo
    policy: dict[str, Any]
    chosen: str
    winner: dict[str, Any]
    search: Score
    check: Score
    default_search: Score
    default_check: Score
    trials: list[Trial]
    seconds: float
    retrain_seconds: float
    cost_retrains: float | None
    settings: dict[str, Any]
    recipe: dict[str, Any]
    sets: dict[str, int]
    reference: dict[str, dict[str, float | None]]
    check_margin: float = 0.0  # the gain over the default the winner needed on the check set
    payback: Payback
    revision: Revision

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


# --------------------------------------------------------------------------- reading stored reports


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A ``unlearnd.report/1`` report in the shape of ``/2``: the fields later v1 writers added are
    null where an early one did not write them. Values are not changed."""
    out = {**data, "schema": REPORT_SCHEMA}
    out.setdefault("recipe", None)
    out["job"] = {"policy_revision": None, **(data.get("job") or {})}
    out["bins"] = [{"run": None, **b} if isinstance(b, dict) else b for b in data.get("bins") or []]
    return out


def load_job_report(data: dict[str, Any]) -> JobReport:
    """A stored deletion-job report (``/2``, or ``/1`` from before the contract) as a :class:`JobReport`;
    raises pydantic's ``ValidationError`` when it matches neither."""
    if isinstance(data, dict) and data.get("schema") == REPORT_SCHEMA_V1:
        data = _upgrade_v1(data)
    return JobReport.model_validate(data)


def load_report(data: dict[str, Any]) -> JobReport | CalibrationReport:
    """Any stored job report, by its schema."""
    if isinstance(data, dict) and data.get("schema") == CALIBRATION_SCHEMA:
        return CalibrationReport.model_validate(data)
    return load_job_report(data)


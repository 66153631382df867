"""The audit report of a deletion job (``JobReport``, schema ``unlearnd.report/2``, service/core/report.py),
stored as a JSON artifact with its page (worker/report/) before the version is published, and the JSON
helpers of the audit chain.

``build_report(ReportInputs)`` returns the typed report: the job, the dataset, the
requests (with their GDPR due dates), the forget set (its size and the sha256 of its sorted sample
ids), the method and its config (with its sha256), the proxy, the bins, the before/after
(/reference) metrics, per-class accuracy, confidences, the guardrails, the aliases moved, the
checkpoint and the recipe.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.repo.common import aware
from service.core.repo.deletions import ERASURE_DEADLINE
from service.core.report import (
    REPORT_SCHEMA,
    BinEntry,
    BinMetrics,
    BinRun,
    Confidence,
    DatasetInfo,
    ForgetSet,
    Guardrails,
    JobInfo,
    JobProxy,
    JobReport,
    Metrics,
    PerClassAccuracy,
    RequestEntry,
)
from service.core.report import Checkpoint as ReportCheckpoint

from ..proxy_cache import CachedProxy
from .auditing import AuditResult
from .loading import JobRecord

MIA_ATTACK = ("SVC on the true-label confidence (shadow-in: retain rows, shadow-out: test rows); "
              "efficacy = share of forget rows predicted non-member")


def clean(x: Any) -> Any:
    """JSON-safe: numpy scalars and arrays to Python, NaN and infinities to None."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def canonical_json(obj: Any) -> str:
    return json.dumps(clean(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def forget_set_sha256(record: JobRecord) -> str:
    """The sha256 of the forget set's sample ids, sorted, one a line."""
    return sha256_text("\n".join(sorted(e.sample_id for e in record.forget_set.entries)))


def device_name(runtime) -> str:
    described = runtime.describe()
    return f"{described['device']} ({described['gpu']})" if described.get("gpu") else str(described["device"])


@dataclass(frozen=True)
class RunFacts:
    """Who ran the job, on what, how long, and when it finished."""

    attempt: int  # the fencing token of the run that publishes
    worker: str
    device: str
    timings: dict[str, float]
    finished_at: dt.datetime


@dataclass(frozen=True)
class Checkpoint:
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ReportInputs:
    record: JobRecord
    run: RunFacts
    proxy: CachedProxy
    result: Any  # worker.engine.rum's result (method, thresholds, steps)
    config: dict[str, Any]  # the engine policy, proxy and seed the version was made with
    audit: AuditResult
    checkpoint: Checkpoint
    recipe: dict[str, Any]  # the training recipe (worker/engine/recipe.py, to_dict)

    @property
    def aliases_moved(self) -> list[str]:
        return ["latest", "production"] if self.audit.passed else ["latest"]


def request_entries(record: JobRecord) -> list[RequestEntry]:
    """One entry per request of the job: reason, subject hash, received and due dates, samples."""
    by_request: dict[int, list] = {r.id: [] for r in record.requests}
    for sample in record.forget_set.samples:
        by_request.setdefault(sample.request_id, []).append(sample)
    out = []
    for r in record.requests:
        samples = by_request.get(r.id, [])
        received = aware(r.created_at)
        out.append(RequestEntry(
            id=r.id, reason=r.reason, subject_hash=r.subject_hash, received_at=received,
            due_by=received + ERASURE_DEADLINE, n_samples=r.n_samples,
            n_new_samples=sum(1 for s in samples if s.linked_request_id is None),
            linked_to=sorted({s.linked_request_id for s in samples if s.linked_request_id is not None})))
    return out


def _bins(result, audit: AuditResult) -> list[BinEntry]:
    return [BinEntry(index=step.bin.index, level=step.bin.level, n=len(step.bin), method=step.method,
                     hparams=clean(step.hparams), seconds=clean(step.seconds),
                     before=BinMetrics(acc_forget=clean(before["acc_forget"]), mia=clean(before["mia"])),
                     after=BinMetrics(acc_forget=clean(after["acc_forget"]), mia=clean(after["mia"])),
                     run=BinRun.model_validate(clean(step.run)))
            for step, before, after in zip(result.steps, audit.bins_before, audit.bins_after, strict=True)]


def build_report(inputs: ReportInputs) -> JobReport:
    """The report of a deletion job that publishes a version: the typed contract of
    service/core/report.py (a value that does not fit it fails here, before anything is published)."""
    record, run, proxy, audit, config = inputs.record, inputs.run, inputs.proxy, inputs.audit, inputs.config
    job, model, dataset = record.job, record.model, record.dataset
    forget_rows = np.array(record.forget_set.rows, dtype=np.int64)
    return JobReport(
        schema=REPORT_SCHEMA,
        job=JobInfo(id=job.id, model_id=model.id, model_name=model.name, status="succeeded",
                    base_version=record.base.version, new_version=record.next_version, attempts=run.attempt,
                    created_at=aware(job.created_at),
                    started_at=aware(job.started_at) if job.started_at else None,
                    finished_at=aware(run.finished_at), timings=clean(run.timings), device=run.device,
                    worker=run.worker, policy_revision=job.policy_revision),
        dataset=DatasetInfo(id=dataset.id, name=dataset.name, sha256=dataset.sha256, n_train=dataset.n_train,
                            n_test=dataset.n_test),
        requests=request_entries(record),
        forget_set=ForgetSet(n=len(record.forget_set.entries), n_excluded_before=len(record.forget_set.excluded),
                             sample_ids_sha256=forget_set_sha256(record)),
        method=inputs.result.method,
        config=clean(config),
        config_sha256=sha256_text(canonical_json(config)),
        seed=config["seed"],
        proxy=JobProxy(name=proxy.name, params=clean(proxy.params), source=proxy.source,
                       compute_seconds=clean(proxy.compute_seconds), thresholds=clean(inputs.result.thresholds),
                       forget_values=clean(proxy.values[forget_rows])),
        bins=_bins(inputs.result, audit),
        metrics=Metrics.model_validate(clean(audit.metrics())),
        per_class_accuracy=PerClassAccuracy.model_validate(clean(audit.per_class)),
        confidence=Confidence.model_validate(clean(audit.confidence)),
        guardrails=Guardrails.model_validate(clean(audit.guardrails)),
        aliases_moved=inputs.aliases_moved,
        checkpoint=ReportCheckpoint(sha256=inputs.checkpoint.sha256, size_bytes=inputs.checkpoint.size_bytes),
        mia_attack=MIA_ATTACK,
        recipe=clean(inputs.recipe),
    )


__all__ = ["MIA_ATTACK", "REPORT_SCHEMA", "Checkpoint", "ReportInputs", "RunFacts", "build_report",
           "canonical_json", "clean", "device_name", "forget_set_sha256", "request_entries", "sha256_text"]

"""The calibration pipeline: search a model's unlearning policy, publish it as a policy revision.

``run_calibration(ctx, job_id)`` runs a ``kind = calibration`` job (``POST /v1/models/{id}/calibrations``,
or made at registration when ``policy.calibration.auto`` is true). It shares the deletion job's
machinery (worker/pipeline/): the fenced claim with stale takeover (here only as the oldest active
job of its model, so it never runs beside a deletion job), heartbeat, throttled progress,
cooperative cancellation, and the failure and cancel paths. Stages:

``loading`` (the base version, as a deletion job would take it: the model's ``latest``; the
dataset; the rows earlier jobs forgot, kept out of every calibration set) → ``proxies`` (the
memorization proxy from the cache, exactly as a deletion job gets it) → ``reference``, ``search``,
``check`` (the engine's ``worker.engine.calibration.calibrate``: a retrain reference without a
calibration forget set, an Optuna search under the cost cap, the winner checked on a second,
disjoint set) → ``publishing``: the report artifact (a ``CalibrationReport``, service/core/report.py: the
engine's result with its trials table, the payback estimate, the revision), then one transaction
with the new policy revision (``source = calibration``; current unless the policy is pinned and
the request did not say ``apply``), the finished job and the audit-log entries.

Optuna's trials are stored on the service database in a namespace of their own
(``Settings.optuna_storage_url``), under a study named after the model and the job: a job taken
over after its worker died resumes the trials already done.
"""

from __future__ import annotations

import copy
import logging

from sqlalchemy import select

from service.core.db import ensure_optuna_schema
from service.core.models import Dataset, ForgottenSample, Model, utcnow
from service.core.policy import CALIBRATION_SCHEMA, Policy, payback, with_unlearning
from service.core.repo import audit, redaction
from service.core.repo import models as model_repo
from service.core.repo.common import iso
from service.core.report import CalibrationReport
from service.core.statuses import JobStatus

from .context import WorkerContext
from .pipeline import run_claimed
from .pipeline.lease import Lease, claim, default_worker_name
from .pipeline.loading import base_version, load_inputs
from .pipeline.progress import Progress
from .pipeline.proxies import load_proxy
from .pipeline.report import clean, device_name
from .report import render_calibration_page

log = logging.getLogger("unlearnd.worker")

ENGINE_STAGES = ("reference", "search", "check")
STAGES = ("loading", "proxies", *ENGINE_STAGES, "publishing")
ENGINE_SPAN = (0.08, 0.97)  # the engine's share of the progress bar (its stages report inside it)
SPANS = {"loading": (0.0, 0.03), "proxies": (0.03, 0.08), "reference": ENGINE_SPAN, "search": ENGINE_SPAN,
         "check": ENGINE_SPAN, "publishing": (0.97, 1.0)}


def study_name(model_id: int, job_id: int) -> str:
    return f"unlearnd-model{model_id}-job{job_id}"


class CalibrationProgress(Progress):
    """The job's stage follows the engine's own stages (reference, search, check)."""

    def __init__(self, ctx: WorkerContext, lease: Lease):
        super().__init__(ctx, lease, SPANS)

    def report(self, engine_stage: str, fraction: float) -> None:
        self.lease.check()
        if engine_stage in ENGINE_STAGES and engine_stage != self.stage:
            self.clock.switch(engine_stage)
            self.write(fraction, force=True)
            return
        self.write(fraction)

    def engine_context(self):
        from worker.engine.runtime import RunContext

        return RunContext(progress=self.report, cancel_requested=self.cancel_requested, start=ENGINE_SPAN[0],
                          end=ENGINE_SPAN[1], stage="reference")


def run_calibration(ctx: WorkerContext, job_id: int, *, worker_name: str | None = None) -> str | None:
    """Run calibration job ``job_id`` to its end; return its final status, or None if this call did
    nothing (not claimable: running elsewhere, finished, or waiting for an older job of its model)."""

    worker_name = worker_name or default_worker_name()
    lease = claim(ctx, job_id, worker_name, kind="calibration")
    if lease is None:
        log.info("calibration job %s: not claimable (running elsewhere, finished, or behind another job of "
                 "its model); nothing to do", job_id)
        return None
    log.info("calibration job %s: claimed by %s (attempt %d)", job_id, worker_name, lease.token)
    return run_claimed(ctx, lease, CalibrationProgress(ctx, lease), _execute, f"calibration job {job_id}")


def _execute(ctx: WorkerContext, lease: Lease, progress: CalibrationProgress) -> str:
    import torch

    from worker.engine.calibration import CalibrationSettings, calibrate

    # ---- loading
    progress.enter("loading")
    with ctx.db.transaction() as session:
        job = lease.lock_job(session)
        model = session.get(Model, job.model_id)
        dataset = session.get(Dataset, model.dataset_id)
        base = base_version(session, job, model)
        excluded = sorted(set(session.scalars(select(ForgottenSample.row).where(ForgottenSample.model_id == model.id)))
                          | set(redaction.redacted_rows(session, dataset.id)))  # blank rows of the file
        policy = Policy.model_validate(job.policy)
        params = dict(job.params or {})
    settings = CalibrationSettings.from_dict({**params.get("settings", {}), "seed": policy.seed})
    inputs = load_inputs(ctx, model, dataset, base, excluded)
    progress.check()

    # ---- proxies
    progress.enter("proxies")
    proxy = load_proxy(ctx, progress, policy, model, dataset, base, inputs)
    progress.check()

    # ---- reference, search, check (the engine's stages)
    progress.enter("reference")
    storage = ctx.settings.optuna_storage_url
    if storage is not None:
        ensure_optuna_schema(ctx.db)
    result = calibrate(copy.deepcopy(inputs.base), inputs.data, inputs.recipe, proxy.values, inputs.runtime,
                       progress.engine_context(), settings=settings, storage=storage,
                       study_name=study_name(model.id, job.id),
                       excluded_rows=torch.tensor(excluded, dtype=torch.long) if excluded else None)
    out = clean(result.to_dict())

    # ---- publishing
    progress.enter("publishing")
    _publish(ctx, lease, progress, model, dataset, base.version, params, proxy, out, device_name(inputs.runtime))
    return JobStatus.SUCCEEDED.value


def _scores(out: dict) -> dict:
    default_cost = (out.get("default_check") or {}).get("cost_share")
    calibrated_cost = (out.get("check") or {}).get("cost_share")
    return {"search": out.get("search"), "check": out.get("check"), "default_check": out.get("default_check"),
            "cost_retrains": out.get("cost_retrains"), "seconds": out.get("seconds"),
            "payback": payback(out.get("cost_retrains"), default_cost, calibrated_cost)}


def _publish(ctx: WorkerContext, lease: Lease, progress: CalibrationProgress, model: Model, dataset: Dataset,
             base_number: int, params: dict, proxy, out: dict, device: str) -> None:
    """The report artifact, the policy revision (current unless pinned and not asked to apply), the
    job and the audit entries: one transaction."""
    scores = _scores(out)
    with ctx.db.transaction() as session:
        job = lease.lock_job(session)
        m = session.scalar(select(Model).where(Model.id == model.id).with_for_update(of=Model))
        policy = with_unlearning(m.policy, out["policy"]).model_dump()
        apply = params.get("apply")
        apply = (not m.policy_pinned) if apply is None else bool(apply)
        previous = m.policy_revision
        rev = model_repo.add_revision(session, m, policy, source="calibration", job_id=job.id, scores=scores,
                                      apply=apply)
        now = utcnow()
        timings = progress.timings()
        report = CalibrationReport.model_validate(clean({
            "schema": CALIBRATION_SCHEMA,
            "job": {"id": job.id, "kind": "calibration", "model_id": m.id, "model_name": m.name,
                    "status": "succeeded", "base_version": base_number, "attempts": lease.token,
                    "trigger": params.get("trigger"), "created_at": iso(job.created_at),
                    "started_at": iso(job.started_at), "finished_at": iso(now), "timings": timings,
                    "device": device, "worker": lease.worker, "study": study_name(m.id, job.id)},
            "dataset": {"id": dataset.id, "name": dataset.name, "sha256": dataset.sha256,
                        "n_train": dataset.n_train, "n_test": dataset.n_test},
            "proxy": {"name": proxy.name, "params": proxy.params, "source": proxy.source,
                      "compute_seconds": proxy.compute_seconds},
            **out,
            "payback": scores["payback"],
            "revision": {"number": rev.revision, "previous": previous, "applied": apply, "pinned": m.policy_pinned,
                         "current": m.policy_revision, "policy": policy},
        }))
        report_sha = ctx.store.put_bytes(report.to_json().encode())
        page_sha = ctx.store.put_bytes(render_calibration_page(report).encode())  # stored once (docs/report.md)
        job.status, job.stage, job.progress, job.finished_at, job.error = JobStatus.SUCCEEDED, None, 1.0, now, None
        job.timings, job.report_sha256, job.report_html_sha256 = timings, report_sha, page_sha
        job.params = {**params, "result_revision": rev.revision, "applied": apply}
        audit.record(session, job.tenant_id, "worker", "policy.revised", f"model:{m.id}/policy:{rev.revision}", {
            "source": "calibration", "job_id": job.id, "revision": rev.revision, "previous": previous,
            "applied": apply, "pinned": m.policy_pinned, "policy": policy,
            "search": scores["search"], "check": scores["check"], "cost_retrains": scores["cost_retrains"]})
        audit.record(session, job.tenant_id, "worker", "job.succeeded", f"job:{job.id}", {
            "kind": "calibration", "model_id": m.id, "base_version": base_number, "revision": rev.revision,
            "applied": apply, "attempts": job.attempts, "report_sha256": report_sha,
            "report_html_sha256": page_sha})
    log.info("calibration job %s: policy revision %s of model %s (%s)", lease.job_id, rev.revision, model.id,
             "applied" if apply else "recorded, not applied: the policy is pinned")


__all__ = ["STAGES", "run_calibration", "study_name"]

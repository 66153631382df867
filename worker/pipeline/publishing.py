"""The ``publishing`` stage: the new checkpoint, the report and its page are stored as artifacts, then one
fenced transaction publishes the version (``parent_version`` = the base), moves ``latest`` (and
``production`` when the guardrails passed), records the forgotten samples, completes the requests
(and the requests elsewhere whose samples were all linked to requests now completed), finishes the
job and appends the audit-log entries. A job whose version an earlier attempt published only
finishes that bookkeeping (``finish_published``): never a second version.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from service.core.models import ForgottenSample, Job, Model, ModelAlias, ModelVersion, utcnow
from service.core.repo import audit as audit_log
from service.core.repo import models as model_repo
from service.core.repo import requests
from service.core.statuses import JobStatus, VersionStatus

from ..context import WorkerContext
from ..proxy_cache import CachedProxy
from ..report import render_job_page
from .auditing import AuditResult
from .lease import Lease
from .loading import ForgetEntry, Loaded, forget_set
from .progress import Progress
from .report import Checkpoint, ReportInputs, RunFacts, build_report, canonical_json, clean, device_name, sha256_text
from .unlearning import Unlearned

log = logging.getLogger("unlearnd.worker")


@dataclass(frozen=True)
class Published:
    version: int
    base_version: int
    guardrails_passed: bool
    checkpoint: Checkpoint
    report_sha256: str
    report_html_sha256: str
    aliases_moved: list[str]


def store_checkpoint(ctx: WorkerContext, model) -> Checkpoint:
    """The weights as a safetensors artifact."""
    from worker.engine import architectures

    with tempfile.TemporaryDirectory(prefix="unlearnd-job-") as tmp:
        path = Path(tmp) / "weights.safetensors"
        architectures.save_weights(model, path)
        sha = ctx.store.put_file(path)
    return Checkpoint(sha, ctx.store.size(sha))


def publish(ctx: WorkerContext, lease: Lease, progress: Progress, loaded: Loaded, proxy: CachedProxy,
            unlearned: Unlearned, audited: AuditResult) -> Published:
    record, runtime = loaded.record, loaded.inputs.runtime
    checkpoint = store_checkpoint(ctx, unlearned.model)
    # what ran: the policy, and the corrective step's method when rows with wrong labels took it
    config = {**unlearned.result.config, "proxy": proxy.name, "proxy_params": proxy.params,
              "seed": loaded.policy.seed}
    now = utcnow()
    run = RunFacts(attempt=lease.token, worker=lease.worker, device=device_name(runtime),
                   timings=progress.timings(), finished_at=now)
    inputs = ReportInputs(record=record, run=run, proxy=proxy, result=unlearned.result, config=config,
                          audit=audited, checkpoint=checkpoint, recipe=loaded.inputs.recipe.to_dict())
    report = build_report(inputs)
    stored = report.to_json()
    report_sha = ctx.store.put_bytes(stored.encode())
    # the page is rendered once, here, and stored: its sha256 goes into the job and the audit log, so the
    # page a reader signs is the one recorded (docs/report.md)
    page_sha = ctx.store.put_bytes(render_job_page(report).encode())
    metrics = clean({**audited.metrics(), "guardrails": audited.guardrails, "per_bin": json.loads(stored)["bins"],
                     "runtime": runtime.describe()})
    published = Published(version=record.next_version, base_version=record.base.version,
                          guardrails_passed=audited.passed, checkpoint=checkpoint, report_sha256=report_sha,
                          report_html_sha256=page_sha, aliases_moved=inputs.aliases_moved)
    forget = record.forget_set.entries
    with ctx.db.transaction() as session:
        job = lease.lock_job(session)
        session.scalar(select(Model.id).where(Model.id == record.model.id).with_for_update())
        newest = session.scalar(select(func.max(ModelVersion.version))
                                .where(ModelVersion.model_id == record.model.id)) or 0
        if newest + 1 != published.version:
            raise RuntimeError(f"model {record.model.id} got version {newest} while this job ran (expected to "
                               f"publish {published.version})")
        n_forgotten = (session.scalar(select(func.count()).select_from(ForgottenSample)
                                      .where(ForgottenSample.model_id == record.model.id)) or 0) + len(forget)
        session.add(ModelVersion(
            model_id=record.model.id, version=published.version, status=VersionStatus.READY,
            parent_version=published.base_version, job_id=job.id, checkpoint_sha256=checkpoint.sha256,
            checkpoint_size=checkpoint.size_bytes, method=unlearned.result.method, config=clean(config),
            metrics=metrics, seconds=progress.total(), n_forgotten=n_forgotten, created_at=now, updated_at=now))
        session.flush()
        moved = bookkeeping(session, job, published.version, forget, published.guardrails_passed, now)
        job.timings = run.timings
        job.report_sha256, job.report_html_sha256 = report_sha, page_sha
        audit_log.record(session, job.tenant_id, "worker", "version.published",
                         f"model:{record.model.id}/version:{published.version}", {
            "job_id": job.id, "base_version": published.base_version, "new_version": published.version,
            "method": unlearned.result.method, "config_sha256": sha256_text(canonical_json(config)),
            "n_forget": len(forget), "n_forgotten_total": n_forgotten,
            "forget_set_sha256": report.forget_set.sample_ids_sha256,
            "guardrails_passed": published.guardrails_passed, "aliases_moved": moved,
            "checkpoint_sha256": checkpoint.sha256, "report_sha256": report_sha,
            "report_html_sha256": page_sha})
        audit_log.record(session, job.tenant_id, "worker", "job.succeeded", f"job:{job.id}", {
            "model_id": record.model.id, "base_version": published.base_version, "new_version": published.version,
            "requests": [r.id for r in record.requests], "n_forget": len(forget), "attempts": job.attempts,
            "seconds": round(progress.total(), 3)})
    log.info("job %s: published version %s of model %s (base %s, %d forgotten, guardrails %s)", lease.job_id,
             published.version, record.model.id, published.base_version, len(forget),
             "passed" if published.guardrails_passed else "broken")
    return published


def bookkeeping(session: Session, job: Job, version: int, forget: list[ForgetEntry], passed: bool,
                now: dt.datetime) -> list[str]:
    """Everything after the version row; idempotent (a resumed job runs it again). Returns the
    aliases moved."""
    model_id = job.model_id
    moved = []
    latest = session.get(ModelAlias, (model_id, "latest"))
    if latest is None or latest.version <= version:
        model_repo.move_alias(session, model_id, "latest", version)
        moved.append("latest")
    if passed:
        model_repo.move_alias(session, model_id, "production", version)
        moved.append("production")
    have = set(session.scalars(select(ForgottenSample.row).where(ForgottenSample.model_id == model_id,
                                                                 ForgottenSample.job_id == job.id)))
    new = [{"model_id": model_id, "row": e.row, "sample_id": e.sample_id, "version": version, "job_id": job.id,
            "request_id": e.request_id, "created_at": now} for e in forget if e.row not in have]
    for start in range(0, len(new), 5000):
        session.execute(insert(ForgottenSample), new[start:start + 5000])
    requests.complete_job(session, job.id, version, now)
    requests.complete_linked(session, model_id, now)
    job.status, job.stage, job.progress = JobStatus.SUCCEEDED, None, 1.0
    job.result_version, job.finished_at, job.error = version, now, None
    session.flush()
    return moved


def finish_published(ctx: WorkerContext, lease: Lease) -> str:
    """An earlier attempt published this job's version: finish the bookkeeping, publish nothing."""
    with ctx.db.transaction() as session:
        job = lease.lock_job(session)
        version = session.scalar(select(ModelVersion).where(ModelVersion.job_id == job.id))
        forget = forget_set(session, job.id, job.model_id).entries
        passed = bool(((version.metrics or {}).get("guardrails") or {}).get("passed"))
        moved = bookkeeping(session, job, version.version, forget, passed, utcnow())
        audit_log.record(session, job.tenant_id, "worker", "job.succeeded", f"job:{job.id}", {
            "model_id": job.model_id, "base_version": version.parent_version, "new_version": version.version,
            "n_forget": len(forget), "attempts": job.attempts, "resumed": True, "aliases_moved": moved})
    return JobStatus.SUCCEEDED.value


__all__ = ["Published", "bookkeeping", "finish_published", "publish", "store_checkpoint"]

"""The job pipeline: run one claimed deletion job, from its requests to a published model version.

``run_job(ctx, job_id)`` is what the Celery task calls for a job the batcher created (status
``queued``, its requests ``batched``). It

1. **claims** the job in one transaction (``queued``, or ``running`` with a heartbeat older than
   ``job_stale_after_s``: its worker was killed), bumping ``attempts``. Nothing to claim (another
   worker has it, or it is finished) → returns None: duplicate deliveries are no-ops. The claimed
   ``attempts`` value is the *fencing token*: every later write of this run checks it, so a worker
   that lost its job to a takeover can never publish or overwrite anything;
2. **resumes** a job whose version is already published (a ``model_versions`` row with this
   ``job_id``): only the bookkeeping is finished, never a second version;
3. runs the stages ``loading → proxies → refining → unlearning → auditing → publishing`` with a
   heartbeat thread, throttled progress writes (stage, 0..1 over the whole job) and cooperative
   cancellation (``jobs.cancel_requested``, read at most once per second inside the engine's loops
   and afresh at every stage boundary), recording per-stage seconds in ``jobs.timings``;
4. **publishes** in one transaction: the version (``parent_version`` = base), ``latest`` (and
   ``production`` when the guardrails passed), ``forgotten_samples``, the requests (``completed``,
   plus requests elsewhere whose samples were all linked to requests now completed), the job, and
   the audit-log entries. The report JSON (schema ``unlearnd.report/1``) is stored before it.

Cancellation publishes nothing and puts the requests back to ``received`` (they are batched
again). Any other error fails the job (``error`` names type, message and stage) and puts each
request back to ``received``, or to ``failed`` once it took part in ``max_request_attempts``
jobs; it is logged, never re-raised (the task must be acknowledged).

The cumulative forget set: every row in ``forgotten_samples`` of the model (earlier jobs) stays
out of every retain set (``excluded_rows`` of the engine, and the audit's retain view).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import and_, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from service.core.models import (
    Dataset,
    DeletionRequest,
    DeletionRequestSample,
    ForgottenSample,
    Job,
    Model,
    ModelAlias,
    ModelVersion,
    utcnow,
)
from service.core.policy import Policy
from service.core.repo import audit
from service.core.repo import models as model_repo
from service.core.repo.common import iso
from service.core.repo.deletions import ERASURE_DEADLINE

from . import proxy_cache, registration
from .context import WorkerContext

log = logging.getLogger("unlearnd.worker")

REPORT_SCHEMA = "unlearnd.report/1"
STAGES = ("loading", "proxies", "refining", "unlearning", "auditing", "publishing")
# Where each stage sits on the job's progress bar (0..1). With a retrain reference, auditing
# (which trains it) takes the larger share.
SPANS = {"loading": (0.0, 0.05), "proxies": (0.05, 0.15), "refining": (0.15, 0.17), "unlearning": (0.17, 0.75),
         "auditing": (0.75, 0.95), "publishing": (0.95, 1.0)}
SPANS_WITH_REFERENCE = {**SPANS, "unlearning": (0.17, 0.45), "auditing": (0.45, 0.95)}
PROGRESS_EVERY_S = 1.0  # at most one progress write per second
CANCEL_POLL_S = 1.0  # at most one read of jobs.cancel_requested per second (inside a stage)
MAX_CONFIDENCE_TEST = 2000  # test rows whose confidence goes in the report (a fixed-seed subsample)
TERMINAL_REQUEST = ("completed", "failed", "rejected")
ACTIVE_REQUEST = ("batched", "processing")
MIA_ATTACK = ("SVC on the true-label confidence (shadow-in: retain rows, shadow-out: test rows); "
              "efficacy = share of forget rows predicted non-member")


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Lost(Exception):
    """This run no longer owns the job (taken over after a stale heartbeat, or finished elsewhere)."""


# --------------------------------------------------------------------------- entry point


def run_job(ctx: WorkerContext, job_id: int, *, worker_name: str | None = None) -> str | None:
    """Run job ``job_id`` to its end; return its final status, or None if this call did nothing
    (not claimable: running elsewhere or finished; or lost to a takeover while running)."""

    worker_name = worker_name or default_worker_name()
    claim = _claim(ctx, job_id, worker_name)
    if claim is None:
        log.info("job %s: not claimable (running elsewhere or finished); nothing to do", job_id)
        return None
    log.info("job %s: claimed by %s (attempt %d)", job_id, worker_name, claim.token)
    tracker = _Tracker(ctx, claim)
    if claim.published is not None:
        log.warning("job %s: version %s was already published by an earlier attempt; finishing bookkeeping",
                    job_id, claim.published)
        try:
            return _finish_published(ctx, tracker)
        except _Lost:
            return None
        except Exception:  # never fail a published job: the next delivery after job_stale_after_s tries again
            log.exception("job %s: could not finish the bookkeeping of version %s", job_id, claim.published)
            return None
    return run_claimed(ctx, tracker, _execute, f"job {job_id}")


def run_claimed(ctx: WorkerContext, tracker: _Tracker, execute, label: str) -> str | None:
    """Run ``execute(ctx, tracker)`` for a claimed job with its heartbeat; a cancellation or an error
    is recorded on the job (never re-raised: the task must be acknowledged); a run that lost the job
    to another worker stops without writing. Shared by deletion and calibration jobs."""
    from worker.engine.errors import Cancelled

    try:
        if tracker.claim.cancel_requested:
            return _cancel(ctx, tracker, "canceled before it started", started=False)
        tracker.start_heartbeat()
        return execute(ctx, tracker)
    except _Lost:
        log.warning("%s: lost to another worker (attempt %d is no longer current); stopping", label,
                    tracker.claim.token)
        return None
    except Cancelled as exc:
        try:
            return _cancel(ctx, tracker, str(exc))
        except _Lost:
            return None
        except Exception:
            log.exception("%s: could not record the cancellation", label)
            return None
    except Exception as exc:
        log.exception("%s failed during %s", label, tracker.stage)
        try:
            return _fail(ctx, tracker, exc)
        except _Lost:
            return None
        except Exception:
            log.exception("%s: could not record the failure", label)
            return None
    finally:
        tracker.stop_heartbeat()


# --------------------------------------------------------------------------- claim, heartbeat, progress


@dataclass
class _Claim:
    job_id: int
    token: int  # jobs.attempts after the claim
    worker: str
    tenant_id: int
    model_id: int
    cancel_requested: bool
    published: int | None  # version number already published by this job


def _claim(ctx: WorkerContext, job_id: int, worker: str, *, kind: str = "deletion") -> _Claim | None:
    """Claim a job of ``kind``: queued, or running with a stale heartbeat. A calibration is claimed
    only as the oldest active job of its model (a deletion job ahead of it finishes first)."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=ctx.settings.job_stale_after_s)
    cond = [Job.id == job_id, Job.kind == kind, or_(
        Job.status == "queued",
        and_(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale)))]
    if kind != "deletion":
        other = aliased(Job)
        cond.append(~exists().where(other.model_id == Job.model_id, other.id < Job.id,
                                    other.status.in_(("queued", "running"))))
    with ctx.db.transaction() as s:
        done = s.execute(
            update(Job).where(*cond)
            .values(status="running", attempts=Job.attempts + 1, worker=worker, heartbeat_at=now,
                    started_at=func.coalesce(Job.started_at, now), stage="loading")
            .execution_options(synchronize_session=False))
        if done.rowcount != 1:
            return None
        job = s.execute(select(Job.tenant_id, Job.model_id, Job.attempts, Job.cancel_requested)
                        .where(Job.id == job_id)).one()
        s.execute(update(DeletionRequest).where(DeletionRequest.job_id == job_id, DeletionRequest.status == "batched")
                  .values(status="processing", updated_at=now))
        published = s.scalar(select(ModelVersion.version).where(ModelVersion.job_id == job_id))
    return _Claim(job_id, job.attempts, worker, job.tenant_id, job.model_id, bool(job.cancel_requested), published)


class _Tracker:
    """Stage, timings, throttled progress writes, cancellation polls and the heartbeat of one run."""

    def __init__(self, ctx: WorkerContext, claim: _Claim):
        self.ctx, self.claim = ctx, claim
        self.spans = SPANS
        self.stage = "loading"
        self.t0 = self._stage_t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.lost = False
        self._last_write = -math.inf
        self._last_poll = -math.inf
        self._cancel = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # fencing: every write of this run names the job, its status and the claimed attempt
    def fenced(self, stmt):
        return stmt.where(Job.id == self.claim.job_id, Job.status == "running", Job.attempts == self.claim.token)

    def lock_job(self, s: Session) -> Job:
        """The job row, locked (PostgreSQL) for the final transaction; raises _Lost if not ours."""
        job = s.scalar(select(Job).where(Job.id == self.claim.job_id).with_for_update())
        if job is None or job.status != "running" or job.attempts != self.claim.token:
            raise _Lost
        return job

    def enter(self, stage: str) -> None:
        self._close_stage()
        self.stage = stage
        self.check(force=True)
        self._write(self.spans[stage][0], force=True)

    def _close_stage(self) -> None:
        now = time.perf_counter()
        self.timings[self.stage] = round(self.timings.get(self.stage, 0.0) + now - self._stage_t0, 4)
        self._stage_t0 = now

    def final_timings(self) -> dict[str, float]:
        self._close_stage()
        return {**self.timings, "total": round(time.perf_counter() - self.t0, 4)}

    def total(self) -> float:
        return time.perf_counter() - self.t0

    def _write(self, fraction: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_EVERY_S:
            return
        self._last_write = now
        with self.ctx.db.transaction() as s:
            done = s.execute(self.fenced(update(Job)).values(stage=self.stage, progress=float(fraction)))
        if done.rowcount != 1:
            self.lost = True
            raise _Lost

    def progress(self, _stage: str, fraction: float) -> None:
        """The engine's progress callback (fraction of the whole job; the engine's stage names are
        its own, the job's stage is ours)."""
        if self.lost:
            raise _Lost
        self._write(fraction)

    def cancel_requested(self) -> bool:
        now = time.monotonic()
        if now - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = now
            with self.ctx.db.session() as s:
                self._cancel = bool(s.scalar(select(Job.cancel_requested).where(Job.id == self.claim.job_id)))
        return self._cancel

    def check(self, force: bool = False) -> None:
        from worker.engine.errors import Cancelled

        if self.lost:
            raise _Lost
        if force:
            self._last_poll = -math.inf
        if self.cancel_requested():
            raise Cancelled(f"canceled during {self.stage}")

    def run_context(self, start: float = 0.0, end: float = 1.0):
        """A RunContext over [start, end] of the current stage's slice of the progress bar."""
        from worker.engine.runtime import RunContext

        a, b = self.spans[self.stage]
        return RunContext(progress=self.progress, cancel_requested=self.cancel_requested,
                          start=a + (b - a) * start, end=a + (b - a) * end, stage=self.stage)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"job-{self.claim.job_id}-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _beat(self) -> None:
        while not self._stop.wait(self.ctx.settings.job_heartbeat_s):
            try:
                with self.ctx.db.transaction() as s:
                    done = s.execute(self.fenced(update(Job)).values(heartbeat_at=utcnow()))
                if done.rowcount != 1:
                    self.lost = True
                    return
            except Exception:  # a database blip: the next beat tries again
                log.warning("job %s: heartbeat failed", self.claim.job_id, exc_info=True)


# --------------------------------------------------------------------------- what a job reads


@dataclass
class _ForgetEntry:
    row: int
    sample_id: str
    request_id: int


@dataclass
class _State:
    job: Job
    model: Model
    dataset: Dataset
    base: ModelVersion
    requests: list[DeletionRequest]
    samples: list[tuple[int, int, str, int | None]]  # (request_id, row, sample_id, linked_request_id)
    forget: list[_ForgetEntry]  # sorted by row
    excluded: list[int]  # rows forgotten by earlier jobs (cumulative), sorted
    already_forgotten: int  # unlinked rows of this job that earlier jobs forgot already (dropped)
    next_version: int


def _forget_set(s: Session, job_id: int, model_id: int
                ) -> tuple[list[tuple[int, int, str, int | None]], list[_ForgetEntry], list[int], int]:
    """The job's samples, its forget set (unlinked rows, deduplicated, minus rows earlier jobs forgot),
    the cumulative excluded rows, and how many unlinked rows were dropped as already forgotten."""
    samples = [tuple(r) for r in s.execute(
        select(DeletionRequestSample.request_id, DeletionRequestSample.row, DeletionRequestSample.sample_id,
               DeletionRequestSample.linked_request_id)
        .join(DeletionRequest, DeletionRequest.id == DeletionRequestSample.request_id)
        .where(DeletionRequest.job_id == job_id)
        .order_by(DeletionRequestSample.row, DeletionRequestSample.request_id))]
    forgotten = s.execute(select(ForgottenSample.row, ForgottenSample.job_id)
                          .where(ForgottenSample.model_id == model_id)).all()
    excluded = sorted(r.row for r in forgotten if r.job_id != job_id)
    excluded_set = set(excluded)
    forget: dict[int, _ForgetEntry] = {}
    dropped = set()
    for request_id, row, sample_id, linked in samples:
        if linked is not None or row in forget:
            continue
        if row in excluded_set:
            dropped.add(row)
            continue
        forget[row] = _ForgetEntry(row, sample_id, request_id)
    return samples, sorted(forget.values(), key=lambda e: e.row), excluded, len(dropped)


def base_version(s: Session, job: Job, model: Model) -> ModelVersion:
    """The version a job starts from, fixed on the job at its first attempt: the model's ``latest``
    (else its newest ready version)."""
    if job.base_version is not None:
        base = s.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id,
                                                   ModelVersion.version == job.base_version))
    else:
        alias = s.get(ModelAlias, (model.id, "latest"))
        base = s.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id,
                                                   ModelVersion.version == alias.version)) if alias else None
        if base is None or base.status != "ready":
            base = s.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id,
                                                       ModelVersion.status == "ready")
                            .order_by(ModelVersion.version.desc()).limit(1))
    if base is None or base.status != "ready":
        raise RuntimeError(f"model {model.id} has no ready version to unlearn from")
    job.base_version = base.version
    return base


def _load_state(ctx: WorkerContext, tr: _Tracker) -> _State:
    """Read what the job needs and fix its base version (the model's ``latest``), fenced."""
    with ctx.db.transaction() as s:
        job = tr.lock_job(s)
        model = s.get(Model, job.model_id)
        dataset = s.get(Dataset, model.dataset_id)
        base = base_version(s, job, model)
        requests = list(s.scalars(select(DeletionRequest).where(DeletionRequest.job_id == job.id)
                                  .order_by(DeletionRequest.id)))
        samples, forget, excluded, dropped = _forget_set(s, job.id, model.id)
        next_version = (s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id))
                        or 0) + 1
    return _State(job, model, dataset, base, requests, samples, forget, excluded, dropped, next_version)


# --------------------------------------------------------------------------- the pipeline


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


def recipe_of(model: Model, dataset: Dataset):
    """The model's recipe (worker/engine/recipe.py) on the dataset's training rows; the fields the
    registration inferred stay marked ``inferred``."""
    import dataclasses

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


def load_proxy(ctx: WorkerContext, tr: _Tracker, pol: Policy, model: Model, dataset: Dataset, base: ModelVersion,
               inputs: EngineInputs) -> proxy_cache.CachedProxy:
    """The memorization proxy of the base version (the ``proxies`` stage): from the cache, carried
    from an ancestor, or computed (worker/proxy_cache.py)."""
    from worker.engine.proxies import compute_proxy, default_proxy

    name = (proxy_cache.canonical(pol.proxy) if pol.proxy
            else default_proxy(inputs.events is not None, dataset.n_holdout > 0))
    params = dict(pol.proxy_params or {})

    def compute() -> tuple[np.ndarray, float]:
        res = compute_proxy(name, inputs.base, inputs.data, inputs.runtime, events=inputs.events,
                            ctx=tr.run_context(), **params)
        return res.values, res.seconds

    proxy = proxy_cache.get_or_compute(ctx, model_id=model.id, version=base.version, name=name,
                                       params=params, n_train=inputs.n_train, compute=compute)
    log.info("job %s: proxy %s (%s)", tr.claim.job_id, proxy.key, proxy.source)
    return proxy


def _execute(ctx: WorkerContext, tr: _Tracker) -> str:
    import torch

    from worker.engine import architectures, rum

    # ---- loading
    tr.enter("loading")
    st = _load_state(ctx, tr)
    if not st.forget:
        return _finish_empty(ctx, tr, st)
    pol = Policy.model_validate(st.job.policy)
    if pol.audit.reference == "retrain":
        tr.spans = SPANS_WITH_REFERENCE
    engine_policy = rum.parse_policy(registration.engine_policy(pol))
    inputs = load_inputs(ctx, st.model, st.dataset, st.base, [e.row for e in st.forget] + st.excluded)
    runtime, data, base, n_train = inputs.runtime, inputs.data, inputs.base, inputs.n_train
    tr.check()

    # ---- proxies
    tr.enter("proxies")
    proxy = load_proxy(ctx, tr, pol, st.model, st.dataset, st.base, inputs)

    # ---- refining: the forget, retain and excluded sets (RUM's bins are cut inside run_unlearning)
    tr.enter("refining")
    forget_rows = torch.tensor([e.row for e in st.forget], dtype=torch.long)
    excluded_rows = torch.tensor(st.excluded, dtype=torch.long)
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[forget_rows] = False
    if len(excluded_rows):
        keep[excluded_rows] = False
    forget_view = data.view("train", forget_rows)
    retain_view = data.view("train", keep.nonzero().squeeze(1))
    test_view = data.view("test")

    # ---- unlearning
    tr.enter("unlearning")
    result = rum.run_unlearning(copy.deepcopy(base), data, forget_rows, proxy.values, engine_policy, runtime,
                                tr.run_context(), excluded_rows=excluded_rows if len(excluded_rows) else None,
                                seed=pol.seed, recipe=inputs.recipe)
    after = result.model.eval()

    # ---- auditing
    tr.enter("auditing")
    audit_data = _audit(tr, pol, base, after, data, forget_view, retain_view, test_view, result, runtime,
                        inputs.recipe)

    # ---- publishing
    tr.enter("publishing")
    with tempfile.TemporaryDirectory(prefix="unlearnd-job-") as tmp:
        path = Path(tmp) / "weights.safetensors"
        architectures.save_weights(after, path)
        checkpoint_sha = ctx.store.put_file(path)
    checkpoint_size = ctx.store.size(checkpoint_sha)
    config = {**engine_policy.to_dict(), "proxy": proxy.name, "proxy_params": proxy.params, "seed": pol.seed}
    passed = audit_data["guardrails"]["passed"]
    aliases_moved = ["latest", "production"] if passed else ["latest"]
    now = utcnow()
    timings = tr.final_timings()
    report = _report(st, tr, runtime, proxy, result, config, audit_data, aliases_moved, checkpoint_sha,
                     checkpoint_size, timings, now)
    report["recipe"] = inputs.recipe.to_dict()
    report_sha = ctx.store.put_bytes(json.dumps(report, sort_keys=False, allow_nan=False).encode())
    metrics = _clean({"before": audit_data["before"], "after": audit_data["after"],
                      "reference": audit_data["reference"], "tow": audit_data["tow"],
                      "tow_mia": audit_data["tow_mia"], "tow_before": audit_data["tow_before"],
                      "guardrails": audit_data["guardrails"], "per_bin": report["bins"],
                      "runtime": runtime.describe()})
    publish = _Publish(version=st.next_version, base_version=st.base.version, method=result.method,
                       config=config, metrics=metrics, seconds=tr.total(), checkpoint_sha=checkpoint_sha,
                       checkpoint_size=checkpoint_size, passed=passed, timings=timings, report_sha=report_sha,
                       forget_sha=report["forget_set"]["sample_ids_sha256"], now=now)
    _publish(ctx, tr, st, publish)
    log.info("job %s: published version %s of model %s (base %s, %d forgotten, guardrails %s)", tr.claim.job_id,
             publish.version, st.model.id, st.base.version, len(st.forget), "passed" if passed else "broken")
    return "succeeded"


def _audit(tr: _Tracker, pol: Policy, base, after, data, forget_view, retain_view, test_view, result,
           runtime, recipe=None) -> dict[str, Any]:
    """Before/after (and reference) metrics, per-bin audit, per-class accuracy, confidences, guardrails."""
    import torch

    from worker.engine import metrics, rum
    from worker.engine.data import View
    from worker.engine.runtime import predict
    from worker.engine.unlearners import UnlearningTask, get_unlearner

    keys = ("acc_forget", "acc_retain", "acc_test", "mia", "mia_entropy")
    reference_model = None
    if pol.audit.reference == "retrain":
        task = UnlearningTask(forget=forget_view, retain=retain_view, num_classes=data.num_classes, seed=pol.seed,
                              recipe=recipe)
        reference_model = get_unlearner("retrain").unlearn(copy.deepcopy(base), task, runtime,
                                                           tr.run_context(0.0, 0.8)).eval()
        tr.check()
    models = {"before": base, "after": after, "reference": reference_model}
    out: dict[str, Any] = {}
    for key, model in models.items():
        if model is None:
            out[key] = None
            continue
        m = metrics.audit(model, forget_view, retain_view, test_view, runtime)
        out[key] = {k: m[k] for k in keys}
        tr.check()
    ref = out["reference"]
    out["tow"] = metrics.tow(out["after"], ref) if ref else None
    out["tow_mia"] = metrics.tow_mia(out["after"], ref) if ref else None
    out["tow_before"] = metrics.tow(out["before"], ref) if ref else None

    bins = result.bins
    out["bins_before"] = rum.bin_audit(base, data, bins, runtime, retain=retain_view)
    out["bins_after"] = rum.bin_audit(after, data, bins, runtime, retain=retain_view)
    tr.check()

    classes = list(range(data.num_classes))
    y_test = test_view.y.cpu()

    def per_class(model) -> list[float | None]:
        pred = predict(model, test_view, runtime).argmax(1)
        return [float((pred[y_test == c] == c).float().mean()) if bool((y_test == c).any()) else None
                for c in classes]

    out["per_class"] = {"classes": classes, "before": per_class(base), "after": per_class(after),
                        "reference": per_class(reference_model) if reference_model is not None else None}

    n_test = len(test_view)
    sub = test_view
    if n_test > MAX_CONFIDENCE_TEST:
        pick = np.sort(np.random.default_rng(0).choice(n_test, MAX_CONFIDENCE_TEST, replace=False))
        sub = View(test_view.split, test_view.index[torch.from_numpy(pick)])

    def confidence(model, view) -> list[float]:
        p = metrics.probabilities(model, view, runtime)
        return p.gather(1, view.y.cpu().view(-1, 1)).squeeze(1).double().tolist()

    out["confidence"] = {"forget_before": confidence(base, forget_view), "forget_after": confidence(after, forget_view),
                         "test_before": confidence(base, sub), "test_after": confidence(after, sub)}

    g = pol.guardrails
    test_drop = out["before"]["acc_test"] - out["after"]["acc_test"]
    retain_drop = out["before"]["acc_retain"] - out["after"]["acc_retain"]
    passed = (_ok(test_drop, g.max_test_drop)) and (_ok(retain_drop, g.max_retain_drop))
    out["guardrails"] = {"max_test_drop": g.max_test_drop, "max_retain_drop": g.max_retain_drop,
                         "test_drop": test_drop, "retain_drop": retain_drop, "passed": passed}
    return out


def _ok(drop: float, limit: float) -> bool:
    return not math.isfinite(drop) or drop <= limit + 1e-12


# --------------------------------------------------------------------------- the report


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars and arrays to Python, NaN and infinities to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def canonical_json(obj: Any) -> str:
    return json.dumps(_clean(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


def _request_entries(st: _State) -> list[dict]:
    by_request: dict[int, list[tuple[int, str, int | None]]] = {r.id: [] for r in st.requests}
    for request_id, row, sample_id, linked in st.samples:
        by_request.setdefault(request_id, []).append((row, sample_id, linked))
    out = []
    for r in st.requests:
        samples = by_request.get(r.id, [])
        out.append({"id": r.id, "reason": r.reason, "subject_hash": r.subject_hash, "received_at": iso(r.created_at),
                    "due_by": iso(_aware(r.created_at) + ERASURE_DEADLINE), "n_samples": r.n_samples,
                    "n_new_samples": sum(1 for _, _, linked in samples if linked is None),
                    "linked_to": sorted({linked for _, _, linked in samples if linked is not None})})
    return out


def _device(runtime) -> str:
    d = runtime.describe()
    return f"{d['device']} ({d['gpu']})" if d.get("gpu") else str(d["device"])


def _report(st: _State, tr: _Tracker, runtime, proxy: proxy_cache.CachedProxy, result, config: dict,
            a: dict, aliases_moved: list[str], checkpoint_sha: str, checkpoint_size: int, timings: dict,
            now: dt.datetime) -> dict:
    job, model, ds = st.job, st.model, st.dataset
    forget_rows = np.array([e.row for e in st.forget], dtype=np.int64)
    bins = []
    for step, before, after in zip(result.steps, a["bins_before"], a["bins_after"]):
        bins.append({"index": step.bin.index, "level": step.bin.level, "n": len(step.bin), "method": step.method,
                     "hparams": step.hparams, "seconds": step.seconds,
                     "before": {"acc_forget": before.get("acc_forget"), "mia": before.get("mia")},
                     "after": {"acc_forget": after.get("acc_forget"), "mia": after.get("mia")},
                     "run": step.run})
    report = {
        "schema": REPORT_SCHEMA,
        "job": {"id": job.id, "model_id": model.id, "model_name": model.name, "status": "succeeded",
                "base_version": st.base.version, "new_version": st.next_version, "attempts": tr.claim.token,
                "created_at": iso(job.created_at), "started_at": iso(job.started_at), "finished_at": iso(now),
                "timings": timings, "device": _device(runtime), "worker": tr.claim.worker,
                "policy_revision": job.policy_revision},
        "dataset": {"id": ds.id, "name": ds.name, "sha256": ds.sha256, "n_train": ds.n_train, "n_test": ds.n_test},
        "requests": _request_entries(st),
        "forget_set": {"n": len(st.forget), "n_excluded_before": len(st.excluded),
                       "sample_ids_sha256": sha256_text("\n".join(sorted(e.sample_id for e in st.forget)))},
        "method": result.method,
        "config": config,
        "config_sha256": sha256_text(canonical_json(config)),
        "seed": config["seed"],
        "proxy": {"name": proxy.name, "params": proxy.params, "source": proxy.source,
                  "compute_seconds": proxy.compute_seconds, "thresholds": result.thresholds,
                  "forget_values": proxy.values[forget_rows].tolist()},
        "bins": bins,
        "metrics": {"before": a["before"], "after": a["after"], "reference": a["reference"], "tow": a["tow"],
                    "tow_mia": a["tow_mia"], "tow_before": a["tow_before"]},
        "per_class_accuracy": a["per_class"],
        "confidence": a["confidence"],
        "guardrails": a["guardrails"],
        "aliases_moved": aliases_moved,
        "checkpoint": {"sha256": checkpoint_sha, "size_bytes": checkpoint_size},
        "mia_attack": MIA_ATTACK,
    }
    return _clean(report)


# --------------------------------------------------------------------------- final transactions


@dataclass
class _Publish:
    version: int
    base_version: int
    method: str
    config: dict
    metrics: dict
    seconds: float
    checkpoint_sha: str
    checkpoint_size: int
    passed: bool
    timings: dict
    report_sha: str
    forget_sha: str
    now: dt.datetime = field(default_factory=utcnow)


def _publish(ctx: WorkerContext, tr: _Tracker, st: _State, p: _Publish) -> None:
    """The version, aliases, forgotten samples, requests, job and audit entries: one transaction."""
    model_id = st.model.id
    with ctx.db.transaction() as s:
        job = tr.lock_job(s)
        s.scalar(select(Model.id).where(Model.id == model_id).with_for_update())
        number = (s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id))
                  or 0) + 1
        if number != p.version:
            raise RuntimeError(f"model {model_id} got version {number - 1} while this job ran (expected to publish "
                               f"{p.version})")
        n_forgotten = (s.scalar(select(func.count()).select_from(ForgottenSample)
                                .where(ForgottenSample.model_id == model_id)) or 0) + len(st.forget)
        version = ModelVersion(model_id=model_id, version=p.version, status="ready", parent_version=p.base_version,
                               job_id=job.id, checkpoint_sha256=p.checkpoint_sha, checkpoint_size=p.checkpoint_size,
                               method=p.method, config=_clean(p.config), metrics=p.metrics, seconds=p.seconds,
                               n_forgotten=n_forgotten, created_at=p.now, updated_at=p.now)
        s.add(version)
        s.flush()
        moved = _bookkeeping(s, job, p.version, st.forget, p.passed, p.now)
        job.timings = p.timings
        job.report_sha256 = p.report_sha
        audit.record(s, job.tenant_id, "worker", "version.published", f"model:{model_id}/version:{p.version}", {
            "job_id": job.id, "base_version": p.base_version, "new_version": p.version, "method": p.method,
            "config_sha256": sha256_text(canonical_json(p.config)), "n_forget": len(st.forget),
            "n_forgotten_total": n_forgotten, "forget_set_sha256": p.forget_sha, "guardrails_passed": p.passed,
            "aliases_moved": moved, "checkpoint_sha256": p.checkpoint_sha, "report_sha256": p.report_sha})
        audit.record(s, job.tenant_id, "worker", "job.succeeded", f"job:{job.id}", {
            "model_id": model_id, "base_version": p.base_version, "new_version": p.version,
            "requests": [r.id for r in st.requests], "n_forget": len(st.forget), "attempts": job.attempts,
            "seconds": round(p.seconds, 3)})


def _bookkeeping(s: Session, job: Job, version: int, forget: list[_ForgetEntry], passed: bool,
                 now: dt.datetime) -> list[str]:
    """Everything after the version row; idempotent (a resumed job runs it again). Returns the
    aliases moved."""
    model_id = job.model_id
    moved = []
    latest = s.get(ModelAlias, (model_id, "latest"))
    if latest is None or latest.version <= version:
        model_repo.move_alias(s, model_id, "latest", version)
        moved.append("latest")
    if passed:
        model_repo.move_alias(s, model_id, "production", version)
        moved.append("production")
    have = set(s.scalars(select(ForgottenSample.row).where(ForgottenSample.model_id == model_id,
                                                           ForgottenSample.job_id == job.id)))
    new = [{"model_id": model_id, "row": e.row, "sample_id": e.sample_id, "version": version, "job_id": job.id,
            "request_id": e.request_id, "created_at": now} for e in forget if e.row not in have]
    for start in range(0, len(new), 5000):
        s.execute(insert(ForgottenSample), new[start:start + 5000])
    s.execute(update(DeletionRequest).where(DeletionRequest.job_id == job.id,
                                            DeletionRequest.status.not_in(TERMINAL_REQUEST))
              .values(status="completed", result_version=version, completed_at=now, updated_at=now, error=None))
    _complete_linked(s, model_id, now)
    job.status, job.stage, job.progress = "succeeded", None, 1.0
    job.result_version, job.finished_at, job.error = version, now, None
    s.flush()
    return moved


def _complete_linked(s: Session, model_id: int, now: dt.datetime) -> list[int]:
    """Complete every open request whose samples are all linked to requests now completed (and
    that has no sample of its own): its samples were forgotten by the version its targets name."""
    target = aliased(DeletionRequest)
    done: list[int] = []
    while True:
        own = exists().where(DeletionRequestSample.request_id == DeletionRequest.id,
                             DeletionRequestSample.linked_request_id.is_(None))
        some = exists().where(DeletionRequestSample.request_id == DeletionRequest.id)
        open_target = (exists().where(DeletionRequestSample.request_id == DeletionRequest.id,
                                      DeletionRequestSample.linked_request_id == target.id,
                                      target.status != "completed"))
        ids = list(s.scalars(select(DeletionRequest.id).where(
            DeletionRequest.model_id == model_id, DeletionRequest.status.not_in(TERMINAL_REQUEST),
            some, ~own, ~open_target)))
        if not ids:
            return done
        for request_id in ids:
            version = s.scalar(select(func.max(target.result_version)).join(
                DeletionRequestSample, DeletionRequestSample.linked_request_id == target.id).where(
                DeletionRequestSample.request_id == request_id))
            s.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(
                status="completed", result_version=version, completed_at=now, updated_at=now, error=None))
        done += ids


def _finish_published(ctx: WorkerContext, tr: _Tracker) -> str:
    """A previous attempt published this job's version: finish the bookkeeping, publish nothing."""
    with ctx.db.transaction() as s:
        job = tr.lock_job(s)
        version = s.scalar(select(ModelVersion).where(ModelVersion.job_id == job.id))
        _, forget, _, _ = _forget_set(s, job.id, job.model_id)
        passed = bool(((version.metrics or {}).get("guardrails") or {}).get("passed"))
        now = utcnow()
        moved = _bookkeeping(s, job, version.version, forget, passed, now)
        audit.record(s, job.tenant_id, "worker", "job.succeeded", f"job:{job.id}", {
            "model_id": job.model_id, "base_version": version.parent_version, "new_version": version.version,
            "n_forget": len(forget), "attempts": job.attempts, "resumed": True, "aliases_moved": moved})
    return "succeeded"


def _finish_empty(ctx: WorkerContext, tr: _Tracker, st: _State) -> str:
    """Nothing left to unlearn (every new sample was forgotten by an earlier job meanwhile): publish
    no version. Such samples are linked to the request that forgot them (as the API links them on
    arrival); a request then covered by completed work completes with the newest version involved,
    the others go back to pending (all linked now: they complete when their linked requests do)."""
    now = utcnow()
    with ctx.db.transaction() as s:
        job = tr.lock_job(s)
        by_row = dict(s.execute(select(ForgottenSample.row, ForgottenSample.request_id).where(
            ForgottenSample.model_id == job.model_id, ForgottenSample.request_id.is_not(None))).all())
        for request_id, row, _, linked in st.samples:
            if linked is None and by_row.get(row) not in (None, request_id):
                s.execute(update(DeletionRequestSample).where(DeletionRequestSample.request_id == request_id,
                                                              DeletionRequestSample.row == row)
                          .values(linked_request_id=by_row[row]))
        completed = _complete_linked(s, job.model_id, now)
        for request_id in list(s.scalars(select(DeletionRequest.id).where(
                DeletionRequest.job_id == job.id, DeletionRequest.status.in_(ACTIVE_REQUEST)))):
            version = _covered_by(s, job.model_id, request_id)
            if version is not None:
                s.execute(update(DeletionRequest).where(DeletionRequest.id == request_id).values(
                    status="completed", result_version=version, completed_at=now, updated_at=now))
                completed.append(request_id)
        requeued = list(s.scalars(select(DeletionRequest.id).where(
            DeletionRequest.job_id == job.id, DeletionRequest.status.in_(ACTIVE_REQUEST))))
        s.execute(update(DeletionRequest).where(DeletionRequest.id.in_(requeued)).values(
            status="received", job_id=None, updated_at=now))
        job.status, job.stage, job.progress, job.finished_at = "succeeded", None, 1.0, now
        job.timings = tr.final_timings()
        audit.record(s, job.tenant_id, "worker", "job.succeeded", f"job:{job.id}", {
            "model_id": job.model_id, "base_version": st.base.version, "new_version": None, "n_forget": 0,
            "published": False, "completed": sorted(completed), "requeued": requeued})
    log.info("job %s: nothing left to unlearn (%d row(s) forgotten earlier); no version published",
             tr.claim.job_id, st.already_forgotten)
    return "succeeded"


def _covered_by(s: Session, model_id: int, request_id: int) -> int | None:
    """The version from which every sample of a request is forgotten (its own rows in
    ``forgotten_samples``, its linked requests completed), or None if some sample is not yet."""
    versions = []
    for row, linked in s.execute(select(DeletionRequestSample.row, DeletionRequestSample.linked_request_id)
                                 .where(DeletionRequestSample.request_id == request_id)):
        if linked is None:
            v = s.scalar(select(ForgottenSample.version).where(ForgottenSample.model_id == model_id,
                                                               ForgottenSample.row == row))
        else:
            v = s.scalar(select(DeletionRequest.result_version).where(DeletionRequest.id == linked,
                                                                      DeletionRequest.status == "completed"))
        if v is None:
            return None
        versions.append(v)
    return max(versions) if versions else None


def _cancel(ctx: WorkerContext, tr: _Tracker, why: str, *, started: bool = True) -> str:
    """Publish nothing; the requests go back to pending. ``stage`` keeps where it stopped (None if
    it never started)."""
    now = utcnow()
    with ctx.db.transaction() as s:
        job = tr.lock_job(s)
        requests = list(s.scalars(select(DeletionRequest.id).where(DeletionRequest.job_id == job.id,
                                                                   DeletionRequest.status.in_(ACTIVE_REQUEST))))
        s.execute(update(DeletionRequest).where(DeletionRequest.id.in_(requests)).values(
            status="received", job_id=None, updated_at=now))
        stage = tr.stage if started else None
        job.status, job.finished_at, job.timings, job.stage = "canceled", now, tr.final_timings(), stage
        audit.record(s, job.tenant_id, "worker", "job.canceled", f"job:{job.id}", {
            "model_id": job.model_id, "stage": stage, "reason": why, "requests": requests, "attempts": job.attempts})
    log.info("job %s: canceled during %s; %d request(s) back to pending", tr.claim.job_id, stage, len(requests))
    return "canceled"


def _fail(ctx: WorkerContext, tr: _Tracker, exc: BaseException) -> str:
    now = utcnow()
    error = {"type": type(exc).__name__, "message": str(exc)[:2000], "stage": tr.stage}
    limit = ctx.settings.max_request_attempts
    with ctx.db.transaction() as s:
        job = tr.lock_job(s)
        active = (DeletionRequest.job_id == job.id) & DeletionRequest.status.in_(ACTIVE_REQUEST)
        s.execute(update(DeletionRequest).where(active).values(attempts=DeletionRequest.attempts + 1,
                                                               updated_at=now))
        failed = list(s.scalars(select(DeletionRequest.id).where(active, DeletionRequest.attempts >= limit)))
        s.execute(update(DeletionRequest).where(DeletionRequest.id.in_(failed)).values(
            status="failed", error={**error, "job_id": job.id}))
        if failed:  # requests waiting on a failed one carry their samples themselves from now on
            waiting = select(DeletionRequest.id).where(DeletionRequest.status.in_(("received",) + ACTIVE_REQUEST))
            s.execute(update(DeletionRequestSample).where(DeletionRequestSample.linked_request_id.in_(failed),
                                                          DeletionRequestSample.request_id.in_(waiting))
                      .values(linked_request_id=None))
        requeued = list(s.scalars(select(DeletionRequest.id).where(active)))
        s.execute(update(DeletionRequest).where(DeletionRequest.id.in_(requeued)).values(
            status="received", job_id=None))
        job.status, job.finished_at, job.error, job.timings = "failed", now, error, tr.final_timings()
        audit.record(s, job.tenant_id, "worker", "job.failed", f"job:{job.id}", {
            "model_id": job.model_id, "error": error, "attempts": job.attempts, "requests_failed": failed,
            "requests_requeued": requeued})
    return "failed"


__all__ = ["REPORT_SCHEMA", "STAGES", "default_worker_name", "run_job"]

"""The orchestration: claim a job, run its stages under a heartbeat, end it in exactly one way.

``run_job`` is the deletion job, read top to bottom like a recipe (``execute``); ``run_claimed``
is what every claimed job shares, deletion and calibration (worker/calibration.py): the
heartbeat, cancellation and failure recorded on the job (never re-raised: the task must be
acknowledged), and a run that lost its job to another worker stopping without a write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.core.statuses import JobStatus

from ..context import WorkerContext
from . import auditing, endings, loading, proxies, publishing, refining, unlearning
from .lease import Heartbeat, Lease, Lost, claim, default_worker_name
from .progress import SHUTDOWN, SPANS_WITH_REFERENCE, Progress

log = logging.getLogger("unlearnd.worker")

STAGES = ("loading", "proxies", "refining", "unlearning", "auditing", "publishing")

Execute = Callable[[WorkerContext, Lease, Progress], str]


def run_job(ctx: WorkerContext, job_id: int, *, worker_name: str | None = None) -> str | None:
    """Run deletion job ``job_id`` to its end; return its final status, or None if this call did
    nothing (not claimable: running elsewhere or finished; or lost to a takeover while running)."""
    worker_name = worker_name or default_worker_name()
    lease = claim(ctx, job_id, worker_name)
    if lease is None:
        log.info("job %s: not claimable (running elsewhere or finished); nothing to do", job_id)
        return None
    log.info("job %s: claimed by %s (attempt %d)", job_id, worker_name, lease.token)
    if lease.published is not None:
        log.warning("job %s: version %s was already published by an earlier attempt; finishing bookkeeping",
                    job_id, lease.published)
        try:
            return publishing.finish_published(ctx, lease)
        except Lost:
            return None
        except Exception:  # never fail a published job: the next delivery after job_stale_after_s tries again
            log.exception("job %s: could not finish the bookkeeping of version %s", job_id, lease.published)
            return None
    return run_claimed(ctx, lease, Progress(ctx, lease), execute, f"job {job_id}")


def execute(ctx: WorkerContext, lease: Lease, progress: Progress) -> str:
    """The deletion job's stages, each a function of typed values."""
    progress.enter("loading")
    record = loading.read_job(ctx, lease)
    if not record.forget_set.entries:
        return endings.finish_empty(ctx, lease, progress, record)
    loaded = loading.load(ctx, record)
    if loaded.policy.audit.reference == "retrain":
        progress.spans = SPANS_WITH_REFERENCE
    progress.check()

    progress.enter("proxies")
    proxy = proxies.find(ctx, progress, loaded)

    progress.enter("refining")
    sets = refining.refine(loaded)

    progress.enter("unlearning")
    unlearned = unlearning.unlearn(progress, loaded, proxy, sets)

    progress.enter("auditing")
    audited = auditing.audit(progress, loaded, sets, unlearned)

    progress.enter("publishing")
    publishing.publish(ctx, lease, progress, loaded, proxy, unlearned, audited)
    return JobStatus.SUCCEEDED.value


def run_claimed(ctx: WorkerContext, lease: Lease, progress: Progress, execute: Execute, label: str) -> str | None:
    """Run ``execute(ctx, lease, progress)`` for a claimed job with its heartbeat; a cancellation or
    an error is recorded on the job (never re-raised); a run that lost the job stops without writing."""
    from worker.engine.errors import Cancelled

    heartbeat = Heartbeat(ctx.db, lease, ctx.settings.job_heartbeat_s)
    try:
        if lease.cancel_requested:
            return endings.cancel(ctx, lease, progress, "canceled before it started", started=False)
        heartbeat.start()
        return execute(ctx, lease, progress)
    except Lost:
        log.warning("%s: lost to another worker (attempt %d is no longer current); stopping", label, lease.token)
        return None
    except Cancelled as exc:
        if SHUTDOWN.is_set() and not progress.cancel.requested(force=True):
            return _record(label, "the release", endings.release, ctx, lease, progress)
        return _record(label, "the cancellation", endings.cancel, ctx, lease, progress, str(exc))
    except Exception as exc:
        log.exception("%s failed during %s", label, progress.stage)
        return _record(label, "the failure", endings.fail, ctx, lease, progress, exc)
    finally:
        heartbeat.stop()


def _record(label: str, what: str, ending, *args) -> str | None:
    try:
        return ending(*args)
    except Lost:
        return None
    except Exception:
        log.exception("%s: could not record %s", label, what)
        return None


__all__ = ["STAGES", "Execute", "execute", "run_claimed", "run_job"]

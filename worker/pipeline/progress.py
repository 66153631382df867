"""What a running job shows and reads besides its lease: the stage it is in, per-stage seconds,
throttled progress writes, cancellation checks, and the bridge to the engine's RunContext.

Progress is one number (0..1 over the whole job); each stage owns a slice of it (``SPANS``). It is
written at most once per ``PROGRESS_EVERY_S`` (and at every stage boundary), fenced by the lease.
``jobs.cancel_requested`` is read at most once per ``CANCEL_POLL_S`` inside the engine's loops and
afresh at every stage boundary; a request raises the engine's ``Cancelled``.
"""

from __future__ import annotations

import math
import threading
import time

from sqlalchemy import select

from service.core.db import Database
from service.core.models import Job

from ..context import WorkerContext
from .lease import Lease

# Where each stage of a deletion job sits on its progress bar. With a retrain reference, auditing
# (which trains it) takes the larger share.
SPANS = {"loading": (0.0, 0.05), "proxies": (0.05, 0.15), "refining": (0.15, 0.17), "unlearning": (0.17, 0.75),
         "auditing": (0.75, 0.95), "publishing": (0.95, 1.0)}
SPANS_WITH_REFERENCE = {**SPANS, "unlearning": (0.17, 0.45), "auditing": (0.45, 0.95)}
PROGRESS_EVERY_S = 1.0  # at most one progress write per second
CANCEL_POLL_S = 1.0  # at most one read of jobs.cancel_requested per second (inside a stage)
# Set when this worker process is asked to stop (SIGTERM: Celery's warm shutdown, worker/tasks.py).
# A running job then stops at its next check and is released (queued again for another worker)
# rather than run to its end past the stop timeout or killed with it.
SHUTDOWN = threading.Event()


class StageClock:
    """Seconds spent in each stage (a stage entered twice adds up) and in the whole run."""

    def __init__(self, stage: str = "loading"):
        self.stage = stage
        self.started = self._stage_started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def switch(self, stage: str) -> None:
        self._close()
        self.stage = stage

    def _close(self) -> None:
        now = time.perf_counter()
        self.seconds[self.stage] = round(self.seconds.get(self.stage, 0.0) + now - self._stage_started, 4)
        self._stage_started = now

    def total(self) -> float:
        return time.perf_counter() - self.started

    def timings(self) -> dict[str, float]:
        """Per-stage seconds up to now, and ``total`` (what ``jobs.timings`` stores)."""
        self._close()
        return {**self.seconds, "total": round(self.total(), 4)}


class CancelWatch:
    """Reads ``jobs.cancel_requested`` at most once per ``CANCEL_POLL_S`` (or now, when forced)."""

    def __init__(self, db: Database, job_id: int):
        self.db, self.job_id = db, job_id
        self._last_poll = -math.inf
        self._requested = False

    def requested(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = now
            with self.db.session() as session:
                self._requested = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self._requested


class Progress:
    """The stage, progress and cancellation of one run of a job (its lease fences the writes)."""

    def __init__(self, ctx: WorkerContext, lease: Lease, spans: dict[str, tuple[float, float]] = SPANS):
        self.db, self.lease, self.spans = ctx.db, lease, spans
        self.clock = StageClock()
        self.cancel = CancelWatch(ctx.db, lease.job_id)
        self._last_write = -math.inf

    @property
    def stage(self) -> str:
        return self.clock.stage

    def enter(self, stage: str) -> None:
        """Start ``stage``: check for a cancellation and write where the job is."""
        self.clock.switch(stage)
        self.check(force=True)
        self.write(self.spans[stage][0], force=True)

    def write(self, fraction: float, force: bool = False) -> None:
        """Write the stage and ``fraction`` of the whole job (throttled unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_EVERY_S:
            return
        self._last_write = now
        self.lease.update(self.db, stage=self.stage, progress=float(fraction))

    def report(self, _engine_stage: str, fraction: float) -> None:
        """The engine's progress callback (fraction of the whole job; the engine's stage names are
        its own, the job's stage is ours)."""
        self.lease.check()
        self.write(fraction)

    def cancel_requested(self) -> bool:
        return SHUTDOWN.is_set() or self.cancel.requested()

    def check(self, force: bool = False) -> None:
        """Raise Lost when the lease is gone, the engine's Cancelled when a cancel was asked for or
        the worker is shutting down (run_claimed then releases the job instead of canceling it)."""
        from worker.engine.errors import Cancelled

        self.lease.check()
        if SHUTDOWN.is_set():
            raise Cancelled(f"worker shutting down during {self.stage}")
        if self.cancel.requested(force=force):
            raise Cancelled(f"canceled during {self.stage}")

    def run_context(self, start: float = 0.0, end: float = 1.0):
        """The engine's RunContext over [start, end] of the current stage's slice of the progress bar."""
        from worker.engine.runtime import RunContext

        low, high = self.spans[self.stage]
        return RunContext(progress=self.report, cancel_requested=self.cancel_requested,
                          start=low + (high - low) * start, end=low + (high - low) * end, stage=self.stage)

    def timings(self) -> dict[str, float]:
        return self.clock.timings()

    def total(self) -> float:
        return self.clock.total()


__all__ = ["CANCEL_POLL_S", "PROGRESS_EVERY_S", "SPANS", "SPANS_WITH_REFERENCE", "CancelWatch", "Progress",
           "StageClock"]

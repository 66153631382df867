"""The job pipeline: run one claimed deletion job, from its requests to a published model version.

``run_job(ctx, job_id)`` (run.py) is what the Celery task calls for a job the batcher created
(status ``queued``, its requests ``batched``). It

1. **claims** the job in one transaction (``queued``, or ``running`` with a heartbeat older than
   ``job_stale_after_s``: its worker was killed), bumping ``attempts`` (lease.py). Nothing to claim
   (another worker has it, or it is finished) → returns None: duplicate deliveries are no-ops. The
   claimed ``attempts`` value is the *fencing token*: every later write of this run checks it, so a
   worker that lost its job to a takeover can never publish or overwrite anything;
2. **resumes** a job whose version is already published (a ``model_versions`` row with this
   ``job_id``): only the bookkeeping is finished, never a second version (publishing.py);
3. runs the stages ``loading → proxies → refining → unlearning → auditing → publishing``, one
   function each (loading.py, proxies.py, refining.py, unlearning.py, auditing.py, publishing.py)
   taking and returning typed values, with a heartbeat thread (lease.py), throttled progress
   writes (stage, 0..1 over the whole job) and cooperative cancellation (``jobs.cancel_requested``,
   read at most once per second inside the engine's loops and afresh at every stage boundary),
   recording per-stage seconds in ``jobs.timings`` (progress.py);
4. **publishes** in one transaction: the version (``parent_version`` = base), ``latest`` (and
   ``production`` when the guardrails passed), ``forgotten_samples``, the requests (``completed``,
   plus requests elsewhere whose samples were all linked to requests now completed), the job, and
   the audit-log entries. The report JSON (``JobReport``, report.py) and the page
   rendered from it (worker/report/) are stored before it; their sha256 digests go into the job and
   the ``version.published`` audit entry.

Cancellation publishes nothing and puts the requests back to ``received`` (they are batched
again). Any other error fails the job (``error`` names type, message and stage) and puts each
request back to ``received``, or to ``failed`` once it took part in ``max_request_attempts``
jobs; it is logged, never re-raised (the task must be acknowledged) (endings.py). Every request
transition is made by service/core/repo/requests.py.

The cumulative forget set: every row in ``forgotten_samples`` of the model (earlier jobs) stays
out of every retain set (``excluded_rows`` of the engine, and the audit's retain view).
"""

from .lease import default_worker_name
from .report import REPORT_SCHEMA
from .run import STAGES, run_claimed, run_job

__all__ = ["REPORT_SCHEMA", "STAGES", "default_worker_name", "run_claimed", "run_job"]

"""The Celery application: configuration only, no torch (the API imports it to send tasks by name).

Queues: ``gpu`` for heavy work (registration checks, unlearning jobs, calibrations) and ``default`` for
bookkeeping (the sweeper, the transparency log's sequencer, webhook deliveries, the artifact store's
collector). Long tasks are acknowledged late with a prefetch of one, so a worker killed mid-task
leaves its message to be redelivered; the database stays the system of record and the sweeper
re-sends wake-ups that were lost anyway. CUDA is not fork-safe: workers run the solo (or threads)
pool, one process per GPU.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.core.settings import Settings

REGISTER_VERSION = "unlearnd.register_version"
RUN_JOB = "unlearnd.run_job"
RUN_CALIBRATION = "unlearnd.run_calibration"
SWEEP = "unlearnd.sweep"
SEQUENCE = "unlearnd.sequence"  # the transparency log's sequencer (service/core/repo/transparency.py)
DELIVER_WEBHOOKS = "unlearnd.deliver_webhooks"  # the webhook outbox (worker/webhooks.py)
COLLECT_ARTIFACTS = "unlearnd.collect_artifacts"  # the artifact store's collector (service/core/repo/blobs.py)
QUEUES = ("gpu", "default")
TASK_QUEUES = {REGISTER_VERSION: "gpu", RUN_JOB: "gpu", RUN_CALIBRATION: "gpu", SWEEP: "default", SEQUENCE: "default",
               DELIVER_WEBHOOKS: "default", COLLECT_ARTIFACTS: "default"}
JOB_TASKS = {"deletion": RUN_JOB, "calibration": RUN_CALIBRATION}  # jobs.kind → the task that runs it


def task_for_kind(kind: str) -> str:
    return JOB_TASKS[kind]


def make_celery(settings: Settings) -> Celery:
    app = Celery("unlearnd", broker=settings.broker, set_as_current=False)
    app.conf.update(
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="default",
        task_routes={name: {"queue": q} for name, q in TASK_QUEUES.items()},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # results live in the database
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings.broker),
        worker_hijack_root_logger=False,
        # a sequencer, webhook or collector run that waited longer than its interval is dropped: the next
        # one does its work
        beat_schedule={"sweep": {"task": SWEEP, "schedule": settings.sweep_interval_s},
                       "sequence": {"task": SEQUENCE, "schedule": settings.sequence_interval_s,
                                    "options": {"expires": settings.sequence_interval_s}},
                       "webhooks": {"task": DELIVER_WEBHOOKS, "schedule": settings.webhook_interval_s,
                                    "options": {"expires": settings.webhook_interval_s}},
                       "collect": {"task": COLLECT_ARTIFACTS, "schedule": settings.artifact_collect_interval_s,
                                   "options": {"expires": settings.artifact_collect_interval_s}}},
        timezone="UTC",
    )
    return app


def _transport_options(url: str) -> dict:
    if url.startswith("redis"):
        # A message not acked within this window is redelivered (long jobs ack late).
        return {"visibility_timeout": 6 * 3600}
    if url.startswith("sqla+sqlite"):
        # kombu hands these to create_engine: the API and the worker both write the broker file.
        return {"connect_args": {"timeout": 30}}
    return {}

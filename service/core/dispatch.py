"""Wake-ups to the workers, by task name. The database already holds the work: a lost wake-up
is re-sent by the sweeper, so a broker outage delays work but loses nothing."""

from __future__ import annotations

import logging
from functools import cached_property

from service.core.celery_app import TASK_QUEUES, make_celery
from service.core.settings import Settings

log = logging.getLogger("unlearnd.dispatch")


class Dispatcher:
    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def celery(self):
        return make_celery(self.settings)

    def send(self, task: str, *args) -> bool:
        try:
            self.celery.send_task(task, args=list(args), queue=TASK_QUEUES[task], retry=True,
                                  retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5})
            return True
        except Exception as exc:  # the sweeper will send it again
            log.warning("could not send %s%s to the broker: %s", task, tuple(args), exc)
            return False

    def ping(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

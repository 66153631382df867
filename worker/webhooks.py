"""Sending webhook messages from the outbox (service/core/repo/webhooks.py).

One run claims the due messages, POSTs each, signed as the Standard Webhooks specification says
(service/core/webhooks.py), from a small thread pool so that a slow endpoint does not hold the
others, and records every result: a 2xx delivers it; anything else (another status, a redirect, a
refused connection, a timeout) schedules the next attempt after an exponential backoff, until
``webhook_max_attempts``. Each attempt has a new timestamp and signature and the same
``webhook-id``. Nothing here raises: an endpoint cannot break the worker.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from service.core import webhooks as standard
from service.core.db import Database
from service.core.models import utcnow
from service.core.repo import webhooks
from service.core.settings import Settings

log = logging.getLogger("unlearnd.webhooks")
USER_AGENT = "unlearnd-webhooks/1"
MAX_ANSWER_BYTES = 64 << 10  # read (and drop) at most this much of an answer
LEASE_MARGIN_S = 60.0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer that is not 2xx: the message is not followed elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def post(attempt: webhooks.Attempt, timeout: float) -> tuple[int | None, str | None]:
    """One signed POST: (status code, None) when the endpoint answered, else (None or the status,
    why it failed)."""
    body = attempt.body.encode()
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "webhook-id": attempt.message_id,
               "webhook-timestamp": str(timestamp),
               "webhook-signature": standard.sign(attempt.secret, attempt.message_id, timestamp, body)}
    request = urllib.request.Request(attempt.url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            answer.read(MAX_ANSWER_BYTES)
            return answer.status, None
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, f"HTTP {exc.code}"
    except Exception as exc:  # refused, reset, timed out, a name that does not resolve, bad TLS…
        return None, f"{type(exc).__name__}: {exc}"[:500]


def deliver(db: Database, settings: Settings) -> dict:
    """One run: claim up to ``webhook_batch`` due messages, send them, record the results."""
    attempts = webhooks.claim(db, utcnow(), settings.webhook_batch, settings.webhook_timeout_s * 3 + LEASE_MARGIN_S)
    if not attempts:
        return {"sent": 0, "delivered": 0, "failed": 0}
    with ThreadPoolExecutor(max_workers=max(1, min(settings.webhook_concurrency, len(attempts))),
                            thread_name_prefix="unlearnd-webhook") as pool:
        results = list(pool.map(lambda a: post(a, settings.webhook_timeout_s), attempts))
    counts = {"sent": len(attempts), "delivered": 0, "failed": 0}
    now = utcnow()
    with db.transaction() as session:
        for attempt, (code, error) in zip(attempts, results, strict=True):
            status = webhooks.record_attempt(
                session, attempt, code, error, now, max_attempts=settings.webhook_max_attempts,
                retry_base_s=settings.webhook_retry_base_s, retry_max_s=settings.webhook_retry_max_s)
            if status in counts:
                counts[status] += 1
            if status == "failed":
                log.warning("webhook message %s to %s given up after %d attempt(s): %s", attempt.message_id,
                            attempt.url, attempt.attempt, error)
    return counts


__all__ = ["deliver", "post"]

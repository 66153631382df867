"""Webhook endpoints, the outbox and the delivery log.

Events become messages in the transaction that makes them: ``audit.record`` calls
:func:`emit_for_entry` for every entry it appends, and the entries that report an event
(``EVENTS_OF``) write one ``webhook_deliveries`` row per endpoint of the tenant that subscribed to
it. A change that rolls back takes its messages with it; one that commits cannot lose them. The
worker sends them (worker/webhooks.py) and records each attempt here (:func:`claim`,
:func:`record_attempt`): at least once, each retry with the same ``webhook-id``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import delete as sql_delete
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from service.core import webhooks
from service.core.auth import Caller
from service.core.db import Database, is_postgres
from service.core.errors import Conflict, invalid, not_found
from service.core.models import AuditEntry, Job, WebhookDelivery, WebhookEndpoint, utcnow
from service.core.repo import datasets
from service.core.repo.common import aware, iso, retire
from service.core.statuses import DeliveryStatus

OUTBOX_FLAG = "unlearnd.webhooks.written"  # in Session.info: this transaction wrote messages
# Audit-log actions that report an event, and which event.
EVENTS_OF = {"deletion_request.completed": "deletion_request.completed", "job.succeeded": "job.finished",
             "job.failed": "job.finished", "job.canceled": "job.finished", "version.published": "version.published",
             "version.purged": "version.purged"}
# The parts of an entry's resource ("model:3/version:2") as fields of the event's data.
RESOURCE_FIELDS = {"model": "model_id", "version": "version", "job": "job_id", "deletion_request": "request_id"}


# --- endpoints -------------------------------------------------------------------------------------

def create(session: Session, caller: Caller, *, url: str, event_types: list[str], secret: str | None,
           description: str | None, limit: int, box: webhooks.SecretBox,
           allow_private: bool = False) -> tuple[WebhookEndpoint, str]:
    """A new endpoint and its secret (the caller's, or a new one), which is stored encrypted with
    ``box``; at most ``limit`` per tenant (409 ``too-many-webhooks``); its URL as
    :func:`webhooks.check_url` says (``allow_private``: ``webhook_allow_private``)."""
    webhooks.check_url(url, allow_private=allow_private)
    event_types = _event_types(event_types)
    if secret is not None:
        webhooks.secret_key(secret)
    if session.scalar(select(func.count()).select_from(WebhookEndpoint)
                      .where(WebhookEndpoint.tenant_id == caller.tenant_id)) >= limit:
        raise Conflict(f"the tenant has {limit} webhook endpoints, the most it may have: remove one first",
                       title="Too many webhooks", kind="too-many-webhooks")
    secret = secret or webhooks.new_secret()
    row = WebhookEndpoint(tenant_id=caller.tenant_id, url=url, encrypted_secret=box.seal(secret, caller.tenant_id),
                          event_types=event_types, description=description, created_at=utcnow())
    session.add(row)
    session.flush()
    return row, secret


def _event_types(event_types: list[str]) -> list[str]:
    unknown = [e for e in event_types if e not in webhooks.EVENT_TYPES]
    if unknown or not event_types:
        raise invalid("events", f"must name one or more of {', '.join(webhooks.EVENT_TYPES)}")
    return list(dict.fromkeys(event_types))


UNCHANGED: object = object()  # update(): a field the caller left out


def update(session: Session, caller: Caller, endpoint_id: int, *, url: str | object = UNCHANGED,
           event_types: list[str] | object = UNCHANGED, description: str | None | object = UNCHANGED,
           allow_private: bool = False) -> WebhookEndpoint:
    """Change the fields given, each checked as :func:`create` checks it (Invalid naming the field,
    and nothing changed). Messages not sent yet go to the new URL; a message already written is sent
    even if the endpoint no longer subscribes to its event."""
    row = get(session, caller, endpoint_id)
    if url is not UNCHANGED:
        webhooks.check_url(url, allow_private=allow_private)  # type: ignore[arg-type]
    if event_types is not UNCHANGED:
        event_types = _event_types(event_types)  # type: ignore[arg-type]
    for name, value in (("url", url), ("event_types", event_types), ("description", description)):
        if value is not UNCHANGED:
            setattr(row, name, value)
    session.flush()
    return row


def rotate_secret(session: Session, caller: Caller, endpoint_id: int, *, box: webhooks.SecretBox,
                  grace_seconds: int = webhooks.DEFAULT_GRACE_S,
                  now: dt.datetime | None = None) -> tuple[WebhookEndpoint, str]:
    """A new secret for the endpoint, stored encrypted with ``box``: every attempt from now on is
    signed with it, retries of earlier messages included. For ``grace_seconds`` (0 to
    ``MAX_GRACE_S``; Invalid naming ``grace_seconds`` otherwise, and nothing changed) the secret it
    replaces signs each attempt too, after the new one; 0 drops it at once. Only one previous secret
    is kept: a rotation during a grace period replaces it with the secret just superseded. A current
    secret that ``box`` cannot open (encrypted under another key, altered) is not kept: it could
    not sign anyway, and rotating is how such an endpoint is mended."""
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int) or not (
            0 <= grace_seconds <= webhooks.MAX_GRACE_S):
        raise invalid("grace_seconds", f"must be a whole number of seconds from 0 to {webhooks.MAX_GRACE_S} "
                                       "(7 days)")
    row = get(session, caller, endpoint_id)
    previous = row.encrypted_secret if grace_seconds and _opens(box, row) else None
    secret = webhooks.new_secret()
    row.encrypted_secret = box.seal(secret, row.tenant_id)
    row.previous_encrypted_secret = previous
    row.previous_secret_expires_at = (
        (now or utcnow()) + dt.timedelta(seconds=grace_seconds) if previous is not None else None)
    session.flush()
    return row, secret


def _opens(box: webhooks.SecretBox, row: WebhookEndpoint) -> bool:
    try:
        box.open(row.encrypted_secret, row.tenant_id)
    except webhooks.SecretKeyError:
        return False
    return True


def drop_expired_secrets(db: Database, now: dt.datetime) -> int:
    """Forget the previous secrets whose grace period is over (the sweeper; they sign nothing any
    more either way: :func:`claim` leaves them out). Returns how many went."""
    with db.transaction() as session:
        return session.execute(
            WebhookEndpoint.__table__.update().where(WebhookEndpoint.previous_secret_expires_at <= now)
            .values(previous_encrypted_secret=None, previous_secret_expires_at=None)).rowcount


def get(session: Session, caller: Caller, endpoint_id: int) -> WebhookEndpoint:
    row = (session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id,
                                                        WebhookEndpoint.tenant_id == caller.tenant_id))
           if 0 < endpoint_id <= datasets.MAX_ID else None)
    if row is None:
        raise not_found(f"webhook {endpoint_id}")
    return row


def query(caller: Caller):
    return select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == caller.tenant_id)


def delete(session: Session, caller: Caller, endpoint_id: int) -> None:
    """The endpoint and its delivery log go; messages not sent yet are not sent."""
    row = get(session, caller, endpoint_id)
    session.delete(row)
    retire(session, WebhookEndpoint.__tablename__, [endpoint_id])


def render(e: WebhookEndpoint, *, secret: str | None = None, now: dt.datetime | None = None) -> dict:
    """The endpoint as the API shows it; ``secret`` (in clear) only in the answer that set it.
    ``previous_secret_expires_at``: when the superseded secret stops signing, null when none does."""
    out = {"id": e.id, "url": e.url, "events": e.event_types, "description": e.description,
           "created_at": iso(e.created_at), "previous_secret_expires_at": iso(grace_end(
               e.previous_encrypted_secret, e.previous_secret_expires_at, now or utcnow())),
           "links": {"self": f"/v1/webhooks/{e.id}", "deliveries": f"/v1/webhooks/{e.id}/deliveries"}}
    if secret is not None:
        out["secret"] = secret
    return out


def grace_end(previous: str | None, ends: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
    """When an endpoint's previous secret (as stored) stops signing, ``ends`` its
    ``previous_secret_expires_at``; None when it has none that still signs at ``now``."""
    if previous is None or ends is None:
        return None
    ends = aware(ends)  # SQLite gives it back naive (UTC)
    return ends if ends > now else None


# --- the outbox ------------------------------------------------------------------------------------

def emit_for_entry(session: Session, entry: AuditEntry) -> int:
    """The messages an audit-log entry reports, in its transaction (``audit.record`` calls this for
    every entry; most report nothing and cost nothing). Returns how many were written."""
    kind = EVENTS_OF.get(entry.action)
    if kind is None:
        return 0
    endpoints = list(session.execute(select(WebhookEndpoint.id, WebhookEndpoint.event_types)
                                     .where(WebhookEndpoint.tenant_id == entry.tenant_id)))
    if not endpoints:
        return 0
    n = 0
    for event_type, data in _events(session, entry, kind):
        n += _enqueue(session, entry.tenant_id, [i for i, types in endpoints if event_type in types], event_type,
                      data, entry.created_at)
    return n


def _events(session: Session, entry: AuditEntry, kind: str) -> list[tuple[str, dict]]:
    ids = {}
    for part in entry.resource.split("/"):
        name, _, value = part.partition(":")
        if name in RESOURCE_FIELDS and value.isdigit():
            ids[RESOURCE_FIELDS[name]] = int(value)
    data = {**ids, **entry.details, "audit_entry_id": entry.id}
    if kind != "job.finished":
        return [(kind, data)]
    job = session.get(Job, ids.get("job_id"))
    status = entry.action.removeprefix("job.")
    data = {**data, "status": status, "kind": job.kind if job else None,
            "model_id": data.get("model_id", job.model_id if job else None)}
    failed = [("deletion_request.failed", {"request_id": r, "job_id": data.get("job_id"),
                                           "model_id": data["model_id"], "error": entry.details.get("error"),
                                           "audit_entry_id": entry.id})
              for r in entry.details.get("requests_failed") or []]
    return [("job.finished", data), *failed]


def _enqueue(session: Session, tenant_id: int, endpoint_ids: list[int], event_type: str, data: dict,
             at: dt.datetime) -> int:
    if not endpoint_ids:
        return 0
    body = json.dumps({"type": event_type, "timestamp": iso(at), "data": data}, separators=(",", ":"),
                      default=str)
    now = utcnow()
    session.execute(WebhookDelivery.__table__.insert(), [
        {"tenant_id": tenant_id, "endpoint_id": i, "message_id": webhooks.new_message_id(), "event_type": event_type,
         "body": body, "status": DeliveryStatus.PENDING.value, "attempts": 0, "next_attempt_at": now,
         "created_at": now} for i in endpoint_ids])
    session.info[OUTBOX_FLAG] = True
    return len(endpoint_ids)


def send_test(session: Session, caller: Caller, endpoint_id: int) -> WebhookDelivery:
    """A ``webhook.test`` message to one endpoint (whatever its event types)."""
    endpoint = get(session, caller, endpoint_id)
    _enqueue(session, caller.tenant_id, [endpoint.id], webhooks.TEST_EVENT,
             {"webhook_id": endpoint.id, "message": "a test message from unlearnd"}, utcnow())
    return session.scalar(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
                          .order_by(WebhookDelivery.id.desc()).limit(1))


def wake_after_commit(db: Database, wake: Callable[[], object]) -> None:
    """Call ``wake`` (send the delivery task) after each transaction of ``db`` that wrote messages
    commits, so they go out now rather than at the next beat."""

    @event.listens_for(db.sessions, "after_commit")
    def _committed(session: Session) -> None:
        if session.info.pop(OUTBOX_FLAG, False):
            wake()

    @event.listens_for(db.sessions, "after_rollback")
    def _rolled_back(session: Session) -> None:
        session.info.pop(OUTBOX_FLAG, None)


# --- the delivery log ------------------------------------------------------------------------------

def deliveries(caller: Caller, endpoint_id: int, status: DeliveryStatus | None = None):
    q = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id,
                                      WebhookDelivery.tenant_id == caller.tenant_id)
    return q.where(WebhookDelivery.status == status) if status else q


def render_delivery(d: WebhookDelivery) -> dict:
    return {"id": d.id, "webhook_id": d.endpoint_id, "message_id": d.message_id, "event": d.event_type,
            "status": d.status, "attempts": d.attempts, "last_status_code": d.last_status_code,
            "last_error": d.last_error, "last_attempt_at": iso(d.last_attempt_at),
            "next_attempt_at": iso(d.next_attempt_at) if d.status == DeliveryStatus.PENDING else None,
            "created_at": iso(d.created_at), "delivered_at": iso(d.delivered_at), "payload": json.loads(d.body)}


# --- the worker's side -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    delivery_id: int
    attempt: int  # the delivery's attempts after this claim: the result is recorded only while it holds
    url: str
    tenant_id: int
    encrypted_secret: str = field(repr=False)  # as stored: the worker decrypts it (webhooks.SecretBox.open)
    message_id: str
    body: str
    # the secret a rotation superseded, while its grace period lasts (as stored; it signs second)
    previous_encrypted_secret: str | None = field(default=None, repr=False)


def claim(db: Database, now: dt.datetime, limit: int, lease_s: float) -> list[Attempt]:
    """Take up to ``limit`` due messages for one attempt each: the attempt is counted and the next
    one is set ``lease_s`` away, so that another worker leaves them alone meanwhile and a worker
    that dies mid-attempt leaves them to be sent again (at least once)."""
    with db.transaction() as session:
        q = (select(WebhookDelivery, WebhookEndpoint.url, WebhookEndpoint.encrypted_secret,
                    WebhookEndpoint.previous_encrypted_secret, WebhookEndpoint.previous_secret_expires_at)
             .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
             .where(WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt_at <= now)
             .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(limit))
        if is_postgres(session):
            q = q.with_for_update(of=WebhookDelivery, skip_locked=True)
        out = []
        for d, url, secret, previous, ends in session.execute(q).all():
            d.attempts += 1
            d.last_attempt_at, d.next_attempt_at = now, now + dt.timedelta(seconds=lease_s)
            previous = previous if grace_end(previous, ends, now) else None
            out.append(Attempt(d.id, d.attempts, url, d.tenant_id, secret, d.message_id, d.body, previous))
    return out


def record_attempt(session: Session, attempt: Attempt, status_code: int | None, error: str | None,
                   now: dt.datetime, *, max_attempts: int, retry_base_s: float, retry_max_s: float,
                   permanent: bool = False) -> str | None:
    """The result of one attempt: ``delivered`` on a 2xx; else the next attempt after an exponential
    backoff, or ``failed`` (given up) after ``max_attempts`` or at once when the failure is
    ``permanent`` (a destination that is refused). Returns the new status (None when the delivery
    is gone or another claim took it over)."""
    d = session.get(WebhookDelivery, attempt.delivery_id)
    if d is None or d.status != DeliveryStatus.PENDING or d.attempts != attempt.attempt:
        return None
    d.last_status_code, d.last_error = status_code, error
    if status_code is not None and 200 <= status_code < 300:
        d.status, d.delivered_at, d.next_attempt_at = DeliveryStatus.DELIVERED, now, None
    elif permanent or d.attempts >= max_attempts:
        d.status, d.next_attempt_at = DeliveryStatus.FAILED, None
    else:
        d.next_attempt_at = now + dt.timedelta(seconds=backoff(d.attempts, retry_base_s, retry_max_s))
    return d.status


def prune(db: Database, before: dt.datetime) -> int:
    """Remove the delivered and given-up messages whose last attempt was before ``before`` (the
    sweeper, ``webhook_delivery_retention_days``), in one transaction; pending ones stay whatever
    their age. Returns how many went."""
    finished = func.coalesce(WebhookDelivery.last_attempt_at, WebhookDelivery.created_at)
    with db.transaction() as session:
        return session.execute(sql_delete(WebhookDelivery).where(
            WebhookDelivery.status.in_((DeliveryStatus.DELIVERED, DeliveryStatus.FAILED)), finished < before)
            .execution_options(synchronize_session=False)).rowcount


def backoff(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds before attempt ``attempts + 1``: base, 2 × base, 4 × base… at most ``max_s``."""
    return min(max_s, base_s * 2 ** min(attempts - 1, 40))


__all__ = ["UNCHANGED", "Attempt", "backoff", "claim", "create", "delete", "deliveries", "drop_expired_secrets",
           "emit_for_entry", "get", "grace_end", "prune", "query", "record_attempt", "render", "render_delivery",
           "rotate_secret", "send_test", "update", "wake_after_commit"]

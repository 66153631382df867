"""Deletion requests: validated, deduplicated against earlier work, idempotent.

A sample already forgotten by this model, or named by a request still pending, is *linked* to
that earlier request and not unlearned twice. A request whose samples are all forgotten already
is completed at once; one whose samples are all pending elsewhere completes with them.
The subject reference is stored only as a hash (sha256 over the tenant id and the reference).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from sqlalchemy import func, literal, select, text, union_all
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.auth import Caller
from service.core.db import is_postgres
from service.core.errors import Conflict, Invalid, not_found
from service.core.models import (
    DatasetSample,
    DeletionRequest,
    DeletionRequestSample,
    ForgottenSample,
    Model,
    utcnow,
)
from service.core.repo import audit
from service.core.repo.common import iso
from service.core.repo.datasets import MAX_ID
from service.core.repo.models import require_ready
from service.core.statuses import RequestStatus

REASONS = ("erasure", "mislabeled", "poisoned", "other")
MAX_SAMPLES_PER_REQUEST = 100_000
ERASURE_DEADLINE = dt.timedelta(days=30)  # GDPR Art. 12(3): one month
LOOKUP_CHUNK = 5000
_SHOWN = "unlearnd.deletions.shown"  # session.info: request id -> (new samples, linked requests) of a created one


def subject_hash(tenant_id: int, subject_ref: str) -> str:
    return hashlib.sha256(f"unlearnd-subject:{tenant_id}:{subject_ref}".encode()).hexdigest()


def fingerprint(model_id: int, sample_ids: list[str], reason: str, subject_ref: str | None) -> str:
    body = json.dumps({"model_id": model_id, "sample_ids": sample_ids, "reason": reason, "subject_ref": subject_ref},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def get(session: Session, caller: Caller, request_id: int) -> DeletionRequest:
    row = session.scalar(select(DeletionRequest).where(DeletionRequest.id == request_id,
                                                       DeletionRequest.tenant_id == caller.tenant_id)
                         ) if 0 < request_id <= MAX_ID else None
    if row is None:
        raise not_found(f"deletion request {request_id}")
    return row


def by_idempotency_key(session: Session, caller: Caller, key: str) -> DeletionRequest | None:
    return session.scalar(select(DeletionRequest).where(DeletionRequest.tenant_id == caller.tenant_id,
                                                        DeletionRequest.idempotency_key == key))


def replay(existing: DeletionRequest, fp: str) -> DeletionRequest:
    """The first answer for a reused Idempotency-Key, or 422 when the body differs."""
    if existing.fingerprint != fp:
        raise Invalid("Idempotency-Key: this key was used with a different request "
                      f"body (deletion request {existing.id})", title="Idempotency-Key reused",
                      kind="idempotency-key-reused", field="Idempotency-Key")
    return existing


def lock_idempotency_key(session: Session, caller: Caller, key: str) -> None:
    """PostgreSQL: a transaction-scoped advisory lock on (tenant, key); a second request with the
    same key while the first is in flight gets 409. (SQLite's single writer serializes them.)"""
    if not is_postgres(session):
        return
    lock_id = int.from_bytes(hashlib.sha256(f"{caller.tenant_id}:{key}".encode()).digest()[:8], "big", signed=True)
    if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": lock_id}):
        raise Conflict("Idempotency-Key: a request with this key is still being processed; "
                      "retry later", title="Request in flight", kind="idempotency-key-in-flight",
                       field="Idempotency-Key", retry_after=1)


def _rows_of(session: Session, dataset_id: int, sample_ids: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for start in range(0, len(sample_ids), LOOKUP_CHUNK):
        chunk = sample_ids[start:start + LOOKUP_CHUNK]
        found.update(session.execute(select(DatasetSample.sample_id, DatasetSample.row).where(
            DatasetSample.dataset_id == dataset_id, DatasetSample.sample_id.in_(chunk))).all())
    return found


def create(session: Session, caller: Caller, model: Model, *, sample_ids: list[str], reason: str,
           subject_ref: str | None, idempotency_key: str | None, fp: str) -> DeletionRequest:
    """Validate and insert one request with its samples, in the caller's transaction."""
    require_ready(session, model)
    unique = list(dict.fromkeys(sample_ids))
    rows = _rows_of(session, model.dataset_id, unique)
    unknown = [s for s in unique if s not in rows]
    if unknown:
        raise Invalid(f"sample_ids: {len(unknown)} id(s) are not in the model's training "
                      f"set, e.g. {unknown[:5]}", title="Unknown samples", kind="unknown-samples", field="sample_ids",
                      unknown_sample_ids=unknown[:1000])
    wanted = [rows[s] for s in unique]
    forgotten, pending = _linked(session, model.id, wanted)
    now = utcnow()
    req = DeletionRequest(tenant_id=caller.tenant_id, model_id=model.id, status=RequestStatus.RECEIVED,
                          reason=reason,
                          subject_hash=subject_hash(caller.tenant_id, subject_ref) if subject_ref else None,
                          n_samples=len(unique), idempotency_key=idempotency_key, fingerprint=fp, created_at=now,
                          updated_at=now)
    session.add(req)
    try:
        session.flush()
    except IntegrityError:  # the same key committed meanwhile by another process
        raise Conflict("Idempotency-Key: a request with this key was just accepted; "
                      "retry to get its answer", title="Request in flight", kind="idempotency-key-in-flight",
                       field="Idempotency-Key") from None
    links = {r: forgotten.get(r) or pending.get(r) for r in wanted}
    linked_to = sorted({v for v in links.values() if v is not None})
    n_new = sum(1 for r in wanted if links[r] is None)
    # what render shows of it, known here: it need not be read back (see render_page)
    session.info.setdefault(_SHOWN, {})[req.id] = (n_new, linked_to)
    session.execute(DeletionRequestSample.__table__.insert(), [
        {"request_id": req.id, "row": rows[s], "sample_id": s, "linked_request_id": links[rows[s]]} for s in unique])
    if all(r in forgotten for r in wanted):
        version = session.scalar(select(func.max(ForgottenSample.version)).where(
            ForgottenSample.model_id == model.id, ForgottenSample.row.in_(wanted)))
        req.status, req.result_version, req.completed_at = RequestStatus.COMPLETED, version, now
    audit.record(session, caller.tenant_id, caller.actor, "deletion_request.received", f"deletion_request:{req.id}",
                 {"model_id": model.id, "reason": reason, "subject_hash": req.subject_hash, "n_samples": len(unique),
                  "n_new": n_new, "linked_to": linked_to})
    return req


def _linked(session: Session, model_id: int, rows: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """The rows already forgotten by the model, and those named by a request still pending (not
    linked itself), each with that request: one query per chunk of rows."""
    forgotten: dict[int, int] = {}
    pending: dict[int, int] = {}
    for start in range(0, len(rows), LOOKUP_CHUNK):
        chunk = rows[start:start + LOOKUP_CHUNK]
        q = union_all(
            select(literal(True).label("gone"), ForgottenSample.row, ForgottenSample.request_id).where(
                ForgottenSample.model_id == model_id, ForgottenSample.row.in_(chunk)),
            select(literal(False), DeletionRequestSample.row, DeletionRequestSample.request_id).join(
                DeletionRequest, DeletionRequest.id == DeletionRequestSample.request_id).where(
                DeletionRequest.model_id == model_id, DeletionRequest.status.in_(RequestStatus.ACTIVE),
                DeletionRequestSample.linked_request_id.is_(None), DeletionRequestSample.row.in_(chunk)))
        for gone, row, request_id in session.execute(q):
            (forgotten if gone else pending).setdefault(row, request_id)
    return forgotten, pending


def query(caller: Caller, model_id: int | None = None, status: RequestStatus | None = None):
    q = select(DeletionRequest).where(DeletionRequest.tenant_id == caller.tenant_id)
    if model_id is not None:
        q = q.where(DeletionRequest.model_id == model_id)
    return q.where(DeletionRequest.status == status) if status else q


def render(session: Session, r: DeletionRequest) -> dict:
    return render_page(session, [r])[0]


def render_page(session: Session, page: list[DeletionRequest]) -> list[dict]:
    """The requests as shown, with their samples' counts and links read in two queries for the page
    (none for a request created in this session: ``create`` noted them)."""
    shown = session.info.get(_SHOWN, {})
    ids = [r.id for r in page if r.id not in shown]
    n_new: dict[int, int] = {i: shown[i][0] for i in (r.id for r in page) if i in shown}
    linked: dict[int, list[int]] = {i: [] for i in ids} | {i: list(shown[i][1]) for i in n_new}
    if ids:
        n_new.update(session.execute(
            select(DeletionRequestSample.request_id, func.count()).where(
                DeletionRequestSample.request_id.in_(ids), DeletionRequestSample.linked_request_id.is_(None))
            .group_by(DeletionRequestSample.request_id)).all())
        for request_id, target in session.execute(
                select(DeletionRequestSample.request_id, DeletionRequestSample.linked_request_id).where(
                    DeletionRequestSample.request_id.in_(ids), DeletionRequestSample.linked_request_id.is_not(None))
                .distinct().order_by(DeletionRequestSample.request_id, DeletionRequestSample.linked_request_id)):
            linked[request_id].append(target)
    return [_render(r, int(n_new.get(r.id, 0)), linked[r.id]) for r in page]


def _render(r: DeletionRequest, n_new_samples: int, linked: list[int]) -> dict:
    created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=dt.UTC)
    return {"id": r.id, "model_id": r.model_id, "status": r.status, "reason": r.reason,
            "subject_hash": r.subject_hash, "n_samples": r.n_samples, "n_new_samples": n_new_samples,
            "linked_to": linked, "job_id": r.job_id, "result_version": r.result_version, "attempts": r.attempts,
            "error": r.error, "created_at": iso(r.created_at), "due_by": iso(created + ERASURE_DEADLINE),
            "completed_at": iso(r.completed_at), "updated_at": iso(r.updated_at),
            "links": {"self": f"/v1/deletion-requests/{r.id}",
                      "job": f"/v1/jobs/{r.job_id}" if r.job_id else None,
                      "version": (f"/v1/models/{r.model_id}/versions/{r.result_version}"
                                  if r.result_version else None)}}

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
from dataclasses import dataclass, field
from types import SimpleNamespace

from sqlalchemy import Connection, Integer, and_, bindparam, column, func, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.auth import KEY_COLUMNS, Caller, caller_of
from service.core.batching import BACKLOG_COLUMNS, Backlog, backlog_sql
from service.core.db import DriverStatement, is_postgres
from service.core.errors import Conflict, Invalid, not_found
from service.core.models import (
    ApiKey,
    AuditEntry,
    DatasetSample,
    DeletionRequest,
    DeletionRequestSample,
    ForgottenSample,
    LogPending,
    Model,
    ModelVersion,
    Tenant,
    utcnow,
)
from service.core.repo import audit, webhooks
from service.core.repo.common import aware, iso
from service.core.repo.datasets import MAX_ID
from service.core.repo.models import require_ready
from service.core.statuses import RequestStatus, VersionStatus, sql_list

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


@dataclass
class Target:
    """What a new request of a model needs to know, read in one query (a chunk of ids a query):
    the model, whether it has a ready version, the rows of the named samples, those the model
    forgot already (row -> (request or None, version)) and those named by a request still pending
    (row -> the oldest such request, itself not linked)."""
    model_id: int
    ready: bool
    rows: dict[str, int] = field(default_factory=dict)
    forgotten: dict[int, tuple[int | None, int]] = field(default_factory=dict)
    pending: dict[int, int] = field(default_factory=dict)
    blank: set[int] = field(default_factory=set)  # rows blanked in the dataset file (service/core/repo/redaction.py)
    backlog: Backlog | None = None  # PostgreSQL: the model's batching backlog, as the query saw it


def _key_and_target_query():
    """The accept path's query, built once (its compiled form is cached by SQLAlchemy; building it
    anew costs more than running it): the key (one row by its unique prefix) and its tenant, then the
    model if it is that tenant's, with its ready version and what is known of the samples. A row
    whatever the model id, so that a key that is not valid is told apart from a model that is not
    found. SQLite; PostgreSQL runs :data:`KEY_AND_TARGET_PG`, the same query written for it."""
    m, mv, ds, fs = Model.__table__, ModelVersion.__table__, DatasetSample.__table__, ForgottenSample.__table__
    dr, drs = DeletionRequest.__table__, DeletionRequestSample.__table__
    keys, tenants = ApiKey.__table__, Tenant.__table__
    ready = select(mv.c.id).where(mv.c.model_id == m.c.id, mv.c.status == VersionStatus.READY).exists()
    # The oldest active request of the model naming the row, itself not linked: read from the row's
    # samples (ix_deletion_request_samples_row: a few a row), each request checked by its key in a
    # subquery of its own. Written as a join, the planner may start from the model's active requests
    # instead (with stale statistics PostgreSQL does: a fresh database, a burst of requests), which
    # costs a probe per active request of the model, for every sample of every new request.
    active = or_(*(dr.c.status == status for status in RequestStatus.ACTIVE))
    of_model = (select(and_(dr.c.model_id == m.c.id, active))
                .where(dr.c.id == drs.c.request_id).correlate(drs, m).scalar_subquery())
    pending = (select(func.min(drs.c.request_id))
               .where(drs.c.row == ds.c.row, drs.c.linked_request_id.is_(None), of_model)
               .correlate(ds, m).scalar_subquery())
    # fs.version is never null
    return (select(*KEY_COLUMNS, m.c.id.label("model"), ready.label("ready"), ds.c.sample_id, ds.c.row,
                   fs.c.request_id, fs.c.version, ds.c.redacted_at, pending.label("pending"))
            .select_from(keys)
            .join(tenants, tenants.c.id == keys.c.tenant_id)
            .outerjoin(m, and_(m.c.id == bindparam("model_id"), m.c.tenant_id == keys.c.tenant_id))
            .outerjoin(ds, and_(ds.c.dataset_id == m.c.dataset_id,
                                ds.c.sample_id.in_(bindparam("ids", expanding=True))))
            .outerjoin(fs, and_(fs.c.model_id == m.c.id, fs.c.row == ds.c.row))
            .where(keys.c.prefix == bindparam("prefix")))


KEY_AND_TARGET = _key_and_target_query()
# PostgreSQL: the same query, with the ids as one array parameter and each looked up on its own in
# the dataset's (dataset_id, sample_id) index (LATERAL ... LIMIT 1, which the planner cannot turn into
# a join). An IN list of ids, or = ANY(array), was planned as a scan of every sample of the dataset
# filtered by id whenever the statistics were stale (a fresh database: 0.23 ms for 1,197 samples
# against 0.02 ms, and the scan grows with the dataset), and SQLAlchemy renders an IN list anew on
# every call. The accept path runs it on psycopg directly (service/core/db.py ``DriverStatement``);
# in a session (a request with an Idempotency-Key) its declared columns let SQLAlchemy keep the
# result's metadata with the compiled statement instead of building it from the cursor. It also
# reads the model's batching backlog (service/core/batching.py ``Backlog``, a few index probes, the
# policy's batching part only): with it the accept path looks again after its commit only when this
# request may have made a batch due.
KEY_AND_TARGET_PG = DriverStatement(text(f"""
SELECT k.id AS key_id, k.tenant_id, k.key_hash, k.revoked_at, k.last_used_at, t.name AS tenant, m.id AS model,
       EXISTS (SELECT 1 FROM {ModelVersion.__tablename__} mv
               WHERE mv.model_id = m.id AND mv.status = '{VersionStatus.READY}') AS ready,
       s.sample_id, s."row", fs.request_id, fs.version, s.redacted_at,
       b.policy, b.flush_requested_at, b.active, b.first_id, b.first_at, b.last_id,
       (SELECT min(drs.request_id) FROM {DeletionRequestSample.__tablename__} drs
        WHERE drs."row" = s."row" AND drs.linked_request_id IS NULL
          AND (SELECT dr.model_id = m.id AND dr.status IN ({sql_list(RequestStatus.ACTIVE)})
               FROM {DeletionRequest.__tablename__} dr WHERE dr.id = drs.request_id)) AS pending
FROM {ApiKey.__tablename__} k
JOIN {Tenant.__tablename__} t ON t.id = k.tenant_id
LEFT JOIN {Model.__tablename__} m ON m.id = :model_id AND m.tenant_id = k.tenant_id
LEFT JOIN LATERAL (SELECT {backlog_sql("m.policy -> 'batching'")}) AS b ON true
LEFT JOIN LATERAL (
    SELECT one.sample_id, one."row", one.redacted_at FROM unnest(CAST(:ids AS VARCHAR[])) AS u(id)
    CROSS JOIN LATERAL (SELECT ds.sample_id, ds."row", ds.redacted_at FROM {DatasetSample.__tablename__} ds
                        WHERE ds.dataset_id = m.dataset_id AND ds.sample_id = u.id LIMIT 1) AS one
) AS s ON true
LEFT JOIN {ForgottenSample.__tablename__} fs ON fs.model_id = m.id AND fs."row" = s."row"
WHERE k.prefix = :prefix""").columns(*(column(c.name, c.type) for c in KEY_AND_TARGET.selected_columns[:-1]),
                                    *BACKLOG_COLUMNS, column("pending", Integer)))
INSERT_REQUEST = DeletionRequest.__table__.insert().returning(DeletionRequest.__table__.c.id)
INSERT_SAMPLES = DeletionRequestSample.__table__.insert()


def _collect(found: Target | None, model_id: int, rows) -> Target | None:
    for r in rows:
        if r.model is None:
            return None
        if found is None:
            found = Target(model_id, bool(r.ready))
            if "first_id" in r._fields:  # PostgreSQL's query reads the backlog with the model
                found.backlog = Backlog.of_row(r, {"batching": r.policy})
        if r.sample_id is None:
            continue
        found.rows[r.sample_id] = r.row
        if r.version is not None:
            found.forgotten[r.row] = (r.request_id, r.version)
        if r.pending is not None:
            found.pending[r.row] = r.pending
        if r.redacted_at is not None:
            found.blank.add(r.row)
    return found


def caller_and_target(session: Session | Connection, key: str, prefix: str, model_id: int,
                      sample_ids: list[str]) -> tuple[Caller, Target]:
    """The accept path's first query: the caller of the bearer key (``service.core.auth.bearer_key``;
    401 when it is not valid) and the caller's model (404 otherwise): whether it has a ready version,
    the rows of the named samples, those the model forgot already and those named by a request still
    pending. One query (a chunk of ids a query), in a session or on a plain connection."""
    caller, found = None, None
    sample_ids = list(dict.fromkeys(sample_ids))
    # an id out of range matches no model (0 is never one), and the key is still checked first
    params = {"prefix": prefix, "model_id": model_id if 0 < model_id <= MAX_ID else 0}
    postgres = is_postgres(session)
    for start in range(0, max(len(sample_ids), 1), LOOKUP_CHUNK):
        chunk = params | {"ids": sample_ids[start:start + LOOKUP_CHUNK]}
        rows = KEY_AND_TARGET_PG.rows(session, chunk) if postgres else session.execute(KEY_AND_TARGET, chunk).all()
        if caller is None:
            caller = caller_of(session, rows[0] if rows else None, key, prefix)  # 401
        found = _collect(found, model_id, rows)
        if found is None:
            raise not_found(f"model {model_id}")
    return caller, found  # type: ignore[return-value]


def create(session: Session | Connection, caller: Caller, t: Target, *, sample_ids: list[str], reason: str,
           subject_ref: str | None, idempotency_key: str | None, fp: str) -> SimpleNamespace:
    """Validate and insert one request with its samples and its audit-log entry, in the caller's
    transaction: on PostgreSQL one statement (:data:`INSERT_ALL`), elsewhere four INSERTs (the request,
    its samples, the entry, its place in the sequencer's queue). ``session`` may be a plain connection
    (PostgreSQL, autocommit: the accept path), on which the rare paths that need ORM objects open a
    session of their own."""
    if not t.ready:
        _require_ready(session, t.model_id)  # 409, and why
    unique = list(dict.fromkeys(sample_ids))
    rows = t.rows
    unknown = [s for s in unique if s not in rows]
    if unknown:
        raise Invalid(f"sample_ids: {len(unknown)} id(s) are not in the model's training "
                      f"set, e.g. {unknown[:5]}", title="Unknown samples", kind="unknown-samples", field="sample_ids",
                      unknown_sample_ids=unknown[:1000])
    gone = [s for s in unique if rows[s] in t.blank and rows[s] not in t.forgotten]
    if gone:
        raise Conflict(f"sample_ids: {len(gone)} sample(s) were erased from the dataset's file after every model "
                       f"of the dataset forgot them, e.g. {gone[:5]}: there is nothing left to unlearn them from; "
                       f"this model was registered after the erasure (GET /v1/models/{t.model_id}/samples/"
                       f"{gone[0]} shows when)", title="Samples erased", kind="erased-samples", field="sample_ids",
                       erased_sample_ids=gone[:1000])
    wanted = [rows[s] for s in unique]
    links = {r: (t.forgotten[r][0] if r in t.forgotten else None) or t.pending.get(r) for r in wanted}
    linked_to = sorted({v for v in links.values() if v is not None})
    n_new = sum(1 for r in wanted if links[r] is None)
    now = utcnow()
    done = all(r in t.forgotten for r in wanted)
    values = {"tenant_id": caller.tenant_id, "model_id": t.model_id, "reason": reason,
              "status": RequestStatus.COMPLETED if done else RequestStatus.RECEIVED,
              "result_version": max(t.forgotten[r][1] for r in wanted) if done else None,
              "completed_at": now if done else None,
              "subject_hash": subject_hash(caller.tenant_id, subject_ref) if subject_ref else None,
              "n_samples": len(unique), "idempotency_key": idempotency_key, "fingerprint": fp, "attempts": 0,
              "created_at": now, "updated_at": now}
    samples = [{"request_id": None, "row": rows[s], "sample_id": s, "linked_request_id": links[rows[s]]}
               for s in unique]
    details = {"model_id": t.model_id, "reason": reason, "subject_hash": values["subject_hash"],
               "n_samples": len(unique), "n_new": n_new, "linked_to": linked_to}
    if is_postgres(session):
        try:
            request_id = _insert_all(session, values, samples, caller, details)
        except IntegrityError as exc:
            if getattr(exc.orig, "sqlstate", None) == "23505" and _table(exc) == DeletionRequest.__tablename__:
                raise _key_just_taken() from None
            raise
    else:
        try:
            request_id = session.execute(INSERT_REQUEST, values).scalar_one()
        except IntegrityError:
            raise _key_just_taken() from None
        for row in samples:
            row["request_id"] = request_id
        session.execute(INSERT_SAMPLES, samples)
        audit.record(session, caller.tenant_id, caller.actor, RECEIVED, f"deletion_request:{request_id}", details)
    # the request as stored, for render (not an ORM object: there is nothing to flush, and making one
    # costs more than the INSERT); what render shows of it is known here and need not be read back
    req = SimpleNamespace(id=request_id, job_id=None, error=None, **values)
    session.info.setdefault(_SHOWN, {})[req.id] = (n_new, linked_to)
    return req


def _require_ready(session: Session | Connection, model_id: int) -> None:
    if isinstance(session, Session):
        require_ready(session, session.get(Model, model_id))
        return
    with Session(bind=session) as orm:  # on the connection: its statements are the connection's
        require_ready(orm, orm.get(Model, model_id))


def _key_just_taken() -> Conflict:
    """The request's Idempotency-Key was committed meanwhile by another process (the unique index)."""
    return Conflict("Idempotency-Key: a request with this key was just accepted; "
                    "retry to get its answer", title="Request in flight", kind="idempotency-key-in-flight",
                    field="Idempotency-Key")


def _table(exc: IntegrityError) -> str | None:
    return getattr(getattr(exc.orig, "diag", None), "table_name", None)


RECEIVED = "deletion_request.received"
# PostgreSQL: the request, its samples, its audit-log entry and the entry's place in the sequencer's
# queue in one statement (data-modifying CTEs), where they were four: the writes of ``audit.record``
# (service/core/repo/audit.py), in the same transaction, the entry naming the request it records.
_R, _S, _E, _P = (DeletionRequest.__table__, DeletionRequestSample.__table__, AuditEntry.__table__,
                  LogPending.__table__)
_REQUEST_COLUMNS = ("tenant_id", "model_id", "reason", "status", "result_version", "completed_at", "subject_hash",
                    "n_samples", "idempotency_key", "fingerprint", "attempts", "created_at", "updated_at")
INSERT_ALL = DriverStatement(text(f"""
WITH r AS (INSERT INTO {_R.name} ({", ".join(_REQUEST_COLUMNS)})
           VALUES ({", ".join(":" + c for c in _REQUEST_COLUMNS)}) RETURNING id),
s AS (INSERT INTO {_S.name} (request_id, "row", sample_id, linked_request_id)
      SELECT r.id, u.row, u.sample_id, u.linked FROM r,
             unnest(CAST(:sample_rows AS INTEGER[]), CAST(:sample_ids AS VARCHAR[]), CAST(:links AS INTEGER[]))
             AS u("row", sample_id, linked)),
e AS (INSERT INTO {_E.name} (tenant_id, created_at, actor, action, resource, details)
      SELECT :tenant_id, :created_at, :actor, :action, 'deletion_request:' || r.id, CAST(:details AS JSON) FROM r
      RETURNING id),
p AS (INSERT INTO {_P.name} (entry_id, tenant_id) SELECT e.id, :tenant_id FROM e)
SELECT r.id, e.id AS entry_id FROM r, e""").bindparams(
    bindparam("created_at", type_=_R.c.created_at.type), bindparam("updated_at", type_=_R.c.updated_at.type),
    bindparam("completed_at", type_=_R.c.completed_at.type)).columns(id=_R.c.id.type, entry_id=_E.c.id.type))


def writes_in_one_statement(bind) -> bool:
    """Whether :func:`create` writes a request in one statement (PostgreSQL, while the request's
    audit-log entry reports no webhook event: that would be a second write), which needs no
    transaction around it: a caller without other writes to make may run it in autocommit."""
    return is_postgres(bind) and RECEIVED not in webhooks.EVENTS_OF


def _insert_all(session: Session | Connection, values: dict, samples: list[dict], caller: Caller, details: dict) -> int:
    """The request, its samples, its audit-log entry (as ``audit.record`` appends one) and the
    entry's place in the sequencer's queue, in one statement (PostgreSQL): the request's id."""
    [(request_id, entry_id)] = INSERT_ALL.rows(session, values | {
        "sample_rows": [s["row"] for s in samples], "sample_ids": [s["sample_id"] for s in samples],
        "links": [s["linked_request_id"] for s in samples], "actor": caller.actor, "action": RECEIVED,
        "details": json.dumps(details)})
    if RECEIVED in webhooks.EVENTS_OF:  # as audit.record does (none today; then not in autocommit)
        webhooks.emit_for_entry(session, AuditEntry(
            id=entry_id, tenant_id=caller.tenant_id, created_at=values["created_at"], actor=caller.actor,
            action=RECEIVED, resource=f"deletion_request:{request_id}", details=details))
    return request_id


def query(caller: Caller, model_id: int | None = None, status: RequestStatus | None = None):
    q = select(DeletionRequest).where(DeletionRequest.tenant_id == caller.tenant_id)
    if model_id is not None:
        q = q.where(DeletionRequest.model_id == model_id)
    return q.where(DeletionRequest.status == status) if status else q


def render(session: Session | Connection, r: DeletionRequest | SimpleNamespace) -> dict:
    return render_page(session, [r])[0]


def render_page(session: Session | Connection, page: list[DeletionRequest]) -> list[dict]:
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
    created = aware(r.created_at)
    return {"id": r.id, "model_id": r.model_id, "status": r.status, "reason": r.reason,
            "subject_hash": r.subject_hash, "n_samples": r.n_samples, "n_new_samples": n_new_samples,
            "linked_to": linked, "job_id": r.job_id, "result_version": r.result_version, "attempts": r.attempts,
            "error": r.error, "created_at": iso(r.created_at), "due_by": iso(created + ERASURE_DEADLINE),
            "completed_at": iso(r.completed_at), "updated_at": iso(r.updated_at),
            "links": {"self": f"/v1/deletion-requests/{r.id}",
                      "job": f"/v1/jobs/{r.job_id}" if r.job_id else None,
                      "version": (f"/v1/models/{r.model_id}/versions/{r.result_version}"
                                  if r.result_version else None)}}

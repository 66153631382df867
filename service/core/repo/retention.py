"""Retention of superseded versions (issue 11, item 3; docs/architecture.md#retention-of-superseded-versions).

A version ``v`` holds the samples that a later version ``w > v`` forgot (``forgotten_samples``
records the version that forgot each one); the newest version never does. Such a version is kept
for the model's ``retention.purge_after_days`` after the first of those later versions was
published, then purged: its checkpoint and its proxy cache entries leave the artifact store (a blob
goes only when no kept row uses it: service/core/repo/blobs.py), and the row stays as a tombstone
(status ``purged``, its sha256, ``purged_at``, ``purge_reason``). No alias points at a purged
version: ``latest`` and ``production`` move to the newest ready version, other aliases on it are
removed. The audit log records each purge (``version.purged``).

Three callers: the sweeper purges what is due, a worker purges its model's due versions right after
a job published (so ``purge_after_days = 0`` purges at once), and ``POST /v1/models/{id}/purge``
purges every version that holds erased samples without waiting out the period.

The model's learning events (one row of training statistics per sample, worker/engine/events.py)
go the same way, row by row: once no kept version holds a sample (every version before the one
that forgot it is purged), a purge rewrites the events file with that sample's row blanked (same
ids, same order; every other row as it was), stores it as a new blob, points the model at it,
drops the model's proxy cache entries computed from the events (the next job computes them again
from the blanked file, at no cost) and records ``model.events_redacted``. The old file leaves the
store when no kept row uses it. While a job of the model runs (it may read the file) the rewrite
waits: the worker does it after that job, else the next purge or ``POST …/purge`` does.
[Choice] This module reads and writes the file with worker/engine/events.py, the one definition of
the format: numpy only, no torch (its own import contract), already loaded by the API for uploads;
so the API's purge and the sweeper's run the same transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.core.models import ForgottenSample, Job, Model, ModelAlias, ModelVersion, ProxyCacheEntry, utcnow
from service.core.policy import retention_of
from service.core.repo import audit, blobs, redaction
from service.core.repo.common import aware, iso
from service.core.statuses import JobStatus, VersionStatus
from worker.engine.catalog import NEEDS_EVENTS
from worker.engine.errors import DatasetError
from worker.engine.events import redact_events

log = logging.getLogger("unlearnd.retention")

MOVED_ALIASES = ("latest", "production")  # moved to the newest ready version; other aliases are removed


@dataclass(frozen=True)
class Holding:
    """A kept version that still holds samples a later version erased."""

    version: ModelVersion
    erased_in: list[int]  # the later versions that forgot some of its samples
    n_erased: int  # how many
    since: dt.datetime  # when the first of them was published
    due_at: dt.datetime  # since + retention.purge_after_days


def holdings(session: Session, model: Model) -> list[Holding]:
    """The model's ready versions that hold erased samples, oldest first, with their purge dates."""
    erasures = session.execute(
        select(ForgottenSample.version, func.min(ForgottenSample.created_at), func.count())
        .where(ForgottenSample.model_id == model.id).group_by(ForgottenSample.version)).all()
    if not erasures:
        return []
    period = dt.timedelta(days=retention_of(model.policy).purge_after_days)
    kept = session.scalars(select(ModelVersion).where(
        ModelVersion.model_id == model.id, ModelVersion.status == VersionStatus.READY,
        ModelVersion.version < max(w for w, _, _ in erasures)).order_by(ModelVersion.version))
    out = []
    for v in kept:
        later = [(w, aware(t), n) for w, t, n in erasures if w > v.version]
        since = min(t for _, t, _ in later)
        out.append(Holding(v, sorted(w for w, _, _ in later), sum(n for _, _, n in later), since, since + period))
    return out


@dataclass(frozen=True)
class Purged:
    """What a purge did: the tombstones, the learning-events redaction and the dataset-file redaction
    (None: nothing blanked) and the artifacts to prune once the transaction committed."""

    tombstones: list[dict]
    events: dict | None
    dataset: dict | None
    digests: set[str]


def purge(session: Session, store, model: Model, *, actor: str, due_only: bool, now: dt.datetime | None = None,
          catch_up: bool = False) -> Purged:
    """Purge the model's versions that hold erased samples (``due_only``: those whose retention ran
    out by ``now``), in the caller's transaction with the model row locked (:func:`lock_model`). A
    version an active job starts from is left for the next sweep. Then blank the learning events of the samples no kept
    version holds any more (:func:`redact`): when versions were purged, on request (not
    ``due_only``) or with ``catch_up`` (the worker after a job: a rewrite that waited for a running
    job), not on every sweep, which would read the file each time; then, the same way, blank the
    dataset-file rows no model of the dataset holds (service/core/repo/redaction.py). The caller
    prunes the returned artifacts once the transaction committed (:func:`blobs.prune`)."""
    now = now or utcnow()
    busy = set(session.scalars(select(Job.base_version).where(
        Job.model_id == model.id, Job.status.in_(JobStatus.ACTIVE), Job.base_version.is_not(None))))
    targets = [h for h in holdings(session, model)
               if h.version.version not in busy and (not due_only or h.due_at <= now)]
    tombstones, digests = _purge_versions(session, model, targets, actor=actor, due_only=due_only, now=now)
    if not (tombstones or catch_up or not due_only):
        return Purged(tombstones, None, None, digests)
    trigger = "retention" if due_only else "request"
    events, stale = redact(session, store, model, actor=actor, trigger=trigger,
                           purged=[t["version"] for t in tombstones])
    dataset, old_file = redaction.redact_dataset(session, store, model.dataset_id, actor=actor, trigger=trigger)
    return Purged(tombstones, events, dataset, digests | stale | old_file)


def _purge_versions(session: Session, model: Model, targets: list[Holding], *, actor: str, due_only: bool,
                    now: dt.datetime) -> tuple[list[dict], set[str]]:
    if not targets:
        return [], set()
    numbers = [h.version.version for h in targets]
    ids = [h.version.id for h in targets]
    caches = session.execute(select(ProxyCacheEntry.model_version_id, ProxyCacheEntry.proxy, ProxyCacheEntry.sha256)
                             .where(ProxyCacheEntry.model_version_id.in_(ids))).all()
    session.execute(delete(ProxyCacheEntry).where(ProxyCacheEntry.model_version_id.in_(ids)))
    newest = session.scalar(select(func.max(ModelVersion.version)).where(
        ModelVersion.model_id == model.id, ModelVersion.status == VersionStatus.READY,
        ModelVersion.version.not_in(numbers)))
    moved: dict[int, dict[str, int]] = {}
    removed: dict[int, list[str]] = {}
    for alias in session.scalars(select(ModelAlias).where(ModelAlias.model_id == model.id,
                                                          ModelAlias.version.in_(numbers))):
        if alias.alias in MOVED_ALIASES and newest is not None:
            moved.setdefault(alias.version, {})[alias.alias] = newest
            alias.version, alias.updated_at = newest, now
        else:
            removed.setdefault(alias.version, []).append(alias.alias)
            session.delete(alias)
    days = retention_of(model.policy).purge_after_days
    tombstones = []
    for h in targets:
        v = h.version
        held = f"held {h.n_erased} sample(s) erased in version(s) {', '.join(map(str, h.erased_in))}"
        v.purge_reason = (f"{held}; retention.purge_after_days = {days} ran out at {iso(h.due_at)}" if due_only
                          else f"{held}; purged on request (POST /v1/models/{model.id}/purge), its retention "
                               f"would have run out at {iso(h.due_at)}")
        v.status, v.purged_at, v.updated_at = VersionStatus.PURGED, now, now
        entries = [{"proxy": p, "sha256": sha} for vid, p, sha in caches if vid == v.id]
        details = {"version": v.version, "checkpoint_sha256": v.checkpoint_sha256, "checkpoint_size": v.checkpoint_size,
                   "reason": v.purge_reason, "trigger": "retention" if due_only else "request",
                   "erased_in": h.erased_in, "n_erased": h.n_erased, "purge_after_days": days,
                   "due_at": iso(h.due_at), "proxy_cache": entries, "aliases_moved": moved.get(v.version, {}),
                   "aliases_removed": sorted(removed.get(v.version, []))}
        audit.record(session, model.tenant_id, actor, "version.purged", f"model:{model.id}/version:{v.version}",
                     details)
        tombstones.append({**{k: details[k] for k in ("version", "reason", "trigger", "erased_in", "n_erased",
                                                      "aliases_moved", "aliases_removed")},
                           "checkpoint_sha256": v.checkpoint_sha256, "purged_at": iso(now),
                           "n_proxy_cache_entries": len(entries)})
    session.flush()
    return tombstones, {h.version.checkpoint_sha256 for h in targets} | {sha for _, _, sha in caches}


def redact(session: Session, store, model: Model, *, actor: str, trigger: str,
           purged: list[int] = ()) -> tuple[dict | None, set[str]]:
    """Blank the learning-events rows of the model's samples that no kept version holds (forgotten in
    version w, and no ready version before w is left), in the caller's transaction. Returns what it
    did (None when nothing was left to blank, the model has no events, or a job of the model runs)
    and the artifacts to prune after the commit: the old events file and the dropped events-proxy
    cache entries' blobs."""
    old = model.events_sha256
    if old is None:
        return None, set()
    unheld = sorted(redaction.unheld(session, model.id).values())
    if not unheld:
        return None, set()
    running = session.scalar(select(Job.id).where(Job.model_id == model.id, Job.status == JobStatus.RUNNING)
                             .limit(1))
    if running is not None:  # its worker may be about to read the file: the next purge does it
        return None, set()
    try:
        with store.open(old) as f:
            data, n_new, n_blank = redact_events(f, unheld)
    except (OSError, DatasetError) as exc:
        log.warning("model %s: learning events %s not redacted, unreadable (%s)", model.id, old, exc)
        return None, set()
    if n_new == 0:
        return None, set()
    new = store.put_bytes(data)
    model.events_sha256 = new
    entries = session.execute(select(ProxyCacheEntry.id, ProxyCacheEntry.proxy, ProxyCacheEntry.sha256).join(
        ModelVersion, ModelVersion.id == ProxyCacheEntry.model_version_id).where(
        ModelVersion.model_id == model.id)).all()
    dropped = [e for e in entries if e.proxy.split(":", 1)[0] in NEEDS_EVENTS]
    if dropped:
        session.execute(delete(ProxyCacheEntry).where(ProxyCacheEntry.id.in_([e.id for e in dropped])))
    details = {"rows_redacted": n_new, "rows_redacted_total": n_blank, "sha256": new, "previous_sha256": old,
               "trigger": trigger, "purged_versions": list(purged),
               "proxy_cache_dropped": sorted({e.sha256 for e in dropped})}
    audit.record(session, model.tenant_id, actor, "model.events_redacted", f"model:{model.id}", details)
    session.flush()
    return details, {old} | {e.sha256 for e in dropped}


def lock_model(session: Session, model_id: int) -> Model | None:
    """The model row, locked for a purge: against other purges and everything else that locks the
    row (batching, publishing, a calibration's result), but not against the accept path, whose
    inserts only check that the row exists (PostgreSQL: ``FOR NO KEY UPDATE``, which a foreign-key
    check's ``FOR KEY SHARE`` passes). So requests for the model are accepted while its purge
    rewrites the events or the dataset file."""
    return session.scalar(select(Model).where(Model.id == model_id).with_for_update(of=Model, key_share=True))


def purge_due(db, store, model_id: int, now: dt.datetime | None = None, *, catch_up: bool = False) -> list[dict]:
    """Purge what is due of one model (the sweeper; a worker after its job, with ``catch_up``): one
    transaction, then the blobs no kept row uses."""
    with db.transaction() as session:
        model = lock_model(session, model_id)
        done = (purge(session, store, model, actor="worker", due_only=True, now=now, catch_up=catch_up)
                if model else Purged([], None, None, set()))
    blobs.prune(db, store, done.digests)
    return done.tombstones


def candidates(session: Session) -> list[int]:
    """Models with a ready version older than their newest erasure (the sweeper checks their dates)."""
    newest = (select(ForgottenSample.model_id, func.max(ForgottenSample.version).label("version"))
              .group_by(ForgottenSample.model_id).subquery())
    return list(session.scalars(select(ModelVersion.model_id).distinct().join(
        newest, (newest.c.model_id == ModelVersion.model_id) & (ModelVersion.version < newest.c.version))
        .where(ModelVersion.status == VersionStatus.READY).order_by(ModelVersion.model_id)))


def sweep(db, store, now: dt.datetime | None = None) -> list[dict]:
    """The sweeper's part: purge every model's due versions (one transaction per model). A blob left
    by a purge stopped between its commit and its pruning is an orphan: :func:`blobs.collect`."""
    with db.session() as session:
        model_ids = candidates(session)
    return [t for m in model_ids for t in purge_due(db, store, m, now)]


def sample_versions(session: Session, model_id: int, forgotten_in: int | None) -> dict:
    """For the sample status: the versions that still hold a sample (all versions before the one
    that forgot it, or every version if none did) with their purge dates, and those purged."""
    model = session.get(Model, model_id)
    due = {h.version.version: h.due_at for h in holdings(session, model)}
    rows = session.execute(select(ModelVersion.version, ModelVersion.status, ModelVersion.purged_at).where(
        ModelVersion.model_id == model_id).order_by(ModelVersion.version)).all()
    had = [r for r in rows if forgotten_in is None or r.version < forgotten_in]
    return {"versions_containing": [r.version for r in had if r.status != VersionStatus.PURGED],
            "holding": [{"version": r.version, "status": r.status, "purge_due_at": iso(due.get(r.version))}
                        for r in had if r.status != VersionStatus.PURGED],
            "purged_versions": [{"version": r.version, "purged_at": iso(r.purged_at)}
                                for r in had if r.status == VersionStatus.PURGED]}

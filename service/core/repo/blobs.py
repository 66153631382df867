"""Which artifacts rows still reference: a blob is removed only when no row of any tenant names it
(identical uploads share one blob, service/core/artifacts.py). A purged version's tombstone keeps
its checkpoint's sha256 but not the blob: it is no reference (service/core/repo/retention.py).

Two removers, both through the store's ``remove``, which sets a blob aside before its references
are checked again, so a row committed meanwhile, or a writer's lease, keeps it: :func:`prune` after
a transaction deleted rows, and :func:`collect` (a task of its own, worker/tasks.py
``collect_artifacts``, every ``artifact_collect_interval_s``) for what no transaction owns: a blob
stored for a transaction that then failed or never came (a crashed job's checkpoint, an upload
whose insert failed, a purge stopped before it pruned) and a stopped process's staging files. Both
hand the store a group of blobs at a time, set aside together and checked again in one query per
column (:func:`_remove`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import Dataset, Job, Model, ModelVersion, ProxyCacheEntry
from service.core.statuses import VersionStatus

# every column that holds an artifact's sha256
REFERENCES = (Dataset.sha256, Model.events_sha256, ModelVersion.checkpoint_sha256, ProxyCacheEntry.sha256,
              Job.report_sha256, Job.report_html_sha256)
CHUNK = 500  # digests per reference query (SQLite's older builds take at most 999 parameters)
ASIDE = 100  # blobs set aside at once, in one call of the store's ``remove``, for one check of their references


def unreferenced(session: Session, digests: Iterable[str | None]) -> list[str]:
    """The digests no row references."""
    left = {d for d in digests if d}
    for column in REFERENCES:
        if not left:
            break
        q = select(column).where(column.in_(sorted(left)))
        if column is ModelVersion.checkpoint_sha256:
            q = q.where(ModelVersion.status != VersionStatus.PURGED)
        left -= set(session.scalars(q.distinct()))
    return sorted(left)


def prune(db, store, digests: Iterable[str | None]) -> list[str]:
    """Remove the blobs of ``digests`` that no committed row references (after the transaction
    that deleted their rows); returns the removed digests. Checked again with each blob set aside,
    so a blob that a newer row shares (the same bytes uploaded again) stays, committed or not yet:
    its writer leased it (a blob so kept is collected later if that row never comes)."""
    with db.session() as session:
        with session.begin():
            gone = unreferenced(session, digests)
        return _remove(session, store, gone)


def collect(db, store, *, grace_s: float) -> tuple[list[str], int]:
    """Remove the blobs no row references that were neither written nor leased in the last
    ``grace_s`` (a writer has that long to commit the row that uses its blob), and the staging
    files older than that. One walk of the store, then in one session one query per column per
    :data:`CHUNK` of the old blobs, and per :data:`ASIDE` of the orphans found among them to check
    them again once set aside (:func:`_remove`). Returns the removed digests and the number of
    staging files removed."""
    cutoff = time.time() - grace_s
    staging = store.tidy(cutoff)
    old = sorted(d for d, mtime in store.blobs() if mtime < cutoff)
    removed = []
    with db.session() as session:
        for i in range(0, len(old), CHUNK):
            with session.begin():
                gone = unreferenced(session, old[i:i + CHUNK])
            removed += _remove(session, store, gone, cutoff)
    return removed, staging


def _remove(session: Session, store, digests: list[str], cutoff: float = math.inf) -> list[str]:
    """Remove the blobs of ``digests`` (found unreferenced) unless, once set aside, one was touched
    at or after ``cutoff`` or a row references it now; returns the removed digests. The store sets
    aside :data:`ASIDE` of them at a time and asks ``keep`` once for the group: one query per
    column, in a transaction begun after every one was set aside. A failed check puts them all back."""

    def keep(held: dict[str, float]) -> set[str]:
        young = {d for d, mtime in held.items() if mtime >= cutoff}
        old = set(held) - young
        with session.begin():  # a new transaction: it sees every row committed until now
            return young | (old - set(unreferenced(session, old)))

    removed = []
    for i in range(0, len(digests), ASIDE):
        removed += store.remove(digests[i:i + ASIDE], keep)
    return removed

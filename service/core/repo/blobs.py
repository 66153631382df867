"""Which artifacts rows still reference: a blob is removed only when no row of any tenant names it
(identical uploads share one blob, service/core/artifacts.py). A purged version's tombstone keeps
its checkpoint's sha256 but not the blob: it is no reference (service/core/repo/retention.py)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import Dataset, Job, Model, ModelVersion, ProxyCacheEntry
from service.core.statuses import VersionStatus

# every column that holds an artifact's sha256
REFERENCES = (Dataset.sha256, Model.events_sha256, ModelVersion.checkpoint_sha256, ProxyCacheEntry.sha256,
              Job.report_sha256, Job.report_html_sha256)


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
    that deleted their rows); returns the removed digests. Checked just before the removal, so a
    blob that a newer row shares (the same bytes uploaded again) stays."""
    with db.session() as session:
        gone = unreferenced(session, digests)
    for digest in gone:
        store.delete(digest)
    return gone

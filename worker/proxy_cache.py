"""The memorization-proxy cache: one array of proxy values per (model version, proxy), as artifacts.

A proxy gives one float per training row (higher = more memorized; docs/proxies-and-metrics.md). Computing one
can cost anything from nothing (learning events) to a fine-tuning run (``holdout_retrain``), so a
job looks its proxy up before computing it. The rule, for a job whose base version is B:

1. **cached** — the ``proxy_cache`` table has an entry for (B, proxy): use it.
2. **carried** — else, if the proxy is computed from *learning events* (``confidence``,
   ``max_conf``, ``entropy``, ``bi_acc``): those events were recorded during the ORIGINAL training,
   so they describe the original model and stay valid for every descendant version. Walk B's
   ``parent_version`` chain to the nearest ancestor that has an entry and copy it to B (same
   artifact, ``source = carried``, ``compute_seconds`` of the original computation).
3. **computed** — else compute the proxy on B's weights (a post-hoc proxy: ``*_final``,
   ``holdout_retrain``, ``loss_curvature`` reads the model as it is now, so an ancestor's values
   are not reused) and store it (``source = computed``). An events proxy with no ancestor entry
   is computed too (from the events; it costs nothing).

The cache key is the canonical proxy name (aliases resolved), suffixed with a digest of the
proxy's parameters when a policy sets any (``holdout_retrain:1a2b…``): values computed with
other parameters are never mixed up. Each entry is written in its own short transaction; a
concurrent insert of the same (version, proxy) is tolerated (the first one stays).
Arrays are stored with ``np.save`` (``.npy``, float64, one value per training row, NaN for a row
whose learning events were redacted) and read back with ``allow_pickle=False``. When retention
redacts a model's events, it drops the model's events-proxy entries (service/core/repo/retention.py):
the next job computes them again from the redacted file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.core.models import ModelVersion, ProxyCacheEntry
from worker.engine.catalog import NEEDS_EVENTS, PROXY_ALIASES

from .context import WorkerContext

log = logging.getLogger("unlearnd.worker")

def canonical(name: str) -> str:
    return PROXY_ALIASES.get(name, name)


def from_events(name: str) -> bool:
    """True for proxies read from learning events of the original training (valid for descendants)."""
    return canonical(name) in NEEDS_EVENTS


def cache_key(name: str, params: Mapping[str, Any] | None) -> str:
    """The ``proxy_cache.proxy`` column: the canonical name, plus a digest of non-empty params."""
    name = canonical(name)
    if not params:
        return name
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{name}:{digest[:16]}"


@dataclass
class CachedProxy:
    """Proxy values for one job: where they came from and what they first cost."""

    name: str
    key: str
    params: dict[str, Any]
    values: np.ndarray
    source: str  # computed | carried | cached
    compute_seconds: float
    sha256: str


def to_bytes(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.float64), allow_pickle=False)
    return buf.getvalue()


def load_values(ctx: WorkerContext, sha256: str, n: int) -> np.ndarray | None:
    """The stored array, or None when it is missing or not ``n`` floats, finite but for NaN where a
    row's learning events were redacted (then: recompute)."""
    try:
        values = np.load(ctx.store.local_path(sha256), allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("proxy cache blob %s unreadable (%s): recomputing", sha256, exc)
        return None
    if (not isinstance(values, np.ndarray) or values.shape != (n,) or values.dtype.kind != "f"
            or np.isinf(values).any() or np.isnan(values).all()):
        log.warning("proxy cache blob %s is not %d finite values: recomputing", sha256, n)
        return None
    return values.astype(np.float64)


def _lineage(ctx: WorkerContext, model_id: int, version: int) -> list[tuple[int, int]]:
    """(version id, version number) of ``version`` and its ancestors, nearest first."""
    with ctx.db.session() as s:
        rows = s.execute(select(ModelVersion.id, ModelVersion.version, ModelVersion.parent_version)
                         .where(ModelVersion.model_id == model_id)).all()
    by_number = {r.version: r for r in rows}
    out, seen, cur = [], set(), by_number.get(version)
    while cur is not None and cur.version not in seen:
        seen.add(cur.version)
        out.append((cur.id, cur.version))
        cur = by_number.get(cur.parent_version) if cur.parent_version is not None else None
    return out


def _entry(ctx: WorkerContext, version_id: int, key: str) -> ProxyCacheEntry | None:
    with ctx.db.session() as s:
        return s.scalar(select(ProxyCacheEntry).where(ProxyCacheEntry.model_version_id == version_id,
                                                      ProxyCacheEntry.proxy == key))


def _store(ctx: WorkerContext, version_id: int, key: str, sha256: str, source: str, seconds: float) -> None:
    """Insert an entry in its own transaction; a concurrent insert of the same key wins quietly."""
    try:
        with ctx.db.transaction() as s:
            s.add(ProxyCacheEntry(model_version_id=version_id, proxy=key, sha256=sha256, source=source,
                                  compute_seconds=float(seconds)))
    except IntegrityError:
        log.info("proxy cache entry (version id %s, %s) was written concurrently; keeping that one", version_id, key)


def get_or_compute(
    ctx: WorkerContext, *, model_id: int, version: int, name: str, params: Mapping[str, Any] | None,
    n_train: int, compute: Callable[[], tuple[np.ndarray, float]],
) -> CachedProxy:
    """Proxy ``name`` for version ``version`` of model ``model_id`` by the rule of this module.

    ``compute()`` returns (values, seconds) computed on that version's weights; it is called only
    on a miss.
    """
    name, params = canonical(name), dict(params or {})
    key = cache_key(name, params)
    lineage = _lineage(ctx, model_id, version)
    if not lineage:
        raise LookupError(f"model {model_id} has no version {version}")
    base_id = lineage[0][0]

    entry = _entry(ctx, base_id, key)
    if entry is not None:
        values = load_values(ctx, entry.sha256, n_train)
        if values is not None:
            return CachedProxy(name, key, params, values, "cached", entry.compute_seconds, entry.sha256)

    if entry is None and from_events(name):
        for ancestor_id, ancestor in lineage[1:]:
            found = _entry(ctx, ancestor_id, key)
            if found is None:
                continue
            # leased first: a purge of the ancestor meanwhile must not remove the blob the new row names
            values = load_values(ctx, found.sha256, n_train) if ctx.store.lease(found.sha256) else None
            if values is None:
                break
            _store(ctx, base_id, key, found.sha256, "carried", found.compute_seconds)
            log.info("proxy %s carried from version %s to version %s", key, ancestor, version)
            return CachedProxy(name, key, params, values, "carried", found.compute_seconds, found.sha256)

    values, seconds = compute()
    values = np.asarray(values, dtype=np.float64)
    sha = ctx.store.put_bytes(to_bytes(values))
    if entry is None:
        _store(ctx, base_id, key, sha, "computed", seconds)
    log.info("proxy %s computed for version %s in %.2fs", key, version, seconds)
    return CachedProxy(name, key, params, values, "computed", float(seconds), sha)
